"""The Edge-LLM 0.7.x contract (contract/edgellm-0.7/text.md): names, dims, plugin, config.

Model code calls `declare_io`, `attention` and `finish_outputs`; it never spells
a binding name, a dim name or a plugin attribute itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edgellm_core.bindings import bindings_for
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT8E4M3FN, FLOAT16, INT32, INT64, GraphBuilder
from edgellm_core.ops import attention_plugin
from edgellm_core.ops.schemas import ONNX_OPSET

from ..config import ModelConfig
from . import rope_v0_7

log = logging.getLogger(__name__)
RELEASE = "0.7.1"
BINDINGS = bindings_for(RELEASE)
IR_VERSION = 10
OPSETS = {"": ONNX_OPSET, attention_plugin.DOMAIN: 1}
TRT_DOMAIN = "trt"  # TensorRT's own custom ops (NVFP4 / MXFP8 activations); imported only when used


def opsets(g: GraphBuilder) -> dict[str, int]:
    out = dict(OPSETS)
    if any(node.domain == TRT_DOMAIN for node in g.nodes):
        out[TRT_DOMAIN] = 1
    return out
SUBDIR = "llm"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

# Symbolic dim names: equal names mean "equal at runtime" to TensorRT (§2.4).
BATCH, SEQ, PAST, ROPE_BATCH, MAX_POS, KV_BATCH = (
    "batch", "seq_len", "past_len", "rope_batch", "max_pos", "kv_batch"
)


@dataclass
class GraphIO:
    inputs_embeds: str
    past: list[str]
    rope: str
    context_lengths: str
    kvcache_start_index: str
    last_token_ids: str
    presents: list[str | None]
    kv_dtype: int = FLOAT16


def declare_io(g: GraphBuilder, cfg: ModelConfig, kv_fp8: bool = False) -> GraphIO:
    """Graph inputs; an FP8 KV cache makes every past/present tensor float8e4m3fn (quant.md §3.10)."""
    kv_dtype = FLOAT8E4M3FN if kv_fp8 else FLOAT16
    kv_shape = list(BINDINGS.kv_cache_dims(BATCH, cfg.num_key_value_heads, PAST, cfg.head_dim))
    b = BINDINGS
    emb = g.input(b.inputs_embeds, FLOAT16, [BATCH, SEQ, cfg.hidden_size])
    past = [g.input(b.past(i), kv_dtype, kv_shape) for i in range(cfg.num_hidden_layers)]
    rope = g.input(b.rope_cos_sin, FLOAT, [ROPE_BATCH, MAX_POS, cfg.rotary_dim])
    ctx = g.input(b.context_lengths, INT32, [BATCH])
    start = g.input(b.kvcache_start_index, INT32, [KV_BATCH])
    last = g.input(b.last_token_ids, INT64, [BATCH, 1])
    return GraphIO(emb, past, rope, ctx, start, last, [None] * cfg.num_hidden_layers, kv_dtype)


def attention(g: GraphBuilder, io: GraphIO, layer: int, q: str, k: str, v: str, attrs: dict) -> str:
    """Emit the layer's AttentionPlugin with the block's attributes (models/blocks/attention.py
    plugin_attrs); returns the `[B, S, Hq, D]` attention output."""
    attn, present = attention_plugin.emit(
        g, [q, k, v, io.past[layer], io.context_lengths, io.rope, io.kvcache_start_index], **attrs)
    io.presents[layer] = present
    return attn


def finish_outputs(g: GraphBuilder, io: GraphIO, cfg: ModelConfig, logits: str) -> None:
    g.output(logits, BINDINGS.logits, FLOAT, [BATCH, 1, cfg.vocab_size])
    kv_out = list(BINDINGS.kv_cache_dims(BATCH, cfg.num_key_value_heads, "present_len", cfg.head_dim))
    for i, p in enumerate(io.presents):
        g.output(p, BINDINGS.present(i), io.kv_dtype, kv_out)


def runtime_config(cfg: ModelConfig, *, allow_rope_passthrough: bool = False) -> dict:
    """The `config.json` the 0.7 builder and runtime read (§6.1)."""
    rope = rope_v0_7.runtime_rope_fields(cfg, passthrough=allow_rope_passthrough)
    out = {
        "model": cfg.model_type,
        "model_type": "llm",
        "edgellm_version": RELEASE,
        "trt_native_ops": False,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": rope.pop("max_position_embeddings"),
        "rope_theta": rope.pop("rope_theta"),
        "rope_scaling": rope.pop("rope_scaling"),
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "num_deepstack_features": 0,
    }
    out.update(rope)  # original_max_position_embeddings for longrope
    return out


def check_supported(cfg: ModelConfig) -> None:
    """Refuse shapes the 0.7 plugin kernels cannot run (they throw at engine build)."""
    from edgellm_core.errors import UnsupportedError

    if cfg.head_dim not in (64, 128):
        raise UnsupportedError(
            f"head_dim {cfg.head_dim} is not supported by Edge-LLM 0.7's attention kernels "
            "(context FMHA and XQA decode together need 64 or 128)"
        )
    if cfg.sliding_window > 0:
        log.warning(
            "sliding_window=%d is passed to the AttentionPlugin, but only Blackwell builds honour it; "
            "on other GPUs (Orin included) contexts longer than %d tokens attend to the whole cache, "
            "unlike the checkpoint", cfg.sliding_window, cfg.sliding_window)
    ratio = cfg.num_attention_heads // cfg.num_key_value_heads
    if ratio not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        raise UnsupportedError(
            f"{cfg.num_attention_heads} query heads over {cfg.num_key_value_heads} KV heads "
            f"(ratio {ratio}) is outside what Edge-LLM 0.7's decode kernels support (1..8 or 16)"
        )
