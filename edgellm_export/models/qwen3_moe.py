"""Qwen3-MoE: the dense decoder's attention (q/k norm, GQA) with a sparse MoE MLP on the layers the
config's plan names (`decoder_sparse_step`, `mlp_only_layers`: ModelConfig.is_moe_layer); FP16/BF16
experts in standard ONNX ops (models/blocks/moe.py), since 0.7.1 ships no FP16 MoE plugin; INT4 experts
through the Int4MoePlugin (models/blocks/moe_int4.py), NVFP4 ones through NvFP4MoEPluginGeforce
(models/blocks/moe_nvfp4.py).

Qwen3-Omni's thinker (`qwen3_omni_moe_text`, under thinker_config.text_config) is this decoder too: the same
attention, router (softmax over every expert, top-k, optional renormalisation; no shared expert) and layer plan,
with interleaved MRoPE (config.py) and deepstack inputs after its first layers, as Qwen3-VL's."""

from ..config import QWEN3_MOE_TYPES
from .registry import Family, register

FAMILY = register(Family(model_types=QWEN3_MOE_TYPES))
