"""Nemotron-H: Mamba2 + NoPE attention + ReLU^2 MLP + sigmoid-routed MoE (families.md §3.1, §2.4).

Each layer is one block behind one RMSNorm (`layers.{i}.norm`, its weight multiplied in fp32): the
config's layer plan (`hybrid_override_pattern` or `layers_block_type`, config._nemotron_h_fields) says
which. This file is the family's weight-name mapping: `backbone.` is a wrapper prefix, the embedding and
final norm get their canonical names, and each layer's `mixer.*` tensors are exposed under the names of
the block that reads them (attention `self_attn.*`, MLP and MoE `mlp.*`; Mamba2 keeps `mixer.*`), so the
shared blocks (models/blocks/) read them unchanged.
"""

from ..config import ATTENTION, NONE, ModelConfig
from .registry import Family, refuse_quantized, register


def prepare(ckpt, cfg: ModelConfig) -> None:
    # NVFP4 experts need Nvfp4MoePlugin and the Mamba2 projections' quantized paths: not built yet.
    refuse_quantized(ckpt, "Nemotron-H")
    ckpt.rename("embeddings.weight", "embed_tokens.weight")
    ckpt.rename("norm_f.weight", "norm.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        ckpt.rename(p + "norm.weight", p + "input_layernorm.weight")
        if cfg.mixer(i) == ATTENTION:
            target = "self_attn."
        elif cfg.mlp(i) != NONE:
            target = "mlp."
        else:
            continue  # Mamba2
        for name in [n for n in ckpt.names() if n.startswith(p + "mixer.")]:
            ckpt.rename(name, p + target + name[len(p + "mixer."):])


FAMILY = register(Family(model_types=("nemotron_h",), prepare=prepare))
