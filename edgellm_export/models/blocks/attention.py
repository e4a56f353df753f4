"""GQA attention through the runtime's AttentionPlugin, both faces.

q/k/v projections (optional biases), optional per-head q/k RMSNorm (Qwen3), the plugin (RoPE, cache
update, attention), the o projection. `plugin_attrs` is the one place the plugin's attributes are
decided: the graph face writes them on the node, the eager face passes the same values to the eager
op, so an attribute cannot reach one face and not the other.
"""

from __future__ import annotations

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


def emit(e, io, contract, layer: int, y: str, kv_scales) -> str:
    """Graph face: the attention output after o_proj, `[B, S, H]`, from the normed input `y`."""
    g, c, w = e.g, e.cfg, e.w
    p, h = f"layers.{layer}.", c.hidden_size
    q = linear.emit(e, y, p + "self_attn.q_proj", c.q_dim, h, c.qkv_bias)
    k = linear.emit(e, y, p + "self_attn.k_proj", c.kv_dim, h, c.qkv_bias)
    v = linear.emit(e, y, p + "self_attn.v_proj", c.kv_dim, h, c.qkv_bias)
    if c.has_qk_norm:
        q = norms.emit_per_head(g, q, w.vector(p + "self_attn.q_norm.weight", c.head_dim), c.rms_norm_eps,
                                c.num_attention_heads, c.head_dim)
        k = norms.emit_per_head(g, k, w.vector(p + "self_attn.k_norm.weight", c.head_dim), c.rms_norm_eps,
                                c.num_key_value_heads, c.head_dim)
    attn = contract.attention(g, io, layer, q, k, v, plugin_attrs(c, kv_scales))
    attn = g.node("Reshape", [attn, g.i64(0, 0, c.q_dim)])
    return linear.emit(e, attn, p + "self_attn.o_proj", h, c.q_dim, c.o_bias)


def eager(y, sizes: list[int], t: dict, quant: dict, cfg: ModelConfig, kv_scales, caches: list, rope_table,
          calls: list, attention_plugin):
    """Eager face over many runtime calls at once: `y` holds the normed hidden states of every call,
    concatenated along the sequence (`sizes` per call); projections run on all of them together, the
    plugin walks `calls` (cache index, context_lengths, start index) in order, updating `caches`."""
    import torch

    c, b = cfg, y.shape[0]
    q = linear.eager(y, t, "self_attn.q_proj", quant)
    k = linear.eager(y, t, "self_attn.k_proj", quant)
    v = linear.eager(y, t, "self_attn.v_proj", quant)
    if c.has_qk_norm:
        q = norms.eager_per_head(q, t["self_attn.q_norm.weight"], c.rms_norm_eps, c.num_attention_heads, c.head_dim)
        k = norms.eager_per_head(k, t["self_attn.k_norm.weight"], c.rms_norm_eps, c.num_key_value_heads,
                                 c.head_dim)
    a = plugin_attrs(c, kv_scales)
    attn = []
    for qs, ks, vs, (cache, ctx, start) in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), calls):
        out, caches[cache] = attention_plugin(
            qs, ks, vs, caches[cache], ctx, rope_table, start, a["num_q_heads"], a["num_kv_heads"],
            a["head_size"], 0, a["enable_fp8_kv_cache"], a["sliding_window_size"], list(a["qkv_scales"]))
        attn.append(linear.r16(out.reshape(b, out.shape[1], -1)))
    return linear.eager(torch.cat(attn, dim=1), t, "self_attn.o_proj", quant)
