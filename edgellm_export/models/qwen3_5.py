"""Qwen3.5 text (`qwen3_5_text`, and the text part of the `qwen3_5` VLM wrapper; families.md §3.2).

A hybrid of the pre-norm decoder: `layer_types` puts a GatedDeltaNet mixer (models/blocks/gdn.py) on the
`linear_attention` layers and gated full attention (q_proj also yields a per-head gate; q/k norms) on the
`full_attention` ones; every layer has a SwiGLU MLP; every RMSNorm outside the GatedDeltaNet applies its
weight as (1 + w). The config parsing (`config._qwen3_5_fields`) sets those choices; the decoder stacks
the blocks. Runtime role `hybrid_mamba` (contract `_hybrid_fields`).
"""

from ..config import ModelConfig
from . import decoder
from .registry import Family, refuse_quantized, register


def prepare(ckpt, cfg: ModelConfig) -> None:
    # The GatedDeltaNet projections' quantized paths (and their NVFP4 fusion rule) are not built yet.
    refuse_quantized(ckpt, "Qwen3.5")
    decoder.split_fused_tensors(ckpt, cfg)


FAMILY = register(Family(model_types=("qwen3_5_text", "qwen3_5"), prepare=prepare))
