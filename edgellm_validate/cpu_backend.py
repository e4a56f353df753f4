"""onnxruntime backend: runs the exported graph on a CPU with custom ops lowered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .cpu_memory import split_large_matmuls
from .cpu_precision import widen_fp16_arithmetic
from .lowering import lower_custom_ops


class CpuBackend:
    name = "onnxruntime-cpu"

    def __init__(self, llm_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        model = onnx.load(str(llm_dir / "model.onnx"), load_external_data=False)
        lower_custom_ops(model)
        split_large_matmuls(model)
        widen_fp16_arithmetic(model)  # after the split, which handles its MatMuls in fp32 itself
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
