"""Qwen3-MoE: the dense decoder's attention (q/k norm, GQA) with a sparse MoE MLP on the layers the
config's plan names (`decoder_sparse_step`, `mlp_only_layers`: ModelConfig.is_moe_layer); FP16/BF16
experts in standard ONNX ops (models/blocks/moe.py), since 0.7.1 ships no FP16 MoE plugin; INT4 experts
through the Int4MoePlugin (models/blocks/moe_int4.py), NVFP4 ones through NvFP4MoEPluginGeforce
(models/blocks/moe_nvfp4.py)."""

from .registry import Family, register

FAMILY = register(Family(model_types=("qwen3_moe",)))
