"""Qwen2 / Qwen2.5: the default dense decoder; q/k/v biases come from the checkpoint's keys."""

from .registry import Family, register

FAMILY = register(Family(model_types=("qwen2",)))
