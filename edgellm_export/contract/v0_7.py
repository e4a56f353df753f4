"""The Edge-LLM 0.7.x contract (contract/edgellm-0.7/text.md): names, dims, plugin, config.

Model code calls `declare_io`, `attention` and `finish_outputs`; it never spells
a binding name, a dim name or a plugin attribute itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from edgellm_core.bindings import bindings_for
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT8E4M3FN, FLOAT16, INT32, INT64, GraphBuilder
from edgellm_core.ops import attention_plugin
from edgellm_core.ops.schemas import ONNX_OPSET

from ..config import MULTIMODAL_TOKEN_KEYS, ModelConfig
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
    """The graph's bindings; states are keyed by layer index (their names carry the attention or
    recurrent ordinal)."""

    inputs_embeds: str
    rope: str
    context_lengths: str
    kvcache_start_index: str
    last_token_ids: str
    past: dict[int, str] = field(default_factory=dict)  # attention layer -> KV cache input
    presents: dict[int, str | None] = field(default_factory=dict)
    conv: dict[int, str] = field(default_factory=dict)  # recurrent layer -> conv state input
    recurrent: dict[int, str] = field(default_factory=dict)  # recurrent layer -> recurrent state input
    state_presents: dict[str, str | None] = field(default_factory=dict)  # state input -> its output value
    kv_dtype: int = FLOAT16
    deepstack: list[str] = field(default_factory=list)  # Qwen3-VL: added after decoder layer i


def recurrent_state_dtype(cfg: ModelConfig) -> int:
    """GatedDeltaNet keeps its recurrent state in fp32, Mamba2 in fp16 (families.md §3.1, §3.2; checklist 3)."""
    return FLOAT if cfg.gdn is not None else FLOAT16


def _recurrent_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, head_dim, state size) of the recurrent state: Mamba2 (Hm, Dm, N), GatedDeltaNet (Hv, Dk, Dv)."""
    if cfg.mamba is not None:
        return cfg.mamba.num_heads, cfg.mamba.head_dim, cfg.mamba.state_size
    return cfg.gdn.num_v_heads, cfg.gdn.k_head_dim, cfg.gdn.v_head_dim


def _conv_dims(cfg: ModelConfig) -> tuple[int, int]:
    spec = cfg.mamba if cfg.mamba is not None else cfg.gdn
    return spec.conv_dim, spec.conv_kernel


def recurrent_state_shape(cfg: ModelConfig, batch) -> tuple:
    return BINDINGS.recurrent_state_dims(batch, *_recurrent_dims(cfg))


def conv_state_shape(cfg: ModelConfig, batch) -> tuple:
    return BINDINGS.conv_state_dims(batch, *_conv_dims(cfg))


def declare_io(g: GraphBuilder, cfg: ModelConfig, kv_fp8: bool = False) -> GraphIO:
    """Graph inputs in the runtime's order (families.md §0.1, §3): embeddings, a KV cache per attention
    layer (by attention ordinal), RoPE, the per-step scalars, then for hybrids every recurrent layer's
    conv state and every recurrent layer's recurrent state (by recurrent ordinal). An FP8 KV cache makes
    every past/present KV tensor float8e4m3fn (quant.md §3.10)."""
    kv_dtype = FLOAT8E4M3FN if kv_fp8 else FLOAT16
    kv_shape = list(BINDINGS.kv_cache_dims(BATCH, cfg.num_key_value_heads, PAST, cfg.head_dim))
    b = BINDINGS
    emb = g.input(b.inputs_embeds, FLOAT16, [BATCH, SEQ, cfg.hidden_size])
    past = {i: g.input(b.past(k), kv_dtype, kv_shape) for k, i in enumerate(cfg.attention_layers)}
    rope = g.input(b.rope_cos_sin, FLOAT, [ROPE_BATCH, MAX_POS, cfg.rotary_dim])
    ctx = g.input(b.context_lengths, INT32, [BATCH])
    start = g.input(b.kvcache_start_index, INT32, [KV_BATCH])
    last = g.input(b.last_token_ids, INT64, [BATCH, 1])
    # Qwen3-VL's deepstack features follow last_token_ids (text.md §2.2); llm_build finds them by name.
    deepstack = [g.input(b.deepstack(i), FLOAT16, [BATCH, SEQ, cfg.hidden_size])
                 for i in range(cfg.num_deepstack_features)]
    io = GraphIO(emb, rope, ctx, start, last, past, {i: None for i in past}, kv_dtype=kv_dtype, deepstack=deepstack)
    for k, i in enumerate(cfg.recurrent_layers):
        io.conv[i] = g.input(b.conv(k)[0], FLOAT16, list(conv_state_shape(cfg, BATCH)))
    for k, i in enumerate(cfg.recurrent_layers):
        io.recurrent[i] = g.input(b.recurrent(k)[0], recurrent_state_dtype(cfg),
                                  list(recurrent_state_shape(cfg, BATCH)))
    return io


def attention(g: GraphBuilder, io: GraphIO, layer: int, q: str, k: str, v: str, attrs: dict) -> str:
    """Emit the layer's AttentionPlugin with the block's attributes (models/blocks/attention.py
    plugin_attrs); returns the `[B, S, Hq, D]` attention output."""
    attn, present = attention_plugin.emit(
        g, [q, k, v, io.past[layer], io.context_lengths, io.rope, io.kvcache_start_index], **attrs)
    io.presents[layer] = present
    return attn


def set_state_present(io: GraphIO, state_input: str, value: str) -> None:
    """A recurrent block hands back the value that carries `state_input` to the next call."""
    io.state_presents[state_input] = value


def finish_outputs(g: GraphBuilder, io: GraphIO, cfg: ModelConfig, logits: str) -> None:
    """Outputs in the runtime's order: logits, the KV presents, then the conv and recurrent presents."""
    g.output(logits, BINDINGS.logits, FLOAT, [BATCH, 1, cfg.vocab_size])
    kv_out = list(BINDINGS.kv_cache_dims(BATCH, cfg.num_key_value_heads, "present_len", cfg.head_dim))
    for k, i in enumerate(cfg.attention_layers):
        g.output(io.presents[i], BINDINGS.present(k), io.kv_dtype, kv_out)
    for k, i in enumerate(cfg.recurrent_layers):
        g.output(io.state_presents[io.conv[i]], BINDINGS.conv(k)[1], FLOAT16, list(conv_state_shape(cfg, BATCH)))
    for k, i in enumerate(cfg.recurrent_layers):
        g.output(io.state_presents[io.recurrent[i]], BINDINGS.recurrent(k)[1], recurrent_state_dtype(cfg),
                 list(recurrent_state_shape(cfg, BATCH)))


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
        "num_deepstack_features": cfg.num_deepstack_features,
    }
    out.update(rope)  # original_max_position_embeddings for longrope
    if isinstance(cfg.raw.get("vision_config"), dict):  # copied verbatim: VLM runners read it from here (§0.3)
        out["vision_config"] = cfg.raw["vision_config"]
    for key in MULTIMODAL_TOKEN_KEYS:  # the engine runner reads image_token_id / audio_token_id (families.md §7)
        if cfg.raw.get(key) is not None:
            out[key] = cfg.raw[key]
    if cfg.is_hybrid:
        out.update(_hybrid_fields(cfg))
    return out


def _hybrid_fields(cfg: ModelConfig) -> dict:
    """What the 0.7 builder and HybridCacheManager read for a model with recurrent layers (families.md §3):
    state counts and shapes, and a routing table over the stateful layers (GatedDeltaNet is "mamba")."""
    attn = cfg.attention_layers
    heads, head_dim, size = _recurrent_dims(cfg)
    conv_dim, conv_kernel = _conv_dims(cfg)
    stateful = [i for i in range(cfg.num_hidden_layers) if i in attn or i in cfg.recurrent_layers]
    return {
        "model_type": "hybrid_mamba",
        "num_linear_attn_layers": len(cfg.recurrent_layers),
        "num_attention_layers": len(attn),
        "recurrent_state_num_heads": heads,
        "recurrent_state_head_dim": head_dim,
        "recurrent_state_size": size,
        "conv_dim": conv_dim,
        "conv_kernel": conv_kernel,
        "use_rope": len(attn) > 0 and cfg.use_rope,  # Nemotron-H attention is NoPE
        # Over the stateful layers only (MLP and MoE layers have no cache slot); GatedDeltaNet is "mamba".
        "layer_types": ["attention" if i in attn else "mamba" for i in stateful],
        "kv_layer_configs": [{"num_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim} if i in attn
                             else None for i in stateful],
    }


def check_supported(cfg: ModelConfig) -> None:
    """Refuse shapes the 0.7 plugin kernels cannot run (they throw at engine build)."""
    if cfg.attention_layers:
        _check_attention(cfg)
    if cfg.gdn is not None:
        _check_gdn(cfg)
    if cfg.mamba is not None:
        _check_mamba(cfg)


def _check_attention(cfg: ModelConfig) -> None:
    from edgellm_core.errors import UnsupportedError

    problems = attention_plugin.kernel_problems(cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads)
    if problems:
        raise UnsupportedError("; ".join(problems))
    if cfg.sliding_window > 0:
        log.warning(
            "sliding_window=%d is passed to the AttentionPlugin, but only Blackwell builds honour it; "
            "on other GPUs (Orin included) contexts longer than %d tokens attend to the whole cache, "
            "unlike the checkpoint", cfg.sliding_window, cfg.sliding_window)


def _check_gdn(cfg: ModelConfig) -> None:
    """GatedDeltaNet: 0.7.1's kernels run only 128-wide key and value heads (SM 80 and up), and its conv
    kernel only widths up to 8 (families.md §3.2; ops/gated_delta_net.py, ops/causal_conv1d.py)."""
    from edgellm_core.errors import UnsupportedError
    from edgellm_core.ops import causal_conv1d, gated_delta_net

    d = cfg.gdn
    if (d.k_head_dim, d.v_head_dim) != gated_delta_net.RUNTIME_HEAD_DIMS:
        raise UnsupportedError(
            f"GatedDeltaNet head dims {d.k_head_dim} (key) / {d.v_head_dim} (value) are not supported by Edge-LLM "
            f"0.7's gated_delta_net kernels, which run only {gated_delta_net.RUNTIME_HEAD_DIMS[0]} / "
            f"{gated_delta_net.RUNTIME_HEAD_DIMS[1]}")
    if not 1 <= d.conv_kernel <= causal_conv1d.MAX_KERNEL:
        raise UnsupportedError(
            f"linear_conv_kernel_dim {d.conv_kernel} is wider than Edge-LLM 0.7's causal_conv1d kernel allows "
            f"(1..{causal_conv1d.MAX_KERNEL})")


def _check_mamba(cfg: ModelConfig) -> None:
    """Mamba2: the head dims and state sizes 0.7.1's update_ssm_state kernels are built for, and the conv
    kernel's width limit (ops/update_ssm_state.py, ops/causal_conv1d.py)."""
    from edgellm_core.errors import UnsupportedError
    from edgellm_core.ops import causal_conv1d, update_ssm_state

    m = cfg.mamba
    problem = update_ssm_state.check_shape(m.num_heads, m.head_dim, m.state_size, m.n_groups)
    if problem:
        raise UnsupportedError(f"{problem}: Edge-LLM 0.7's update_ssm_state cannot run this Mamba2 mixer")
    if not 1 <= m.conv_kernel <= causal_conv1d.MAX_KERNEL:
        raise UnsupportedError(f"conv_kernel {m.conv_kernel} is wider than Edge-LLM 0.7's causal_conv1d kernel "
                               f"allows (1..{causal_conv1d.MAX_KERNEL})")
