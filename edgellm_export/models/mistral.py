"""Mistral: the default dense decoder; a set sliding_window is forwarded to the plugin."""

from .registry import Family, register

FAMILY = register(Family(model_types=("mistral",)))
