"""Qwen3: the default dense decoder with per-head q/k RMSNorm (detected from tensor names)."""

from .registry import Family, register

FAMILY = register(Family(model_types=("qwen3",)))
