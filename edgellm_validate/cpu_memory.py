"""Keep onnxruntime's CPU run at one copy of the weights.

x86 onnxruntime has no fp16 GEMM: it casts each fp16 weight to fp32 at use.
For a big weight (the lm_head: 1 GB of fp32 for a 1B model) that transient,
plus MLAS packing buffers, is as large as a second copy of the model. This pass
splits every large `MatMul(x, W)` along W's rows (contiguous byte ranges of
model.onnx.data, so no bytes move) and sums the fp32 partial products:
y = sum_k x[..., k] @ W[k, :]. Numerically it is the same fp32 product.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHUNK_BYTES = 32 << 20  # fp32 bytes of one row block after the cast


def split_large_matmuls(model: onnx.ModelProto, chunk_bytes: int = CHUNK_BYTES) -> int:
    """In place; returns how many MatMuls were split."""
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, new_inits, count = [], [], 0
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or w.data_type != TensorProto.FLOAT16 or len(w.dims) != 2 \
                or w.data_location != TensorProto.EXTERNAL:
            new_nodes.append(node)
            continue
        rows, cols = w.dims
        block = max(1, chunk_bytes // (cols * 4))
        if block >= rows:
            new_nodes.append(node)
            continue
        count += 1
        ext = {e.key: e.value for e in w.external_data}
        base = int(ext.get("offset", 0))
        x32 = f"{node.name}/x32"
        new_nodes.append(helper.make_node("Cast", [node.input[0]], [x32], to=TensorProto.FLOAT))
        partials = []
        for k, r0 in enumerate(range(0, rows, block)):
            r1 = min(rows, r0 + block)
            part = TensorProto()
            part.name, part.data_type = f"{w.name}/rows{k}", TensorProto.FLOAT16
            part.dims.extend([r1 - r0, cols])
            part.data_location = TensorProto.EXTERNAL
            for key, val in (("location", ext["location"]), ("offset", str(base + r0 * cols * 2)),
                             ("length", str((r1 - r0) * cols * 2))):
                e = part.external_data.add()
                e.key, e.value = key, val
            new_inits.append(part)
            starts = numpy_helper.from_array(np.array([r0], np.int64), f"{part.name}/s")
            ends = numpy_helper.from_array(np.array([r1], np.int64), f"{part.name}/e")
            axes = numpy_helper.from_array(np.array([-1], np.int64), f"{part.name}/a")
            new_inits.extend([starts, ends, axes])
            xk, wk, yk = f"{part.name}/x", f"{part.name}/w32", f"{part.name}/y"
            new_nodes.append(helper.make_node("Slice", [x32, starts.name, ends.name, axes.name], [xk]))
            new_nodes.append(helper.make_node("Cast", [part.name], [wk], to=TensorProto.FLOAT))
            new_nodes.append(helper.make_node("MatMul", [xk, wk], [yk]))
            partials.append(yk)
        total = f"{node.name}/sum"
        new_nodes.append(helper.make_node("Sum", partials, [total]))
        new_nodes.append(helper.make_node("Cast", [total], list(node.output), to=TensorProto.FLOAT16))
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep + new_inits)
    return count
