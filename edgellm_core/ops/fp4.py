"""NVFP4 activation ops (Edge-LLM 0.7, TensorRT's `trt` domain): TRT_FP4DynamicQuantize and
trt::DequantizeLinear. Contract quant.md §3.4.

TRT_FP4DynamicQuantize(x, global_scale; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN)
-> (x_fp4, block_scale_fp8): per 16-element block along the last axis,
block scale s_b = fp8(amax_b / (6 * global)) (saturating), codes = e2m1(x / (s_b * global))
(round to nearest, ties to even, saturating at 6). trt::DequantizeLinear is TensorRT's
DQ: with block_size it multiplies FP4 codes by block scales, without it a per-tensor scale.

FP4 values are represented outside the runtime (torch face and the CPU lowering) as one
uint8 code per element (bit 3 sign, bits 0-2 the magnitude index), because neither torch
nor onnxruntime computes on float4e2m1.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT8E4M3FN, FLOAT16, INT32, GraphBuilder
from edgellm_core.ops.schemas import FP8_E4M3_MAX, LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt"
QUANTIZE = "TRT_FP4DynamicQuantize"
DEQUANTIZE = "DequantizeLinear"
BLOCK = 16
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
# |x| thresholds between consecutive magnitudes, and whether a tie rounds up (to the even code).
_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
_TIE_UP = np.array([False, True, False, True, False, True, False])


# -- face 1: torch ops with eager references ------------------------------------------------
def e2m1_codes_torch(x):
    """uint8 codes of x rounded to nearest e2m1 (ties to even), saturating at +-6."""
    import torch

    m = x.abs().unsqueeze(-1)
    bounds = torch.from_numpy(_BOUNDS)
    up = torch.from_numpy(_TIE_UP)
    idx = torch.where(up, m >= bounds, m > bounds).sum(-1)
    return (idx + 8 * (x < 0) * (idx > 0)).to(torch.uint8)


def quantize_eager(x, global_scale, block_size: int = BLOCK):
    import torch

    xf = x.float().reshape(*x.shape[:-1], -1, block_size)
    g = global_scale.float().reshape(())
    amax = xf.abs().amax(-1, keepdim=True)
    sf = (amax / (6.0 * g)).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    denom = sf.float() * g
    scaled = torch.where(denom > 0, xf / torch.where(denom > 0, denom, 1.0), 0.0)
    return e2m1_codes_torch(scaled).reshape(x.shape), sf.reshape(*x.shape[:-1], -1)


def dequantize_eager(x, scale, block_size: int = 0):
    """Block DQ of FP4 codes (block_size > 0) or per-tensor DQ of any float tensor; fp16 out."""
    import torch

    if block_size:
        vals = torch.from_numpy(E2M1_VALUES)[x.long()]
        return (vals * scale.float().repeat_interleave(block_size, dim=-1)).to(torch.float16)
    return (x.float() * scale.float()).to(torch.float16)


@functools.cache
def register_torch_op():
    return (define_torch_op("trt", "fp4_dynamic_quantize(Tensor x, Tensor global_scale, int block_size) -> "
                            "(Tensor, Tensor)", quantize_eager),
            define_torch_op("trt", "dequantize_linear(Tensor x, Tensor scale, int block_size) -> Tensor",
                            dequantize_eager))


# -- face 2: schemas -----------------------------------------------------------------------------
def _schemas() -> list[onnx.defs.OpSchema]:
    fp = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.AttrType
    attr = onnx.defs.OpSchema.Attribute
    quant = onnx.defs.OpSchema(
        QUANTIZE, DOMAIN, 1, "TensorRT dynamic NVFP4 block quantization (16-wide blocks, fp8 block scales).",
        inputs=[fp("x", "T"), fp("global_scale", "tensor(float)")],
        outputs=[fp("y", "tensor(float4e2m1)"), fp("block_scale", "tensor(float8e4m3fn)")],
        type_constraints=[("T", ["tensor(float16)", "tensor(float)"], "input")],
        attributes=[attr("axis", A.INT, ""), attr("block_size", A.INT, ""), attr("scale_type", A.INT, "")],
    )
    deq = onnx.defs.OpSchema(
        DEQUANTIZE, DOMAIN, 1, "TensorRT DequantizeLinear (per-tensor or blocked; FP4/FP8 inputs).",
        inputs=[fp("x", "T1"), fp("scale", "T2")], outputs=[fp("y", "T2")],
        type_constraints=[("T1", ["tensor(float4e2m1)", "tensor(float8e4m3fn)"], "quantized"),
                          ("T2", ["tensor(float16)", "tensor(float)"], "scale and output")],
        attributes=[attr("axis", A.INT, "", required=False), attr("block_size", A.INT, "", required=False)],
    )
    return [quant, deq]


@functools.cache
def register_schema() -> None:
    register_missing(*_schemas())


# -- face 3: translation ------------------------------------------------------------------------
def emit_activation_qdq(g: GraphBuilder, x: str, input_scale: str, global_scale_f16: str) -> str:
    """The NVFP4 activation chain of quant.md §3.4; returns the fp16 fake-quantized x."""
    q, sf = g.node(QUANTIZE, [x, input_scale],
                   {"axis": -1, "block_size": BLOCK, "scale_type": FLOAT8E4M3FN}, n_out=2, domain=DOMAIN)
    block_scales = g.node(DEQUANTIZE, [sf, global_scale_f16], domain=DOMAIN)
    return g.node(DEQUANTIZE, [q, block_scales], {"axis": -1, "block_size": BLOCK}, domain=DOMAIN)


# -- face 4: lowering (FP4 values as uint8 codes) -------------------------------------------------
def _function(name: str, inputs, outputs, g: GraphBuilder) -> onnx.FunctionProto:
    return helper.make_function(LOWERING_DOMAIN, name, list(inputs), list(outputs), g.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)])


def e2m1_codes_onnx(g: GraphBuilder, scaled: str) -> str:
    n = g.node
    m = n("Unsqueeze", [n("Abs", [scaled]), g.i64(-1)])
    bounds = g.const(_BOUNDS)
    hits = n("Where", [g.const(_TIE_UP), n("Cast", [n("GreaterOrEqual", [m, bounds])], {"to": INT32}),
                       n("Cast", [n("Greater", [m, bounds])], {"to": INT32})])
    idx = n("ReduceSum", [hits, g.i64(-1)], {"keepdims": 0})
    neg = n("And", [n("Less", [scaled, g.const(np.array(0, np.float32))]),
                    n("Greater", [idx, g.const(np.array(0, np.int32))])])
    sign = n("Mul", [n("Cast", [neg], {"to": INT32}), g.const(np.array(8, np.int32))])
    return n("Cast", [n("Add", [idx, sign])], {"to": onnx.TensorProto.UINT8})


def dequantize_codes_onnx(g: GraphBuilder, codes: str, scales: str, block: int, out_type: int) -> str:
    """values(codes) * scales repeated `block` times along the last axis."""
    n = g.node
    vals = n("Gather", [g.const(E2M1_VALUES), n("Cast", [codes], {"to": INT32})], {"axis": 0})
    s = n("Cast", [scales], {"to": FLOAT})
    s_shape = n("Shape", [s])
    rep = n("Concat", [s_shape, g.i64(block)], {"axis": 0})
    s = n("Reshape", [n("Expand", [n("Unsqueeze", [s, g.i64(-1)]), rep]), n("Shape", [codes])])
    return n("Cast", [n("Mul", [vals, s])], {"to": out_type})


def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", -1) != -1 and node.op_type == QUANTIZE:
        raise NotImplementedError(f"{QUANTIZE} along axis {attrs['axis']} has no CPU lowering")
    block = int(attrs.get("block_size", 0))
    name = f"{node.op_type}_{hashlib.sha1(repr(sorted(attrs.items())).encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    n, i64 = g.node, g.i64
    if node.op_type == QUANTIZE:
        x, gs = "x", "global_scale"
        xf = n("Cast", [x], {"to": FLOAT})
        blocks = n("Reshape", [xf, n("Concat", [n("Shape", [xf], {"end": -1}), i64(-1, block)], {"axis": 0})])
        amax = n("ReduceMax", [n("Abs", [blocks]), i64(-1)], {"keepdims": 1})
        g_f = n("Cast", [gs], {"to": FLOAT})
        six_g = n("Mul", [g_f, g.const(np.array(6.0, np.float32))])
        sf = n("Cast", [n("Div", [amax, six_g])], {"to": FLOAT8E4M3FN})  # saturating
        denom = n("Mul", [n("Cast", [sf], {"to": FLOAT}), g_f])
        pos = n("Greater", [denom, g.const(np.array(0, np.float32))])
        safe = n("Where", [pos, denom, g.const(np.array(1, np.float32))])
        scaled = n("Where", [pos, n("Div", [blocks, safe]), g.const(np.array(0, np.float32))])
        codes = e2m1_codes_onnx(g, scaled)
        n("Reshape", [codes, n("Shape", [x])], outputs=["y"])
        n("Reshape", [sf, n("Shape", [sf], {"end": -1})], outputs=["block_scale"])
        return _function(name, ["x", "global_scale"], ["y", "block_scale"], g)
    if node.op_type == DEQUANTIZE:
        if block:
            if attrs.get("axis", -1) != -1:
                raise NotImplementedError("blocked trt::DequantizeLinear is lowered along the last axis only")
            y = dequantize_codes_onnx(g, "x", "scale", block, FLOAT16)
        else:
            y = n("Cast", [n("Mul", [n("Cast", ["x"], {"to": FLOAT}), n("Cast", ["scale"], {"to": FLOAT})])],
                  {"to": FLOAT16})
        n("Identity", [y], outputs=["y"])
        return _function(name, ["x", "scale"], ["y"], g)
    raise NotImplementedError(f"no lowering for trt::{node.op_type}")
