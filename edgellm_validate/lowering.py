"""Replace Edge-LLM custom nodes by their ONNX-function lowerings so onnxruntime can run them."""

from __future__ import annotations

import onnx
from onnx import helper

from edgellm_export.ops import CUSTOM_OPS


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
    unknown = {(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx", *domains)}
    if unknown:
        raise NotImplementedError(f"no CPU lowering for custom ops {sorted(unknown)}")
    model.functions.extend(functions.values())
    have = {o.domain for o in model.opset_import}
    for d in sorted(domains - have):
        model.opset_import.append(helper.make_opsetid(d, 1))
    return model
