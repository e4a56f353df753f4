"""Qwen2 / Qwen2.5, and the language model of Qwen2-VL / Qwen2.5-VL: the default dense decoder; q/k/v biases
come from the checkpoint's keys. The VL text model is a Qwen2 decoder with MRoPE, which the runtime builds
from rope_scaling (`default` + `mrope_section`); its graph is the same."""

from .registry import Family, register

FAMILY = register(Family(model_types=("qwen2", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text")))
