"""trt_edgellm::Int4GroupwiseGemmPlugin (Edge-LLM 0.7): y = x @ ((U - 8) * scales)^T, INT4 weights.

Contract quant.md §3.8. Inputs: x fp16 `[B, S, K]` (3-D), qweight int8 `[N/2, K]` holding
biased nibbles U (value U - 8) in the TinyChat interleaved layout, scales fp16 `[K/g, N]`;
INT attributes gemm_n, gemm_k, group_size. No zero point, no bias.

The layout, as reshapes (derived from the contract's prose; `quant/int4_pack.py` packs
from the same prose independently and the tests hold the two together):
bytes `[N/2, K]` -> nibbles low-first -> `[N/4, K/64 (t), 4 (row j), 16 (m), 4 (s)]` ->
transpose to `[N/4, 4, K/64, 16, 4]` = P `[N, K]`; inside every 32-wide K block P holds
U at offset `8 * (p % 4) + p // 4`, i.e. P viewed `[N, K/32, 8 (a), 4 (c)]` is U viewed
`[N, K/32, 4 (c), 8 (a)]` transposed.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, GraphBuilder
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "Int4GroupwiseGemmPlugin"
INPUTS = ("x", "qweight", "scales")
OUTPUTS = ("y",)
INT_ATTRS = ("gemm_n", "gemm_k", "group_size")


def check_shape(n: int, k: int, group: int) -> str | None:
    """Why the plugin cannot take these dimensions, or None."""
    if n % 4:
        return f"out_features {n} is not a multiple of 4 (the plugin packs 4 output rows together)"
    if k % 64:
        return f"in_features {k} is not a multiple of 64 (the plugin's K stripes are 64 wide)"
    if k % group:
        return f"in_features {k} is not a multiple of the group size {group}"
    return None


# -- face 1: torch op with eager reference --------------------------------------------------
@functools.cache
def register_torch_op():
    return define_torch_op("trt_edgellm", "int4_groupwise_gemm(Tensor x, Tensor qweight, Tensor scales, int gemm_n, "
                           "int gemm_k, int group_size) -> Tensor", _eager,
                           lambda x, qw, s, n, k, g: x.new_empty((*x.shape[:-1], n)))


def unpack_torch(qweight, n: int, k: int):
    """Biased nibbles U `[N, K]` (int32) from the packed int8 `[N/2, K]` buffer."""
    import torch

    b = qweight.view(torch.uint8).to(torch.int32)
    nib = torch.stack([b & 15, b >> 4], dim=-1)  # low nibble first
    p = nib.reshape(n // 4, k // 64, 4, 16, 4).permute(0, 2, 1, 3, 4).reshape(n, k)
    return p.reshape(n, k // 32, 8, 4).transpose(2, 3).reshape(n, k)


def dequantize_torch(qweight, scales, n: int, k: int, group: int):
    """W `[N, K]` fp32 = (U - 8) * scales[k // g, n]."""
    u = unpack_torch(qweight, n, k).float() - 8.0
    return u * scales.float().t().repeat_interleave(group, dim=1)


def _eager(x, qweight, scales, n, k, group):
    w = dequantize_torch(qweight, scales, n, k, group)
    return (x.float() @ w.t()).to(x.dtype)


# -- face 2: schema ---------------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, 1, "Edge-LLM INT4 groupwise GEMM (TinyChat layout, biased nibbles, fp16 scales).",
        inputs=[fp("x", "tensor(float16)"), fp("qweight", "tensor(int8)"), fp("scales", "tensor(float16)")],
        outputs=[fp("y", "tensor(float16)")],
        attributes=[onnx.defs.OpSchema.Attribute(a, A.INT, "") for a in INT_ATTRS],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation ----------------------------------------------------------------------
def emit(g: GraphBuilder, x: str, qweight: str, scales: str, *, n: int, k: int, group_size: int) -> str:
    return g.node(OP_TYPE, [x, qweight, scales], {"gemm_n": n, "gemm_k": k, "group_size": group_size},
                  domain=DOMAIN)


# -- face 4: lowering to standard ONNX ----------------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k, group = attrs["gemm_n"], attrs["gemm_k"], attrs["group_size"]
    name = f"{OP_TYPE}_{hashlib.sha1(f'{n}_{k}_{group}'.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    x, qweight, scales = INPUTS
    nd, i64 = g.node, g.i64
    b = nd("Cast", [qweight], {"to": INT32})
    b = nd("Mod", [nd("Add", [b, g.const(np.array(256, np.int32))]), g.const(np.array(256, np.int32))])  # unsigned
    lo = nd("Mod", [b, g.const(np.array(16, np.int32))])
    hi = nd("Div", [b, g.const(np.array(16, np.int32))])
    nib = nd("Concat", [nd("Unsqueeze", [lo, i64(-1)]), nd("Unsqueeze", [hi, i64(-1)])], {"axis": -1})
    p = nd("Reshape", [nd("Transpose", [nd("Reshape", [nib, i64(n // 4, k // 64, 4, 16, 4)])],
                          {"perm": [0, 2, 1, 3, 4]}), i64(n, k // 32, 8, 4)])
    u = nd("Reshape", [nd("Transpose", [p], {"perm": [0, 1, 3, 2]}), i64(n, k)])
    w = nd("Sub", [nd("Cast", [u], {"to": FLOAT}), g.const(np.array(8.0, np.float32))])
    s = nd("Transpose", [nd("Cast", [scales], {"to": FLOAT})], {"perm": [1, 0]})  # [N, K/g]
    s = nd("Reshape", [nd("Expand", [nd("Unsqueeze", [s, i64(-1)]), i64(n, k // group, group)]), i64(n, k)])
    wt = nd("Transpose", [nd("Mul", [w, s])], {"perm": [1, 0]})  # [K, N]
    nd("Cast", [nd("MatMul", [nd("Cast", [x], {"to": FLOAT}), wt])], {"to": FLOAT16}, outputs=[OUTPUTS[0]])
    return helper.make_function(LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)])
