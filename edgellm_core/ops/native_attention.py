"""Plugin-free attention (Edge-LLM 0.7.1 `trt_native_ops`, contract edgellm-0.7/native.md), both faces.

Standard ONNX ops that TensorRT 10.15 and later implement natively and onnxruntime runs as they are:
`native_shared` (once per graph: position ids, the per-sequence mask, RoPE cos / sin) and `native_core`
(per layer: RotaryEmbedding, TensorScatter into the K and V caches, Attention); `native_eager` computes
what that graph computes. Here, not in the exporter's attention block, because the validation side builds
one of these graphs too (the smoke check's one-layer engine), and it never imports the exporter.
"""

from __future__ import annotations

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, INT64


def _r16(x):
    """Round to fp16 where the graph stores an fp16 activation (computing in fp32 in between)."""
    return x.half().float()


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


def native_eager(q, k, v, cache, context_lengths, table, start_index, hq: int, hkv: int, d: int):
    """Eager face of `native_core` for one call: q/k/v `[B, S, H*D]` (fp32 holding fp16 values), `cache`
    the layer's (K, V) `[B, Hkv, Cap, D]` fp16, updated in place (the runtime binds present to past);
    returns the `[B, S, Hq, D]` output (fp16 values). Same rules as the graph: fp32 cos / sin from table row
    0, RoPE and the Q scaling each rounded once to fp16, every new row written at start[b] + t, keys
    j <= start[b] + t and j < start[b] + context_lengths[b] read, scores and softmax in fp32."""
    import torch

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
        return _r16(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1))

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
    qs = _r16(qr * native_q_scale(d))
    scores = qs @ keys.transpose(-1, -2)  # [B, Hq, S, P]
    j = torch.arange(kv_len)
    allowed = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < end[:, None, None])  # [B, S, P]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = _r16(torch.softmax(scores, dim=-1) @ vals)  # [B, Hq, S, D]
    return out.transpose(1, 2)
