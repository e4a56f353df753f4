"""onnxruntime backend: runs the exported graph on a CPU with custom ops lowered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .lowering import lower_custom_ops


class CpuBackend:
    name = "onnxruntime-cpu"

    def __init__(self, llm_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        model = onnx.load(str(llm_dir / "model.onnx"), load_external_data=False)
        lower_custom_ops(model)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # The lowered graph is handed over in memory; its external weights are
        # read from the export directory, which is never modified.
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(llm_dir.absolute()))
        self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None
