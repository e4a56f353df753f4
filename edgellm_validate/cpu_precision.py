"""Make onnxruntime's CPU fp16 arithmetic round like a GPU's.

onnxruntime's CPU kernels for fp16 element-wise ops (Mul, Add, ...) do not return the
correctly rounded fp16 result: multiplying two fp16 values, about a quarter of the
products land one unit in the last place away from the nearest fp16. TensorRT's fp16
arithmetic, like IEEE, rounds to nearest. One ulp is harmless for fp16 exports, but
in front of an activation quantizer (an NVFP4 step is a third of the value) it flips
the quantized value, and the CPU twin drifts from what the engine computes. Computing
these ops in fp32 and casting the result to fp16 gives the correctly rounded value
(a product or sum of two fp16 values is exact or nearly so in fp32). DequantizeLinear
with an fp16 scale has the same problem and the same cure; QuantizeLinear on fp16 divides
in fp16, rounding the quotient twice (to fp16, then to the target type), so a quarter of
a percent of fp8 values land a step off where the runtime computes RNE(x / s) exactly; and so does MatMul: inside a
whole model onnxruntime picks an fp16 GEMM path whose results are off by an ulp in about
half the outputs (a lone MatMul in a test graph rounds correctly, which hid this).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

# Relu too: onnxruntime has no fp16 Relu on x86, and the fp32 one it substitutes swallows the rounding of
# the op in front of it (Nemotron-H's ReLU^2).
ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Sigmoid", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Tanh", "MatMul",
               "Relu"}


def widen_fp16_arithmetic(model: onnx.ModelProto) -> int:
    """In place, on the main graph; returns how many nodes now compute in fp32."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    fp16 = TensorProto.FLOAT16
    nodes, count = [], 0
    for node in model.graph.node:
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type == "QuantizeLinear":
            widen, recast = (0, 1), False  # RNE(x / s) on the exact quotient; the output is not fp16
        elif standard and node.op_type == "DequantizeLinear" and types.get(node.input[1]) == fp16:
            widen, recast = (1,), True  # q * s in fp32, rounded once to fp16
        elif standard and node.op_type in ELEMENTWISE and node.output and types.get(node.output[0]) == fp16:
            widen, recast = range(len(node.input)), True
        else:
            nodes.append(node)
            continue
        count += 1
        for j in widen:
            src = node.input[j]
            if types.get(src) == fp16:
                wide = f"{src}/fp32_{count}_{j}"  # count: unique even for unnamed nodes
                nodes.append(helper.make_node("Cast", [src], [wide], to=TensorProto.FLOAT))
                node.input[j] = wide
        nodes.append(node)
        if recast:
            final = node.output[0]
            node.output[0] = f"{final}/fp32_{count}"
            nodes.append(helper.make_node("Cast", [node.output[0]], [final], to=fp16))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count
