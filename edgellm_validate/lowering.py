"""Replace Edge-LLM custom nodes by their ONNX-function lowerings so onnxruntime can run them."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.ops import CUSTOM_OPS, fp4
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET

FP4_DQ = "DequantizeLinearFp4Packed"


def lower_custom_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """In place: each custom node becomes a call of a local function with the same semantics."""
    functions: dict[str, onnx.FunctionProto] = {}
    domains = set()
    for node in model.graph.node:
        mod = CUSTOM_OPS.get((node.domain, node.op_type))
        if mod is None:
            continue
        fn = mod.lowering(node)
        functions.setdefault(fn.name, fn)
        domains.add(fn.domain)
        node.domain, node.op_type = fn.domain, fn.name
        del node.attribute[:]  # the function is specialised to these attributes
    lower_fp4_weights(model)
    domains.update(f.domain for f in model.functions)
    unknown = {(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx", *domains)}
    if unknown:
        raise NotImplementedError(f"no CPU lowering for custom ops {sorted(unknown)}")
    model.functions.extend(functions.values())
    have = {o.domain for o in model.opset_import}
    for d in sorted(domains - have):
        model.opset_import.append(helper.make_opsetid(d, 1))
    return model


def lower_fp4_weights(model: onnx.ModelProto) -> int:
    """In place: FLOAT4E2M1 initializers, which onnxruntime cannot hold, become the same bytes typed
    UINT8 `[..., K/2]`, and the standard DequantizeLinear nodes reading them a function that
    unpacks the nibbles (low first, as ONNX packs FP4) and scales them. Returns how many."""
    fp4_inits = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT4E2M1}
    if not fp4_inits:
        return 0
    functions = {}
    for node in model.graph.node:
        if not node.input or node.input[0] not in fp4_inits:
            continue
        if any(i in fp4_inits for i in node.input[1:]) or node.op_type != "DequantizeLinear" or node.domain:
            raise NotImplementedError(f"FLOAT4E2M1 initializer read by {node.domain or 'ai.onnx'}::{node.op_type}; "
                                      "only DequantizeLinear is lowered")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        init = fp4_inits[node.input[0]]
        if attrs.get("axis", 1) not in (-1, len(init.dims) - 1) or not attrs.get("block_size"):
            raise NotImplementedError("FP4 DequantizeLinear is lowered for blocks along the last axis only")
        fn = _fp4_dq_function(int(attrs["block_size"]))
        functions[fn.name] = fn
        node.domain, node.op_type = fn.domain, fn.name
        del node.attribute[:]
    for t in fp4_inits.values():
        if t.dims[-1] % 2:
            raise NotImplementedError(f"FP4 initializer {t.name} has an odd last dimension")
        t.data_type = TensorProto.UINT8
        t.dims[-1] //= 2
    model.functions.extend(functions.values())
    if LOWERING_DOMAIN not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(LOWERING_DOMAIN, 1))
    return len(fp4_inits)


def _fp4_dq_function(block: int) -> onnx.FunctionProto:
    name = f"{FP4_DQ}_{hashlib.sha1(str(block).encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    n = g.node
    b = n("Cast", ["x"], {"to": TensorProto.INT32})
    sixteen = g.const(np.array(16, np.int32))
    nib = n("Concat", [n("Unsqueeze", [n("Mod", [b, sixteen]), g.i64(-1)]),
                       n("Unsqueeze", [n("Div", [b, sixteen]), g.i64(-1)])], {"axis": -1})
    shape = n("Concat", [n("Shape", ["x"], {"end": -1}), g.i64(-1)], {"axis": 0})
    codes = n("Reshape", [nib, shape])
    y = fp4.dequantize_codes_onnx(g, codes, "scale", block, TensorProto.FLOAT)
    n("Identity", [y], outputs=["y"])
    return helper.make_function(LOWERING_DOMAIN, name, ["x", "scale"], ["y"], g.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)])

