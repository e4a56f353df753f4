"""Phi-3: the default dense decoder over fused `qkv_proj` and `gate_up_proj` tensors.

The default `prepare` exposes the fused tensors as row slices (q, k, v; gate,
up) read straight from the mapped file, so nothing is concatenated or copied.
"""

from .registry import Family, register

FAMILY = register(Family(model_types=("phi3",)))
