"""MXFP8 ops (Edge-LLM 0.7, TensorRT's `trt` domain): TRT_MXFP8DynamicQuantize and
TRT_MXFP8DequantizeLinear. Contract quant.md §3.3.

A block of `block_size` (32) elements along the last axis shares one E8M0 scale, stored
as a biased exponent byte e (scale 2^(e - 127)); elements are float8 e4m3.
Dequantize: x_fp8 * 2^(e - 127). Dynamic quantize follows the OCP MX rule: the shared
exponent is floor(log2(amax)) - 8 (8 = e4m3's largest exponent), clamped to [-127, 127],
elements x / 2^exp converted to e4m3 with saturation. (TensorRT computes activation scales
at run time; this is our CPU model of it, within the format's stated tolerance.)
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT8E4M3FN, FLOAT16, GraphBuilder
from edgellm_core.ops.schemas import FP8_E4M3_MAX, LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt"
QUANTIZE = "TRT_MXFP8DynamicQuantize"
DEQUANTIZE = "TRT_MXFP8DequantizeLinear"
BLOCK = 32
E4M3_EMAX = 8


# -- face 1: torch ops with eager references ------------------------------------------------
def quantize_eager(x, block_size: int = BLOCK):
    import torch

    xf = x.float().reshape(*x.shape[:-1], -1, block_size)
    amax = xf.abs().amax(-1, keepdim=True)
    _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2(amax)) = e - 1
    exp = torch.where(amax > 0, e - 1 - E4M3_EMAX, torch.full_like(e, -127)).clamp(-127, 127)
    q = (xf / torch.exp2(exp.float())).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), (exp + 127).to(torch.uint8).reshape(*x.shape[:-1], -1)


def dequantize_eager(x, scale, block_size: int = BLOCK):
    import torch

    s = torch.exp2(scale.float() - 127.0).repeat_interleave(block_size, dim=-1)
    return (x.float() * s).to(torch.float16)


@functools.cache
def register_torch_op():
    return (define_torch_op("trt", "mxfp8_dynamic_quantize(Tensor x, int block_size) -> (Tensor, Tensor)",
                            quantize_eager),
            define_torch_op("trt", "mxfp8_dequantize_linear(Tensor x, Tensor scale, int block_size) -> Tensor",
                            dequantize_eager))


# -- face 2: schemas -------------------------------------------------------------------------
def _schemas() -> list[onnx.defs.OpSchema]:
    fp = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.AttrType
    attr = onnx.defs.OpSchema.Attribute
    quant = onnx.defs.OpSchema(
        QUANTIZE, DOMAIN, 1, "TensorRT dynamic MXFP8 quantization (E8M0 block scales).",
        inputs=[fp("x", "T")], outputs=[fp("y", "tensor(float8e4m3fn)"), fp("scale", "tensor(uint8)")],
        type_constraints=[("T", ["tensor(float16)", "tensor(float)"], "input")],
        attributes=[attr("axis", A.INT, ""), attr("block_size", A.INT, ""), attr("output_dtype", A.INT, "")],
    )
    deq = onnx.defs.OpSchema(
        DEQUANTIZE, DOMAIN, 1, "TensorRT MXFP8 dequantization (E8M0 block scales).",
        # The output type follows output_dtype; we only emit FLOAT16, and a fixed type lets the
        # checker infer types past this node.
        inputs=[fp("x", "tensor(float8e4m3fn)"), fp("scale", "tensor(uint8)")], outputs=[fp("y", "tensor(float16)")],
        attributes=[attr("axis", A.INT, ""), attr("block_size", A.INT, ""), attr("output_dtype", A.INT, "")],
    )
    return [quant, deq]


@functools.cache
def register_schema() -> None:
    register_missing(*_schemas())


# -- face 3: translation ----------------------------------------------------------------------
def emit_activation_qdq(g: GraphBuilder, x: str) -> str:
    q, s = g.node(QUANTIZE, [x], {"axis": -1, "block_size": BLOCK, "output_dtype": FLOAT8E4M3FN},
                  n_out=2, domain=DOMAIN)
    return emit_dequantize(g, q, s, BLOCK)


def emit_dequantize(g: GraphBuilder, x: str, scale: str, block_size: int) -> str:
    return g.node(DEQUANTIZE, [x, scale], {"axis": -1, "block_size": block_size, "output_dtype": FLOAT16},
                  domain=DOMAIN)


# -- face 4: lowering --------------------------------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", -1) != -1:
        raise NotImplementedError(f"{node.op_type} along axis {attrs['axis']} has no CPU lowering")
    block = int(attrs.get("block_size", BLOCK))
    name = f"{node.op_type}_{hashlib.sha1(repr(sorted(attrs.items())).encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    n, i64 = g.node, g.i64
    two = g.const(np.array(2.0, np.float32))
    if node.op_type == QUANTIZE:
        xf = n("Cast", ["x"], {"to": FLOAT})
        blocks = n("Reshape", [xf, n("Concat", [n("Shape", [xf], {"end": -1}), i64(-1, block)], {"axis": 0})])
        amax = n("ReduceMax", [n("Abs", [blocks]), i64(-1)], {"keepdims": 1})
        # floor(log2(amax)) from Log, then corrected by one either way where rounding misled it.
        tiny = g.const(np.array(np.finfo(np.float32).tiny, np.float32))
        e = n("Floor", [n("Div", [n("Log", [n("Max", [amax, tiny])]), g.const(np.array(np.log(2.0), np.float32))])])
        one = g.const(np.array(1.0, np.float32))
        e = n("Add", [e, n("Cast", [n("LessOrEqual", [n("Pow", [two, n("Add", [e, one])]), amax])], {"to": FLOAT})])
        e = n("Sub", [e, n("Cast", [n("Greater", [n("Pow", [two, e]), amax])], {"to": FLOAT})])
        e = n("Sub", [e, g.const(np.array(float(E4M3_EMAX), np.float32))])
        zero = n("Equal", [amax, g.const(np.array(0, np.float32))])
        e = n("Clip", [n("Where", [zero, g.const(np.array(-127.0, np.float32)), e]),
                       g.const(np.array(-127.0, np.float32)), g.const(np.array(127.0, np.float32))])
        q = n("Cast", [n("Div", [blocks, n("Pow", [two, e])])], {"to": FLOAT8E4M3FN})  # saturating
        n("Reshape", [q, n("Shape", ["x"])], outputs=["y"])
        biased = n("Cast", [n("Add", [e, g.const(np.array(127.0, np.float32))])], {"to": onnx.TensorProto.UINT8})
        n("Reshape", [biased, n("Shape", [biased], {"end": -1})], outputs=["scale"])
        return helper.make_function(LOWERING_DOMAIN, name, ["x"], ["y", "scale"], g.nodes,
                                    [helper.make_opsetid("", ONNX_OPSET)])
    if node.op_type == DEQUANTIZE:
        out_type = int(attrs.get("output_dtype", FLOAT16))
        s = n("Pow", [two, n("Sub", [n("Cast", ["scale"], {"to": FLOAT}), g.const(np.array(127.0, np.float32))])])
        rep = n("Concat", [n("Shape", [s]), i64(block)], {"axis": 0})
        s = n("Reshape", [n("Expand", [n("Unsqueeze", [s, i64(-1)]), rep]), n("Shape", ["x"])])
        n("Cast", [n("Mul", [n("Cast", ["x"], {"to": FLOAT}), s])], {"to": out_type}, outputs=["y"])
        return helper.make_function(LOWERING_DOMAIN, name, ["x", "scale"], ["y"], g.nodes,
                                    [helper.make_opsetid("", ONNX_OPSET)])
    raise NotImplementedError(f"no lowering for trt::{node.op_type}")
