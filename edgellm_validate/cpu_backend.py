"""onnxruntime backend: runs the exported graph on a CPU with custom ops lowered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .cpu_memory import split_large_matmuls
from .cpu_precision import widen_fp16_arithmetic
from .lowering import lower_custom_ops


def widen_fp16_attention(model: onnx.ModelProto) -> int:
    """In place: standard fp16 `Attention` nodes (plugin-free exports) compute in fp32, output rounded once to
    fp16. onnxruntime's CPU kernel rounds the scores and the softmax probabilities to fp16 on the way, which
    a GPU's fused attention (fp32 scores and softmax) and the golden's eager face (models/blocks/attention.py
    native_eager) do not; an ulp there flips the quantized input of the next linear in FP8 / NVFP4 exports.
    Returns how many nodes."""
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    if not any(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return 0
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    nodes, count = [], 0
    for node in model.graph.node:
        if (node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.output) != 1
                or types.get(node.input[0]) != fp16):
            nodes.append(node)
            continue
        count += 1
        for j, src in enumerate(node.input):
            if src and j < 4 and types.get(src) == fp16:  # Q, K, V and an additive mask (a bool mask stays)
                wide = f"{src}/fp32_attention_{count}_{j}"
                nodes.append(onnx.helper.make_node("Cast", [src], [wide], to=fp32))
                node.input[j] = wide
        final = node.output[0]
        node.output[0] = f"{final}/fp32_attention_{count}"
        nodes.extend([node, onnx.helper.make_node("Cast", [node.output[0]], [final], to=fp16)])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


class CpuBackend:
    name = "onnxruntime-cpu"

    def __init__(self, llm_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        model = onnx.load(str(llm_dir / "model.onnx"), load_external_data=False)
        lower_custom_ops(model)  # a plugin-free (trt_native_ops) graph has none: it runs as exported
        split_large_matmuls(model)
        widen_fp16_arithmetic(model)  # after the split, which handles its MatMuls in fp32 itself
        widen_fp16_attention(model)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # One copy of the weights: no constant folding (on x86 it would fold the
        # fp16->fp32 casts onnxruntime inserts into a second, fp32 copy of every
        # weight) and no pre-packed duplicates.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
        # Transient fp32 casts are freed right after use instead of pooling in an arena.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        # The lowered graph is handed over in memory; its external weights are
        # read from the export directory, which is never modified.
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(llm_dir.absolute()))
        self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fp8_inputs = {i.name for i in self.session.get_inputs() if i.type == "tensor(float8e4m3fn)"}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        # numpy has no float8: FP8 tensors travel as their raw bytes (uint8) both ways.
        feeds = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(np.uint8), onnx.TensorProto.FLOAT8E4M3FN)
                 if k in self.fp8_inputs else v for k, v in feeds.items()}
        outs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None
