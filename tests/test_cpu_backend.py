"""The CPU backend's memory pass changes how big MatMuls run, not what they compute."""

from __future__ import annotations

import numpy as np
import onnx

from edgellm_export.demo_checkpoint import write_demo_checkpoint
from edgellm_export.export import export_checkpoint
from edgellm_validate import cpu_backend, cpu_memory
from edgellm_validate.twin import run_twin


def test_split_matmuls_same_logits(tmp_path, monkeypatch):
    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "out")
    llm = tmp_path / "out" / "llm"
    plain = run_twin(llm, cpu_backend.CpuBackend(llm))

    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    n_matmul = sum(n.op_type == "MatMul" for n in model.graph.node)
    # Tiny blocks: every weight is split into many row blocks.
    assert cpu_memory.split_large_matmuls(model, chunk_bytes=16 << 10) == n_matmul
    assert sum(n.op_type == "Sum" for n in model.graph.node) == n_matmul

    monkeypatch.setattr(cpu_memory, "CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(cpu_backend, "split_large_matmuls",
                        lambda m: cpu_memory.split_large_matmuls(m, chunk_bytes=16 << 10))
    split = run_twin(llm, cpu_backend.CpuBackend(llm))
    for a, b in zip(plain.steps, split.steps):
        assert np.abs(a.logits - b.logits).max() < 2e-2
        assert np.array_equal(a.logits.argmax(-1), b.logits.argmax(-1))
