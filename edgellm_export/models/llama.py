"""Llama (1/2/3.x): the default dense decoder as is. Llama 3 RoPE scaling is handled by the contract."""

from .registry import Family, register

FAMILY = register(Family(model_types=("llama",)))
