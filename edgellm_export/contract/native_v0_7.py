"""The Edge-LLM 0.7.x plugin-free contract (`trt_native_ops`; contract/edgellm-0.7/native.md).

The same files, config and per-step inputs as the plugin path (v0_7), with attention built from standard
ONNX ops that TensorRT 10.15 and later implement natively: RotaryEmbedding (opset 23), TensorScatter
(opset 24) for the cache update and Attention (opset 23/24). Each attention layer has its own K and V
cache, `k_cache_i` / `v_cache_i` `[batch, kv_heads, 4096, head_dim]` (a static capacity: 0.7.1's
exporter fixes it because TensorRT's KV-cache update needs one), returned as `present_k_cache_i` /
`present_v_cache_i`, which the runtime binds to the same buffers.

Where this graph departs from NVIDIA's own native export (native.md, "What the reference's native
export gets wrong"): it is valid ONNX that onnxruntime runs unmodified (int64 positions and write
indices, int64 Slice bounds, opset 24 declared, no `TRT_decomposable` attribute: onnxruntime and the ONNX
checker reject it, and without it TensorRT's importer asks for a fused attention kernel), the attention mask
is per sequence, so the shorter sequences of a ragged batch never attend to padding rows, RoPE runs in fp32
(rounded once to fp16) and honours a partial rotary dim.
Only dense decoders, and linears whose formats need no Edge-LLM plugin, have this form: `check_supported`
and `check_quant` refuse the rest.

Model code sees the same three calls as with v0_7 (`declare_io`, `attention`, `finish_outputs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, INT64, GraphBuilder
from edgellm_core.ops import native_attention
from edgellm_core.ops.schemas import ONNX_OPSET

from ..config import SIGMOID_MOE, SOFTMAX_MOE, ModelConfig
from . import v0_7 as PLUGIN
from .v0_7 import (  # noqa: F401
    BATCH,
    BINDINGS,
    DATA_FILE,
    GRAPH_FILE,
    IR_VERSION,
    KV_BATCH,
    MAX_POS,
    RELEASE,
    ROPE_BATCH,
    SEQ,
    SUBDIR,
)

log = logging.getLogger(__name__)
__all__ = ["RELEASE", "BINDINGS", "IR_VERSION", "SUBDIR", "GRAPH_FILE", "DATA_FILE", "KV_CAPACITY", "NATIVE",
           "opsets", "declare_io", "attention", "finish_outputs", "runtime_config", "check_supported", "check_quant"]

NATIVE = True  # `trt_native_ops` in config.json; what the twin, profiles and targets switch on
# llm_model_trtnative.py prepare_onnx_required_arguments: "TRT KVCacheUpdate layer requires a static value for
# capacity". The engine must then be built with --maxKVCacheCapacity 4096 (llm_build sets the K/V profiles to
# [1..maxBatch, Hkv, maxKVCacheCapacity, D], and the runtime checks the binding's capacity against its config).
KV_CAPACITY = 4096
OPSETS = {"": ONNX_OPSET}  # 24: TensorScatter's opset; RotaryEmbedding and Attention are 23 and carry over
TRT_DOMAIN = PLUGIN.TRT_DOMAIN


def opsets(g: GraphBuilder) -> dict[str, int]:
    """The standard domain, plus TensorRT's own `trt` ops where NVFP4 / MXFP8 linears use them (built into
    TensorRT, not the Edge-LLM plugin library)."""
    out = dict(OPSETS)
    if any(node.domain == TRT_DOMAIN for node in g.nodes):
        out[TRT_DOMAIN] = 1
    return out


@dataclass
class NativeIO:
    """The graph's bindings, and what every attention layer shares (computed once per graph)."""

    inputs_embeds: str
    rope: str
    context_lengths: str
    kvcache_start_index: str
    last_token_ids: str
    k_cache: dict[int, str] = field(default_factory=dict)  # attention layer -> K cache input
    v_cache: dict[int, str] = field(default_factory=dict)
    presents: dict[int, tuple[str, str] | None] = field(default_factory=dict)
    # Shared per-step values (edgellm_core/ops/native_attention.py native_shared).
    shared: dict[str, str] = field(default_factory=dict)
    rotary_dim: int = 0
    deepstack: list[str] = field(default_factory=list)  # none: check_supported refuses deepstack models


def _cache_shape(cfg: ModelConfig) -> list:
    return list(BINDINGS.native_kv_cache_dims(BATCH, cfg.num_key_value_heads, KV_CAPACITY, cfg.head_dim))


def declare_io(g: GraphBuilder, cfg: ModelConfig, kv_fp8: bool = False) -> NativeIO:
    """Graph inputs in NVIDIA's native order (inputs_embeds, rope, context_lengths, last_token_ids, every
    k_cache, every v_cache, kvcache_start_index; the runtime binds by name), then the values every attention
    layer shares: position ids, the per-sequence mask, the number of keys in use and the RoPE cos / sin."""
    from edgellm_core.errors import UnsupportedError

    if kv_fp8:
        raise UnsupportedError(_FP8_KV_WHY)
    b = BINDINGS
    emb = g.input(b.inputs_embeds, FLOAT16, [BATCH, SEQ, cfg.hidden_size])
    rope = g.input(b.rope_cos_sin, FLOAT, [ROPE_BATCH, MAX_POS, cfg.rotary_dim])
    ctx = g.input(b.context_lengths, INT32, [BATCH])
    last = g.input(b.last_token_ids, INT64, [BATCH, 1])
    shape = _cache_shape(cfg)
    layers = list(cfg.attention_layers)
    k = {i: g.input(b.native_kv(n)[0], FLOAT16, shape) for n, i in enumerate(layers)}
    v = {i: g.input(b.native_kv(n)[1], FLOAT16, shape) for n, i in enumerate(layers)}
    # Its own dim name, as on the plugin path: llm_build's context profile lets it be [0] (min) while the
    # batch of the other inputs starts at 1; the native runtime always binds [batch].
    start = g.input(b.kvcache_start_index, INT32, [KV_BATCH])
    io = NativeIO(emb, rope, ctx, start, last, k, v, {i: None for i in layers}, rotary_dim=cfg.rotary_dim)
    io.shared = native_attention.native_shared(g, emb, rope, ctx, start, cfg.rotary_dim)
    return io


def attention(g: GraphBuilder, io: NativeIO, layer: int, q: str, k: str, v: str, attrs: dict) -> str:
    """RoPE, cache update and attention of one layer in standard ops (edgellm_core/ops/native_attention.py
    native_core); returns the `[B, S, Hq, D]` attention output. `attrs` are the plugin path's
    (`plugin_attrs`): the head counts and size are the same facts."""
    if attrs.get("enable_fp8_kv_cache"):
        from edgellm_core.errors import UnsupportedError

        raise UnsupportedError(_FP8_KV_WHY)
    out, pk, pv = native_attention.native_core(g, io.shared, q, k, v, io.k_cache[layer], io.v_cache[layer],
                                              attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_size"],
                                              io.rotary_dim)
    io.presents[layer] = (pk, pv)
    return out


def finish_outputs(g: GraphBuilder, io: NativeIO, cfg: ModelConfig, logits: str) -> None:
    """Outputs: logits, every present K cache, every present V cache (rank 4, the inputs' shape: TensorScatter
    returns the whole buffer, which the runtime aliases to the input)."""
    g.output(logits, BINDINGS.logits, FLOAT, [BATCH, 1, cfg.vocab_size])
    shape = _cache_shape(cfg)
    layers = list(cfg.attention_layers)
    for n, i in enumerate(layers):
        g.output(io.presents[i][0], BINDINGS.native_present_kv(n)[0], FLOAT16, shape)
    for n, i in enumerate(layers):
        g.output(io.presents[i][1], BINDINGS.native_present_kv(n)[1], FLOAT16, shape)


def runtime_config(cfg: ModelConfig, *, allow_rope_passthrough: bool = False) -> dict:
    """The plugin path's config.json with `"trt_native_ops": true`, which llm_build copies into the engine's
    builder_config and LLMEngineRunner switches its KV-cache layout and bindings on."""
    out = PLUGIN.runtime_config(cfg, allow_rope_passthrough=allow_rope_passthrough)
    out["trt_native_ops"] = True
    return out


_FP8_KV_WHY = (
    "an FP8 KV cache has no plugin-free form in Edge-LLM 0.7.1: its native attention layer casts the K/V caches "
    "to fp16 and Attention reads fp16 (attention_trt.py), so only the AttentionPlugin can keep the cache in FP8; "
    "export this checkpoint without --attention native")


def check_supported(cfg: ModelConfig) -> None:
    """Refuse what the native path cannot express: recurrent (hybrid) layers and MoE MLPs (0.7.1's native
    path covers vanilla dense decoders; their state bindings and the MoE exports here are plugin-path only)."""
    from edgellm_core.errors import UnsupportedError

    if cfg.recurrent_layers:
        raise UnsupportedError(
            f"{cfg.model_type} has {len(cfg.recurrent_layers)} recurrent (linear-attention / Mamba) layers; "
            "--attention native covers dense decoders only: Edge-LLM 0.7.1's trt_native_ops path has no bindings "
            "for conv / recurrent states (hybrid models need the causal_conv1d and SSM plugins). Export it "
            "without --attention native")
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.mlp(i) in (SOFTMAX_MOE, SIGMOID_MOE)]
    if moe:
        raise UnsupportedError(
            f"{cfg.model_type} has mixture-of-experts MLPs (layers {', '.join(map(str, moe[:4]))}"
            f"{' ...' if len(moe) > 4 else ''}); --attention native covers dense decoders only (Edge-LLM 0.7.1's "
            "native path is vanilla dense decoding, and MoE exports are kept on the plugin path). Export it "
            "without --attention native")
    if cfg.attn_output_gate:
        raise UnsupportedError("gated attention (attn_output_gate) is not covered by --attention native")
    if cfg.num_deepstack_features:
        raise UnsupportedError(
            f"{cfg.model_type} takes {cfg.num_deepstack_features} deepstack inputs (Qwen3-VL); Edge-LLM 0.7.1's "
            "trt_native_ops path covers vanilla decoding only (native.md: deepstack is out of its scope). Export "
            "it without --attention native")
    if 0 < cfg.sliding_window < KV_CAPACITY:
        log.warning("sliding_window=%d is not applied by the native attention mask (neither NVIDIA's nor ours): "
                    "contexts longer than %d tokens attend to the whole cache, unlike the checkpoint",
                    cfg.sliding_window, cfg.sliding_window)


def check_quant(quant, source=None) -> None:
    """Refuse quantization that needs an Edge-LLM plugin (INT4 weight-only GEMMs) or an FP8 cache; `source`:
    the file the quantization metadata came from."""
    from edgellm_core.errors import UnsupportedError

    from ..quant.plan import INT4_FORMATS

    if quant.kv_scales is not None:
        raise UnsupportedError(_FP8_KV_WHY, source)
    int4 = sorted(name for name, lq in quant.linears.items() if lq.format in INT4_FORMATS)
    if int4:
        fmts = sorted({quant.linears[n].format for n in int4})
        raise UnsupportedError(
            f"{', '.join(fmts)} linears ({', '.join(int4[:3])}{' and more' if len(int4) > 3 else ''}) run on "
            "Edge-LLM's Int4GroupwiseGemmPlugin, so an export with them needs the plugin library, which "
            "--attention native exists to avoid; the plugin-free formats are FP16, FP8, INT8 SmoothQuant, NVFP4 "
            "and MXFP8. Export it without --attention native", source)
