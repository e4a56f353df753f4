"""Make onnxruntime's CPU fp16 arithmetic round like a GPU's.

onnxruntime's CPU kernels for fp16 element-wise ops (Mul, Add, ...) do not return the
correctly rounded fp16 result: multiplying two fp16 values, about a quarter of the
products land one unit in the last place away from the nearest fp16. TensorRT's fp16
arithmetic, like IEEE, rounds to nearest. One ulp is harmless for fp16 exports, but
in front of an activation quantizer (an NVFP4 step is a third of the value) it flips
the quantized value, and the CPU twin drifts from what the engine computes. Computing
these ops in fp32 and casting the result to fp16 gives the correctly rounded value
(a product or sum of two fp16 values is exact or nearly so in fp32). DequantizeLinear
with an fp16 scale has the same problem and the same cure, and so does MatMul: inside a
whole model onnxruntime picks an fp16 GEMM path whose results are off by an ulp in about
half the outputs (a lone MatMul in a test graph rounds correctly, which hid this).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Sigmoid", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Tanh", "MatMul"}


def widen_fp16_arithmetic(model: onnx.ModelProto) -> int:
    """In place, on the main graph; returns how many nodes now compute in fp32."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") \
                and types.get(node.input[1]) == TensorProto.FLOAT16:
            # x * scale in fp32, one rounding to fp16 (onnxruntime multiplies in fp16 otherwise).
            count += 1
            wide_scale, final = f"{node.input[1]}/fp32_{node.name}", node.output[0]
            nodes.append(helper.make_node("Cast", [node.input[1]], [wide_scale], to=TensorProto.FLOAT))
            node.input[1] = wide_scale
            node.output[0] = f"{final}/fp32"
            nodes.append(node)
            nodes.append(helper.make_node("Cast", [node.output[0]], [final], to=TensorProto.FLOAT16))
            continue
        out_type = types.get(node.output[0]) if node.output else None
        if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx") or out_type != TensorProto.FLOAT16:
            nodes.append(node)
            continue
        count += 1
        for j, src in enumerate(node.input):
            if types.get(src) == TensorProto.FLOAT16:
                wide = f"{src}/fp32_{node.name}_{j}"
                nodes.append(helper.make_node("Cast", [src], [wide], to=TensorProto.FLOAT))
                node.input[j] = wide
        final = node.output[0]
        node.output[0] = f"{final}/fp32"
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [node.output[0]], [final], to=TensorProto.FLOAT16))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count
