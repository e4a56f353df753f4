"""Phi-3: the default dense decoder over fused `qkv_proj` and `gate_up_proj` tensors.

The default `prepare` exposes the fused tensors as row slices (q, k, v; gate,
up) read straight from the mapped file, so nothing is concatenated or copied.
"""

from .registry import Family, register

# Phi-4-multimodal's language model is this decoder (transformers' `phi4_multimodal`, the original `phi4mm`);
# its builtin vision/speech LoRA must be merged first (`edgellm merge-lora`, refused in export otherwise).
FAMILY = register(Family(model_types=("phi3", "phi4mm", "phi4_multimodal")))
