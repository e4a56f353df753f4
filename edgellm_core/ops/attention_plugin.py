"""trt_edgellm::AttentionPlugin (Edge-LLM 0.7): RoPE, KV-cache write and attention in one op.

Semantics are the C++ plugin's (contract text.md §3.3), not what seems natural:
- the mode comes from runtime shapes: `kvcache_start_index` of length 0 is a
  plain prefill (positions 0..S-1); length B with S > 1 is a chunked prefill
  (positions start_b + t); length B with S == 1 is decode (position
  context_lengths[b] - 1, whatever kvcache_start_index says);
- RoPE is rotate-half on the first R channels of each head, R = table width,
  the table row holding [cos(R/2) | sin(R/2)], computed in fp32;
- the cache `[B, 2, Hkv, Cap, D]` is updated in place: K stored rotated, V as is,
  every new token (padding included) written at its position;
- query at position p sees cache slots 0..p of its own sequence, scale 1/sqrt(D);
- with `enable_fp8_kv_cache`, the cache holds fp8 e4m3 codes: K/V are written as
  fp8(value / scale) (saturating, as CUDA's fp8 conversion does) and read back as
  fp8 * scale, the scales being qkv_scales[1] and qkv_scales[2] (quant.md §3.10).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT8E4M3FN, FLOAT16, INT64, GraphBuilder
from edgellm_core.ops.schemas import FP8_E4M3_MAX, LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "AttentionPlugin"
INPUTS = ("q", "k", "v", "past_key_value", "context_lengths", "rope_rotary_cos_sin", "kvcache_start_index")
OUTPUTS = ("attn_output", "present_key_value")
# Query heads per KV head that 0.7.1's XQA decode kernels are built for, per head_dim (its cubin list,
# xqa_kernel_dt_fp16_d_{D}_..._nqpkv_{ratio}_..., the same for every SM it ships); the context FMHA takes
# head sizes 64, 128 and 256, so head_dim 32 (XQA only) cannot run either.
KERNEL_HEAD_RATIOS = {64: (1, 2, 3, 4, 5, 6, 7, 8), 128: (1, 2, 3, 4, 5, 6, 7, 8, 16), 256: (4, 6)}


def kernel_problems(head_dim: int, num_q_heads: int, num_kv_heads: int) -> list[str]:
    """Why the 0.7 plugin's kernels cannot run this attention shape (they throw at engine build): every reason."""
    problems = []
    if head_dim not in KERNEL_HEAD_RATIOS:
        problems.append(f"head_dim {head_dim} is not supported by Edge-LLM 0.7's attention kernels (context FMHA "
                        f"and XQA decode together need {', '.join(map(str, KERNEL_HEAD_RATIOS))})")
    ratio = num_q_heads // num_kv_heads
    allowed = KERNEL_HEAD_RATIOS.get(head_dim, sorted({r for rs in KERNEL_HEAD_RATIOS.values() for r in rs}))
    if ratio not in allowed:
        at = f"head_dim {head_dim}" if head_dim in KERNEL_HEAD_RATIOS else "any head_dim"
        problems.append(f"{num_q_heads} query heads over {num_kv_heads} KV heads (ratio {ratio}) is outside what "
                        f"Edge-LLM 0.7's decode kernels support at {at} ({', '.join(map(str, allowed))})")
    return problems


INT_ATTRS = (
    "num_q_heads",
    "num_kv_heads",
    "head_size",
    "enable_tree_attention",
    "enable_fp8_kv_cache",
    "sliding_window_size",
)


# -- face 1: torch custom op with eager reference -----------------------------------------
@functools.cache
def register_torch_op():
    """Define `torch.ops.trt_edgellm.attention_plugin` (once) and return it."""
    import torch

    def impl(q, k, v, past, ctx, table, start, hq, hkv, d, tree, fp8_kv, window, scales):
        if tree:
            raise NotImplementedError("tree attention has no eager reference yet")
        return _eager(q, k, v, past, ctx, table, start, hq, hkv, d, tuple(scales[1:]) if fp8_kv else None)

    def fake(q, k, v, past, ctx, table, start, hq, hkv, d, *rest):
        return q.new_empty((q.shape[0], q.shape[1], hq, d)), torch.empty_like(past)

    return define_torch_op(
        "trt_edgellm",
        "attention_plugin(Tensor q, Tensor k, Tensor v, Tensor past_key_value, Tensor context_lengths, "
        "Tensor rope_rotary_cos_sin, Tensor kvcache_start_index, int num_q_heads, int num_kv_heads, "
        "int head_size, int enable_tree_attention, int enable_fp8_kv_cache, int sliding_window_size, "
        "float[] qkv_scales) -> (Tensor, Tensor)", impl, fake)




def _eager(q, k, v, past, context_lengths, table, start_index, hq, hkv, d, kv_scales=None):
    """Reference implementation in plain torch, one sequence at a time for clarity.

    `kv_scales` (k, v) switches on the FP8 cache; `past` may then be float8_e4m3fn or any
    wider dtype holding fp8 values.
    """
    import torch

    b, s = q.shape[0], q.shape[1]
    cap = past.shape[3]
    r = table.shape[-1]
    store_dtype = past.dtype
    present = past.float() if kv_scales else past.clone()

    def store(x, which):
        if not kv_scales:
            return x.to(store_dtype)
        # Saturating fp8 conversion of value / scale, kept as fp32 holding fp8 values.
        return (x.float() / kv_scales[which]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()

    def load(i, which):
        cached = present[i, which].float()
        return cached * kv_scales[which] if kv_scales else cached
    out = torch.empty((b, s, hq, d), dtype=q.dtype)
    for i in range(b):
        if start_index.numel() == 0:
            first = 0
        elif s == 1:
            first = int(context_lengths[i]) - 1
        else:
            first = int(start_index[i])
        pos = torch.arange(first, first + s)
        rows = table[0 if table.shape[0] == 1 else i, pos].float()  # [S, R]
        cos, sin = rows[:, None, : r // 2], rows[:, None, r // 2 :]

        qi = _rotate(q[i].float().view(s, hq, d), cos, sin, r)
        ki = store(_rotate(k[i].float().view(s, hkv, d), cos, sin, r), 0)
        vi = store(v[i].view(s, hkv, d), 1)
        keep = pos < cap
        present[i, 0, :, pos[keep]] = ki[keep].transpose(0, 1)
        present[i, 1, :, pos[keep]] = vi[keep].transpose(0, 1)
        keys = load(i, 0)  # [Hkv, Cap, D]
        vals = load(i, 1)
        group = hq // hkv
        keys = keys.repeat_interleave(group, dim=0)
        vals = vals.repeat_interleave(group, dim=0)
        scores = torch.einsum("shd,hcd->hsc", qi, keys) / (d**0.5)
        allowed = torch.arange(cap)[None, :] <= pos[:, None]  # [S, Cap]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("hsc,hcd->shd", probs, vals).to(q.dtype)
    return out, present.to(store_dtype) if kv_scales else present


def _rotate(x, cos, sin, r):
    """Rotate-half RoPE on the first r channels of each head; the rest pass through."""
    import torch

    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


# -- face 2: ONNX schema -------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    A = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        "Edge-LLM fused RoPE + KV-cache update + attention (0.7 contract, 7 inputs).",
        inputs=[
            fp("q", "T"), fp("k", "T"), fp("v", "T"), fp("past_key_value", "C"),
            fp("context_lengths", "tensor(int32)"), fp("rope_rotary_cos_sin", "tensor(float)"),
            fp("kvcache_start_index", "tensor(int32)"),
        ],
        outputs=[fp("attn_output", "T"), fp("present_key_value", "C")],
        type_constraints=[
            ("T", ["tensor(float16)"], "activations"),
            ("C", ["tensor(float16)", "tensor(float8e4m3fn)"], "KV cache"),
        ],
        attributes=[attr(n, A.INT, "") for n in INT_ATTRS[:4]]
        + [attr("enable_fp8_kv_cache", A.INT, ""), attr("sliding_window_size", A.INT, ""),
           attr("qkv_scales", A.FLOATS, "")],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation to the runtime node -----------------------------------------------
def emit(g: GraphBuilder, inputs: list[str], *, num_q_heads: int, num_kv_heads: int,
         head_size: int, enable_fp8_kv_cache: int = 0, sliding_window_size: int = -1,
         qkv_scales: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[str, str]:
    """Add one AttentionPlugin node with exactly the 7 inputs and the attribute set of 0.7."""
    assert len(inputs) == len(INPUTS)
    attn, present = g.node(
        OP_TYPE, inputs,
        {
            "num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_size": head_size,
            "enable_tree_attention": 0, "enable_fp8_kv_cache": enable_fp8_kv_cache,
            "sliding_window_size": sliding_window_size, "qkv_scales": [float(x) for x in qkv_scales],
        },
        n_out=2, domain=DOMAIN,
    )
    return attn, present


# -- face 4: lowering to standard ONNX -----------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """An ONNX function computing this node's semantics with standard ops only."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("enable_tree_attention", 0):
        raise NotImplementedError("tree attention has no CPU lowering yet")
    hq, hkv, d = attrs["num_q_heads"], attrs["num_kv_heads"], attrs["head_size"]
    kv_scales = tuple(attrs["qkv_scales"][1:]) if attrs.get("enable_fp8_kv_cache", 0) else None
    key = f"{hq}_{hkv}_{d}_{kv_scales}"
    name = f"{OP_TYPE}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    _lower_body(g, hq, hkv, d, kv_scales)
    return helper.make_function(
        LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
        [helper.make_opsetid("", ONNX_OPSET)],
    )


def _lower_body(g: GraphBuilder, hq: int, hkv: int, d: int, kv_scales=None) -> None:
    q, k, v, past, ctx, table, start_idx = INPUTS
    n = g.node
    i64 = g.i64
    big = np.iinfo(np.int64).max
    batch = n("Shape", [q], {"start": 0, "end": 1})  # [1]
    seq = n("Shape", [q], {"start": 1, "end": 2})  # [1]
    q4 = n("Reshape", [q, i64(0, 0, hq, d)])
    k4 = n("Reshape", [k, i64(0, 0, hkv, d)])
    v4 = n("Reshape", [v, i64(0, 0, hkv, d)])

    # First position of each sequence's new tokens, by mode.
    ctx64 = n("Cast", [ctx], {"to": INT64})
    start64 = n("Cast", [start_idx], {"to": INT64})
    zeros = n("ConstantOfShape", [batch], {"value": helper.make_tensor("z", INT64, [1], [0])})
    start = n("Slice", [n("Concat", [start64, zeros], {"axis": 0}), i64(0), batch, i64(0)])
    has_cache = n("Greater", [n("Shape", [start64]), i64(0)])
    is_decode = n("And", [has_cache, n("Equal", [seq, i64(1)])])
    first = n("Where", [is_decode, n("Sub", [ctx64, i64(1)]), start])  # [B]
    zero, one = g.const(np.array(0, np.int64)), g.const(np.array(1, np.int64))
    steps = n("Range", [zero, n("Squeeze", [seq, i64(0)]), one])
    pos = n("Add", [n("Unsqueeze", [first, i64(1)]), n("Unsqueeze", [steps, i64(0)])])  # [B,S]

    # RoPE rows for every (sequence, token); table dim 0 is 1 or B.
    r = n("Shape", [table], {"start": 2, "end": 3})
    half = n("Div", [r, i64(2)])
    table_b = n("Expand", [table, n("Concat", [batch, i64(1, 1)], {"axis": 0})])
    rows = n("GatherND", [table_b, n("Unsqueeze", [pos, i64(2)])], {"batch_dims": 1})  # [B,S,R]
    cos = n("Unsqueeze", [n("Slice", [rows, i64(0), half, i64(2)]), i64(2)])
    sin = n("Unsqueeze", [n("Slice", [rows, half, r, i64(2)]), i64(2)])

    def rotate(x4):
        xf = n("Cast", [x4], {"to": FLOAT})
        x1 = n("Slice", [xf, i64(0), half, i64(3)])
        x2 = n("Slice", [xf, half, r, i64(3)])
        rest = n("Slice", [xf, r, i64(big), i64(3)])
        o1 = n("Sub", [n("Mul", [x1, cos]), n("Mul", [x2, sin])])
        o2 = n("Add", [n("Mul", [x2, cos]), n("Mul", [x1, sin])])
        return n("Concat", [o1, o2, rest], {"axis": 3})

    q_rot = rotate(q4)
    if kv_scales:
        # The cache holds fp8 codes. Work on their exact fp32 values: new K/V become
        # fp8(x / scale) (Cast saturates), old slots are widened as they are.
        def to_codes(x, scale):
            scaled = n("Div", [n("Cast", [x], {"to": FLOAT}), g.const(np.array(scale, np.float32))])
            return n("Cast", [n("Cast", [scaled], {"to": FLOAT8E4M3FN})], {"to": FLOAT})

        k_new, v_new = to_codes(rotate(k4), kv_scales[0]), to_codes(v4, kv_scales[1])
        past_values = n("Cast", [past], {"to": FLOAT})
    else:
        k_new, v_new = n("Cast", [rotate(k4)], {"to": FLOAT16}), v4
        past_values = past

    # Cache update: slot j takes new token j - first[b] when that is in [0, S).
    cap = n("Shape", [past], {"start": 3, "end": 4})
    slots = n("Range", [zero, n("Squeeze", [cap, i64(0)]), one])
    t_of_slot = n("Sub", [n("Unsqueeze", [slots, i64(0)]), n("Unsqueeze", [first, i64(1)])])
    valid = n("And", [n("GreaterOrEqual", [t_of_slot, i64(0)]), n("Less", [t_of_slot, seq])])
    t_clamped = n("Max", [n("Min", [t_of_slot, n("Sub", [seq, i64(1)])]), i64(0)])
    t_idx = n("Unsqueeze", [t_clamped, i64(2)])
    keep = n("Unsqueeze", [valid, i64(1, 3)])  # [B,1,Cap,1]

    def updated(new4, which):
        picked = n("Transpose", [n("GatherND", [new4, t_idx], {"batch_dims": 1})], {"perm": [0, 2, 1, 3]})
        old = n("Squeeze", [n("Slice", [past_values, i64(which), i64(which + 1), i64(1)]), i64(1)])
        return n("Where", [keep, picked, old])  # [B,Hkv,Cap,D]

    new_k = updated(k_new, 0)
    new_v = updated(v_new, 1)
    present = n("Concat", [n("Unsqueeze", [new_k, i64(1)]), n("Unsqueeze", [new_v, i64(1)])], {"axis": 1})
    n("Cast", [present], {"to": FLOAT8E4M3FN if kv_scales else FLOAT16}, outputs=[OUTPUTS[1]])
    if kv_scales:  # attention reads fp8 * scale
        new_k = n("Mul", [new_k, g.const(np.array(kv_scales[0], np.float32))])
        new_v = n("Mul", [new_v, g.const(np.array(kv_scales[1], np.float32))])

    # Attention in fp32; query head h reads KV head h // (hq / hkv).
    group = hq // hkv
    qg = n("Reshape", [n("Transpose", [q_rot], {"perm": [0, 2, 1, 3]}), i64(0, hkv, -1, d)])
    kt = n("Transpose", [n("Cast", [new_k], {"to": FLOAT})], {"perm": [0, 1, 3, 2]})
    scores = n("Mul", [n("MatMul", [qg, kt]), g.const(np.array(1.0 / np.sqrt(d), np.float32))])
    shape5 = n("Concat", [batch, i64(hkv, group, -1), cap], {"axis": 0})
    scores5 = n("Reshape", [scores, shape5])  # [B,Hkv,G,S,Cap]
    allowed = n("LessOrEqual", [n("Unsqueeze", [slots, i64(0, 1)]), n("Unsqueeze", [pos, i64(2)])])
    allowed5 = n("Unsqueeze", [allowed, i64(1, 2)])
    masked = n("Where", [allowed5, scores5, g.const(np.array(-np.inf, np.float32))])
    probs = n("Reshape", [n("Softmax", [masked], {"axis": -1}),
                          n("Concat", [batch, i64(hkv, -1), cap], {"axis": 0})])
    ctx_out = n("MatMul", [probs, n("Cast", [new_v], {"to": FLOAT})])  # [B,Hkv,G*S,D]
    heads = n("Transpose", [n("Reshape", [ctx_out, i64(0, hq, -1, d)])], {"perm": [0, 2, 1, 3]})
    n("Cast", [heads], {"to": FLOAT16}, outputs=[OUTPUTS[0]])

