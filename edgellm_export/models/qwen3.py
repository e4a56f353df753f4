"""Qwen3, and the language model of Qwen3-VL: the default dense decoder with per-head q/k RMSNorm (detected
from tensor names). Qwen3-VL's text model adds MRoPE (interleaved; the runtime builds it from rope_scaling)
and its deepstack inputs (ModelConfig.num_deepstack_features; contract v0_7.declare_io)."""

from .registry import Family, register

FAMILY = register(Family(model_types=("qwen3", "qwen3_vl", "qwen3_vl_text")))
