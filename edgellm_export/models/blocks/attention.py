"""GQA attention through the runtime's AttentionPlugin, both faces.

q/k/v projections (optional biases), optional per-head q/k RMSNorm (Qwen3; Qwen3.5's in the (1 + w)
convention), the plugin (RoPE, cache update, attention), the o projection. Gated attention (Qwen3.5):
q_proj yields per head D query channels then D gate channels, and the attention output is multiplied by
sigmoid(gate) before o_proj. `plugin_attrs` is the one place the plugin's attributes are
decided: the graph face writes them on the node, the eager face passes the same values to the eager
op, so an attribute cannot reach one face and not the other.

The plugin-free form (`--attention native`, contract native.md) replaces the plugin by standard ONNX ops;
its faces live in edgellm_core/ops/native_attention.py (the validation side builds such a graph too).
"""

from __future__ import annotations

from edgellm_core.ops.native_attention import native_eager

from ...config import ModelConfig
from . import linear, norms


def plugin_attrs(cfg: ModelConfig, kv_scales: tuple[float, float] | None) -> dict:
    """The AttentionPlugin attributes for this model (0.7's set; enable_tree_attention is always 0).

    sliding_window_size: the eager op, like 0.7's FMHA_v2 prefill and XQA decode kernels, does not apply
    it (contract text.md: only the Blackwell CuTe-DSL prefill path does); the golden scenarios are far
    shorter than any window, so they agree with a kernel that does.
    With an FP8 cache, qkv_scales is [1.0, k_scale, v_scale]: 0.7 has no query scale."""
    return {
        "num_q_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_size": cfg.head_dim,
        "enable_fp8_kv_cache": int(kv_scales is not None),
        "sliding_window_size": cfg.sliding_window,
        "qkv_scales": (1.0, *kv_scales) if kv_scales is not None else (1.0, 1.0, 1.0),
    }


def q_proj_out(cfg: ModelConfig) -> int:
    return cfg.q_dim * (2 if cfg.attn_output_gate else 1)


def emit(e, io, contract, layer: int, y: str, kv_scales) -> str:
    """Graph face: the attention output after o_proj, `[B, S, H]`, from the normed input `y`."""
    g, c, w = e.g, e.cfg, e.w
    p, h, d, hq = f"layers.{layer}.", c.hidden_size, c.head_dim, c.num_attention_heads
    q = linear.emit(e, y, p + "self_attn.q_proj", q_proj_out(c), h, c.qkv_bias)
    gate = None
    if c.attn_output_gate:
        q, gate = g.node("Split", [g.node("Reshape", [q, g.i64(0, 0, hq, 2 * d)]), g.i64(d, d)], {"axis": -1}, n_out=2)
        q, gate = (g.node("Reshape", [t, g.i64(0, 0, c.q_dim)]) for t in (q, gate))
    k = linear.emit(e, y, p + "self_attn.k_proj", c.kv_dim, h, c.qkv_bias)
    v = linear.emit(e, y, p + "self_attn.v_proj", c.kv_dim, h, c.qkv_bias)
    if c.has_qk_norm:
        one, f32 = c.norm_plus_one, c.norm_fp32_product
        q = norms.emit_per_head(g, q, norms.weight_name(w, p + "self_attn.q_norm.weight", d, one), c.rms_norm_eps,
                                hq, d, f32)
        k = norms.emit_per_head(g, k, norms.weight_name(w, p + "self_attn.k_norm.weight", d, one), c.rms_norm_eps,
                                c.num_key_value_heads, d, f32)
    attn = contract.attention(g, io, layer, q, k, v, plugin_attrs(c, kv_scales))
    attn = g.node("Reshape", [attn, g.i64(0, 0, c.q_dim)])
    if gate is not None:
        attn = g.node("Mul", [attn, g.node("Sigmoid", [gate])])
    return linear.emit(e, attn, p + "self_attn.o_proj", h, c.q_dim, c.o_bias)


def eager(y, sizes: list[int], t: dict, quant: dict, cfg: ModelConfig, kv_scales, caches: list, rope_table,
          calls: list, attention_plugin, native: bool = False):
    """Eager face over many runtime calls at once: `y` holds the normed hidden states of every call,
    concatenated along the sequence (`sizes` per call); projections run on all of them together, the
    plugin walks `calls` (cache index, context_lengths, start index) in order, updating `caches`.
    `native`: the plugin-free form instead (`native_eager`; each cache is a (K, V) pair). `rope_table` is one
    table, or a list of them by cache index (an image scenario's MRoPE table next to the plain one)."""
    import torch

    c, b, d, hq = cfg, y.shape[0], cfg.head_dim, cfg.num_attention_heads
    q = linear.eager(y, t, "self_attn.q_proj", quant)
    gate = None
    if c.attn_output_gate:
        q, gate = (part.reshape(b, -1, c.q_dim) for part in q.view(b, -1, hq, 2 * d).split(d, dim=-1))
    k = linear.eager(y, t, "self_attn.k_proj", quant)
    v = linear.eager(y, t, "self_attn.v_proj", quant)
    if c.has_qk_norm:
        one, f32 = c.norm_plus_one, c.norm_fp32_product
        q = norms.eager_per_head(q, t[norms.weight_key("self_attn.q_norm.weight", one)], c.rms_norm_eps, hq, d, f32)
        k = norms.eager_per_head(k, t[norms.weight_key("self_attn.k_norm.weight", one)], c.rms_norm_eps,
                                 c.num_key_value_heads, d, f32)
    a = plugin_attrs(c, kv_scales)
    attn = []
    for qs, ks, vs, (cache, ctx, start) in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), calls):
        table = rope_table[cache] if isinstance(rope_table, list) else rope_table
        if native:
            out = native_eager(qs, ks, vs, caches[cache], ctx, table, start, a["num_q_heads"],
                               a["num_kv_heads"], a["head_size"])
            attn.append(out.reshape(b, out.shape[1], -1))
            continue
        out, caches[cache] = attention_plugin(
            qs, ks, vs, caches[cache], ctx, table, start, a["num_q_heads"], a["num_kv_heads"],
            a["head_size"], 0, a["enable_fp8_kv_cache"], a["sliding_window_size"], list(a["qkv_scales"]))
        attn.append(linear.r16(out.reshape(b, out.shape[1], -1)))
    attn = torch.cat(attn, dim=1)
    if gate is not None:
        attn = linear.r16(attn * linear.r16(torch.sigmoid(gate)))
    return linear.eager(attn, t, "self_attn.o_proj", quant)


# -- plugin-free form (contract native.md; its faces: edgellm_core/ops/native_attention.py) --------
def native_initial_state(cfg: ModelConfig, batch: int, bindings, capacity: int):
    """A native layer's carried state: its (K, V) caches, zeroed as the runtime's buffers are."""
    import torch

    dims = bindings.native_kv_cache_dims(batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
    return torch.zeros(dims, dtype=torch.float16), torch.zeros(dims, dtype=torch.float16)
