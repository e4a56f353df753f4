"""trt_edgellm::ViTAttentionPlugin (Edge-LLM 0.7.1): ragged, unmasked multi-head attention for vision towers.

Semantics are the 0.7.1 plugin's (`cpp/plugins/vitAttentionPlugin/vitAttentionPlugin.cpp`, contract
families.md §5.1):
- q, k, v fp16 `[T, H, D]` (RoPE already applied in the graph), the T tokens of several sequences packed
  back to back; `cu_seqlens` int32 `[n + 1]` their prefix sums (cu_seqlens[0] = 0, cu_seqlens[n] = T);
- each token attends to every token of its own sequence and to none other (no causal mask, no padding), with
  the scale 1/sqrt(D), as the context FMHA kernels it dispatches to (padding mask, separate Q/K/V) compute it;
- `max_seqlen_carrier` carries the longest sequence's length in its SHAPE (`dims.d[0]`): the kernel sizes its
  tiles from it, so it must be at least every cu_seqlens gap; its contents are never read;
- output fp16 `[T, H, D]`; attributes `num_heads`, `head_size` (the plugin's only fields), version "1".

Eager face: scores and softmax in fp32, the output rounded once to fp16. The lowering builds the block-diagonal
mask from cu_seqlens (a token's sequence = how many prefix sums beyond 0 it has reached) and computes the same.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, GraphBuilder
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "ViTAttentionPlugin"
INPUTS = ("q", "k", "v", "cu_seqlens", "max_seqlen_carrier")
OUTPUTS = ("attn_output",)


def check_lengths(cu_seqlens, max_seqlen: int) -> str | None:
    """Why these packed lengths break the plugin's contract (None when they hold)."""
    cu = [int(x) for x in cu_seqlens]
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        return f"cu_seqlens {cu} must start at 0 and never decrease"
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    if longest > max_seqlen:
        return f"a sequence of {longest} tokens exceeds the max_seqlen_carrier length {max_seqlen}"
    return None


# -- face 1: torch custom op with eager reference -----------------------------------------
@functools.cache
def register_torch_op():
    """Define `torch.ops.trt_edgellm.vit_attention_plugin` (once) and return it."""
    return define_torch_op(
        "trt_edgellm",
        "vit_attention_plugin(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor max_seqlen_carrier, "
        "int num_heads, int head_size) -> Tensor", _eager, lambda q, *rest: q.new_empty(q.shape))


def _eager(q, k, v, cu_seqlens, max_seqlen_carrier, num_heads, head_size):
    """Per sequence: softmax(q k^T / sqrt(D)) v in fp32, rounded to fp16; new tensor, inputs untouched."""
    import torch

    t, h, d = q.shape
    if (h, d) != (num_heads, head_size) or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"ViTAttentionPlugin shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"for num_heads {num_heads}, head_size {head_size}")
    cu = cu_seqlens.tolist()
    why = check_lengths(cu, int(max_seqlen_carrier.shape[0]))
    if why is None and cu[-1] != t:
        why = f"cu_seqlens ends at {cu[-1]}, but q holds {t} tokens"
    if why:
        raise ValueError(f"ViTAttentionPlugin: {why}")
    out = torch.empty((t, h, d), dtype=torch.float16)
    scale = 1.0 / math.sqrt(d)
    for a, b in zip(cu, cu[1:]):
        qs, ks, vs = (x[a:b].float().transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        probs = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        out[a:b] = (probs @ vs).transpose(0, 1).half()
    return out


# -- face 2: ONNX schema -------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    A = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, 1, "Edge-LLM ViT attention: separate Q/K/V [T, H, D], ragged by cu_seqlens, no mask.",
        inputs=[fp("q", "T"), fp("k", "T"), fp("v", "T"), fp("cu_seqlens", "tensor(int32)"),
                fp("max_seqlen_carrier", "tensor(int32)")],
        outputs=[fp("attn_output", "T")],
        type_constraints=[("T", ["tensor(float16)"], "the plugin runs FP16 only")],
        attributes=[attr("num_heads", A.INT, "", required=True), attr("head_size", A.INT, "", required=True)],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation to the runtime node -----------------------------------------------
def emit(g: GraphBuilder, q: str, k: str, v: str, cu_seqlens: str, max_seqlen_carrier: str, *, num_heads: int,
         head_size: int) -> str:
    """One ViTAttentionPlugin node over `[T, H, D]` fp16 q/k/v; returns its `[T, H, D]` output."""
    return g.node(OP_TYPE, [q, k, v, cu_seqlens, max_seqlen_carrier],
                  {"num_heads": num_heads, "head_size": head_size}, domain=DOMAIN)


# -- face 4: lowering to standard ONNX -----------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """Standard ops: a `[T, T]` mask of same-sequence pairs from cu_seqlens, then masked fp32 attention."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    heads, d = int(attrs["num_heads"]), int(attrs["head_size"])
    name = f"{OP_TYPE}_{hashlib.sha1(f'{heads}_{d}'.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    q, k, v, cu, _ = INPUTS
    n, i64 = g.node, g.i64
    count = n("Squeeze", [n("Shape", [q], {"start": 0, "end": 1}), i64(0)])
    tokens = n("Cast", [n("Range", [g.const(np.array(0, np.int64)), count, g.const(np.array(1, np.int64))])],
               {"to": onnx.TensorProto.INT32})  # [T]
    ends = n("Slice", [cu, i64(1), i64(np.iinfo(np.int64).max), i64(0)])  # [n]
    # sequence of token t = number of ends <= t (ends strictly increase where sequences are non-empty)
    seq = n("ReduceSum", [n("Cast", [n("LessOrEqual", [n("Unsqueeze", [ends, i64(0)]),
                                                       n("Unsqueeze", [tokens, i64(1)])])], {"to": FLOAT}),
                          i64(1)], {"keepdims": 0})  # [T]
    same = n("Equal", [n("Unsqueeze", [seq, i64(1)]), n("Unsqueeze", [seq, i64(0)])])  # [T, T]
    bias = n("Where", [same, g.const(np.array(0.0, np.float32)), g.const(np.array(-np.inf, np.float32))])

    def heads_first(x):
        return n("Transpose", [n("Cast", [x], {"to": FLOAT})], {"perm": [1, 0, 2]})  # [H, T, D]

    scores = n("Mul", [n("MatMul", [heads_first(q), n("Transpose", [n("Cast", [k], {"to": FLOAT})],
                                                                     {"perm": [1, 2, 0]})]),
                       g.const(np.array(1.0 / math.sqrt(d), np.float32))])
    probs = n("Softmax", [n("Add", [scores, bias])], {"axis": -1})
    out = n("Transpose", [n("MatMul", [probs, heads_first(v)])], {"perm": [1, 0, 2]})
    n("Cast", [out], {"to": FLOAT16}, outputs=[OUTPUTS[0]])
    return helper.make_function(LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)])
