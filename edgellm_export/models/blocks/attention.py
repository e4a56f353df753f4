"""GQA attention through the runtime's AttentionPlugin, both faces.

q/k/v projections (optional biases), optional per-head q/k RMSNorm (Qwen3; Qwen3.5's in the (1 + w)
convention), the plugin (RoPE, cache update, attention), the o projection. Gated attention (Qwen3.5):
q_proj yields per head D query channels then D gate channels, and the attention output is multiplied by
sigmoid(gate) before o_proj. `plugin_attrs` is the one place the plugin's attributes are
decided: the graph face writes them on the node, the eager face passes the same values to the eager
op, so an attribute cannot reach one face and not the other.

The plugin-free form (`--attention native`, contract native.md) replaces the plugin by standard ONNX ops:
`native_shared` (once per graph: position ids, the per-sequence mask, RoPE cos / sin) and `native_core`
(per layer: RotaryEmbedding, TensorScatter into the K and V caches, Attention); `native_eager` is its
eager face, computing what that graph computes.
"""

from __future__ import annotations

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, INT64

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
    `native`: the plugin-free form instead (`native_eager`; each cache is a (K, V) pair)."""
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
        if native:
            out = native_eager(qs, ks, vs, caches[cache], ctx, rope_table, start, a["num_q_heads"],
                               a["num_kv_heads"], a["head_size"])
            attn.append(out.reshape(b, out.shape[1], -1))
            continue
        out, caches[cache] = attention_plugin(
            qs, ks, vs, caches[cache], ctx, rope_table, start, a["num_q_heads"], a["num_kv_heads"],
            a["head_size"], 0, a["enable_fp8_kv_cache"], a["sliding_window_size"], list(a["qkv_scales"]))
        attn.append(linear.r16(out.reshape(b, out.shape[1], -1)))
    attn = torch.cat(attn, dim=1)
    if gate is not None:
        attn = linear.r16(attn * linear.r16(torch.sigmoid(gate)))
    return linear.eager(attn, t, "self_attn.o_proj", quant)


# -- plugin-free form (contract native.md) ----------------------------------------------------
def native_shared(g, emb: str, rope: str, ctx: str, start: str, rotary_dim: int) -> dict[str, str]:
    """What every native attention layer of one graph reads, built once.

    position ids `[B, S]` = start[b] + t (int64, as RotaryEmbedding requires); `write_at` = start as int64
    (TensorScatter's write indices); `kv_len` `[1]` = max_b(start[b] + context_lengths[b]), the cache rows
    any sequence attends to (context_lengths counts the new tokens of this call, 1 in decode: native.md);
    `mask` `[B, 1, S, kv_len]` fp16, 0 where key j may be read by query t of sequence b, i.e.
    j <= start[b] + t and j < start[b] + context_lengths[b], else -inf: per sequence, so padding rows written
    into the cache by a longer neighbour's prefill are never read (NVIDIA's single lower-right causal mask
    reads them); `cos` / `sin` `[Cap, R/2]` fp32 from the table's batch row 0 (the runtime binds one row)."""
    n, i64 = g.node, g.i64
    zero32, one32 = g.const(np.array(0, np.int32)), g.const(np.array(1, np.int32))
    seq = n("Squeeze", [n("Cast", [n("Shape", [emb], {"start": 1, "end": 2})], {"to": INT32}), i64(0)])  # int32 S
    steps = n("Range", [zero32, seq, one32])  # [S]
    pos32 = n("Add", [n("Unsqueeze", [start, i64(1)]), n("Unsqueeze", [steps, i64(0)])])  # [B, S]
    end = n("Add", [start, ctx])  # [B]: one past each sequence's last valid key
    kv_len32 = n("ReduceMax", [end], {"keepdims": 1})  # [1]
    keys = n("Range", [zero32, n("Squeeze", [kv_len32, i64(0)]), one32])  # [P]
    j = n("Unsqueeze", [keys, i64(0, 1)])  # [1, 1, P]
    causal = n("LessOrEqual", [j, n("Unsqueeze", [pos32, i64(2)])])  # [B, S, P]
    valid = n("Less", [j, n("Unsqueeze", [end, i64(1, 2)])])  # [B, 1, P]
    allowed = n("Unsqueeze", [n("And", [causal, valid]), i64(1)])  # [B, 1, S, P]
    mask = n("Where", [allowed, g.const(np.array(0, np.float16)), g.const(np.array(-np.inf, np.float16))])
    half = rotary_dim // 2
    table = n("Gather", [rope, g.const(np.array(0, np.int64))], {"axis": 0})  # [Cap, R]
    cos = n("Slice", [table, i64(0), i64(half), i64(1)])
    sin = n("Slice", [table, i64(half), i64(2 * half), i64(1)])
    return {"pos": n("Cast", [pos32], {"to": INT64}), "write_at": n("Cast", [start], {"to": INT64}),
            "kv_len": n("Cast", [kv_len32], {"to": INT64}), "mask": mask, "cos": cos, "sin": sin}


def native_core(g, shared: dict, q: str, k: str, v: str, k_cache: str, v_cache: str, hq: int, hkv: int, d: int,
                rotary_dim: int) -> tuple[str, str, str]:
    """One layer: `[B, S, H*D]` q/k/v -> (`[B, S, Hq, D]` attention output, present K, present V).

    RotaryEmbedding (rotate-half on the first R channels) on Q and K in `[B, H, S, D]`, computed in fp32 with
    the fp32 table and rounded once to fp16 (0.7.1's native layer rounds cos / sin to fp16 and rotates in
    fp16; fp32 is the plugin's rotation, and with FP8 activations downstream the extra fp16 roundings alone
    moved the logits by ~1e-3 in cosine); TensorScatter writes all S new rows of each sequence at its start
    index (axis -2, padding rows included); the first kv_len rows of each cache feed Attention with Q
    pre-scaled by 1/sqrt(D) in fp16, scale 1.0 and the shared additive mask, as 0.7.1's native layer does
    (GQA by the head counts of Q and K)."""
    n, i64 = g.node, g.i64

    def heads(x, h):
        return n("Transpose", [n("Reshape", [x, i64(0, 0, h, d)])], {"perm": [0, 2, 1, 3]})

    rot = {"rotary_embedding_dim": rotary_dim} if rotary_dim < d else {}  # NVIDIA's layer assumes R == D

    def rope(x):
        x32 = n("Cast", [x], {"to": FLOAT})
        return n("Cast", [n("RotaryEmbedding", [x32, shared["cos"], shared["sin"], shared["pos"]], rot)],
                 {"to": FLOAT16})

    qr = rope(heads(q, hq))
    kr = rope(heads(k, hkv))
    pk = n("TensorScatter", [k_cache, kr, shared["write_at"]])
    pv = n("TensorScatter", [v_cache, heads(v, hkv), shared["write_at"]])
    keys = n("Slice", [pk, i64(0), shared["kv_len"], i64(2)])
    values = n("Slice", [pv, i64(0), shared["kv_len"], i64(2)])
    qs = n("Mul", [qr, g.const(np.array(native_q_scale(d), np.float16))])
    out = n("Attention", [qs, keys, values, shared["mask"]], {"scale": 1.0, "is_causal": 0})
    return n("Transpose", [out], {"perm": [0, 2, 1, 3]}), pk, pv


def native_q_scale(d: int) -> float:
    """1/sqrt(D) as the fp16 constant the graph multiplies Q by."""
    return float(np.float16(1.0 / np.sqrt(d)))


def native_initial_state(cfg: ModelConfig, batch: int, bindings, capacity: int):
    """A native layer's carried state: its (K, V) caches, zeroed as the runtime's buffers are."""
    import torch

    dims = bindings.native_kv_cache_dims(batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
    return torch.zeros(dims, dtype=torch.float16), torch.zeros(dims, dtype=torch.float16)


def native_eager(q, k, v, cache, context_lengths, table, start_index, hq: int, hkv: int, d: int):
    """Eager face of `native_core` for one call: q/k/v `[B, S, H*D]` (fp32 holding fp16 values), `cache`
    the layer's (K, V) `[B, Hkv, Cap, D]` fp16, updated in place (the runtime binds present to past);
    returns the `[B, S, Hq, D]` output (fp16 values). Same rules as the graph: fp32 cos / sin from table row
    0, RoPE and the Q scaling each rounded once to fp16, every new row written at start[b] + t, keys
    j <= start[b] + t and j < start[b] + context_lengths[b] read, scores and softmax in fp32."""
    import torch

    r16 = linear.r16
    b, s = q.shape[0], q.shape[1]
    r = table.shape[-1]
    start = start_index.long()
    pos = start[:, None] + torch.arange(s)[None, :]  # [B, S]
    cos = table[0, :, : r // 2].float()[pos][:, None]  # [B, 1, S, R/2]
    sin = table[0, :, r // 2 : r].float()[pos][:, None]

    def heads(x, h):
        return x.reshape(b, s, h, d).transpose(1, 2)  # [B, H, S, D]

    def rope(x):
        x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
        return r16(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1))

    qr, kr, vh = rope(heads(q, hq)), rope(heads(k, hkv)), heads(v, hkv)
    k_cache, v_cache = cache
    for i in range(b):
        k_cache[i, :, int(start[i]) : int(start[i]) + s] = kr[i].half()
        v_cache[i, :, int(start[i]) : int(start[i]) + s] = vh[i].half()
    end = start + context_lengths.long()  # [B]
    kv_len = int(end.max())
    group = hq // hkv
    keys = k_cache[:, :, :kv_len].float().repeat_interleave(group, dim=1)  # [B, Hq, P, D]
    vals = v_cache[:, :, :kv_len].float().repeat_interleave(group, dim=1)
    qs = r16(qr * native_q_scale(d))
    scores = qs @ keys.transpose(-1, -2)  # [B, Hq, S, P]
    j = torch.arange(kv_len)
    allowed = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < end[:, None, None])  # [B, S, P]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = r16(torch.softmax(scores, dim=-1) @ vals)  # [B, Hq, S, D]
    return out.transpose(1, 2)
