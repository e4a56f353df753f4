"""Nemotron-H: Mamba2 + NoPE attention + ReLU^2 MLP + sigmoid-routed MoE (families.md §3.1, §2.4).

Each layer is one block behind one RMSNorm (`layers.{i}.norm`, its weight multiplied in fp32): the
config's layer plan (`hybrid_override_pattern` or `layers_block_type`, config._nemotron_h_fields) says
which. This file is the family's weight-name mapping: `backbone.` is a wrapper prefix, the embedding and
final norm get their canonical names, and each layer's `mixer.*` tensors are exposed under the names of
the block that reads them (attention `self_attn.*`, MLP and MoE `mlp.*`; Mamba2 keeps `mixer.*`), so the
shared blocks (models/blocks/) read them unchanged.
"""

from edgellm_core.errors import UnsupportedError

from ..config import ATTENTION, NONE, ModelConfig
from .registry import Family, is_quantized, register

# Tensor names a quantized linear (or KV cache) carries beside its weight, in the formats the plan reads.
QUANT_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".output_scale", ".pre_quant_scale",
                  ".qweight", ".qzeros", ".scales", ".g_idx", ".k_scale", ".v_scale")


def _quantized_outside_experts(ckpt) -> list[str]:
    """Quantization tensors of anything but the routed experts (`layers.{i}.mixer.experts.*`)."""
    return [name for name in ckpt.names() if name.endswith(QUANT_SUFFIXES) and ".mixer.experts." not in name]


def prepare(ckpt, cfg: ModelConfig) -> None:
    # Quantized checkpoints: NVFP4 routed experts only (Nvfp4MoePlugin, blocks/sigmoid_moe_nvfp4.py); the
    # Mamba2, attention, dense MLP, shared-expert and router projections must be unquantized (their quantized
    # paths are not validated for this family), so their scales are refused here, by name.
    if is_quantized(ckpt):
        odd = _quantized_outside_experts(ckpt)
        if odd:
            raise UnsupportedError(
                f"quantized Nemotron-H checkpoint: {odd[0]!r} ({len(odd)} such tensors) quantizes a projection "
                "outside the routed MoE experts; only NVFP4 routed experts (through Nvfp4MoePlugin) are exported "
                "for this family, with the Mamba2, attention, MLP, shared-expert and router projections in "
                "BF16/FP16. Export a checkpoint quantized with those modules excluded, or the FP16/BF16 one",
                ckpt.config_path)
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
