"""Validating `OUT/visual/`: the vision encoder's graph on the golden tiles against the exporter's eager face.

The bundle (`visual/golden/bundle.json`) names the graph inputs and outputs and the tensors holding them
(`visual/golden/tensors.safetensors`). The CPU backend runs the graph through onnxruntime as exported; every
output row (one image token) must reach MIN_COSINE against the expected row. There is no TensorRT visual
engine path yet: on the TensorRT backend the visual result says so instead of passing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUBDIR = "visual"
BUNDLE = Path("golden") / "bundle.json"
TENSORS = Path("golden") / "tensors.safetensors"
MIN_COSINE = 0.999  # an fp16 tower against its fp32-computed, fp16-stored reference


def visual_dir(out_dir: Path) -> Path | None:
    """OUT/visual when the export has a vision encoder with its golden bundle."""
    d = Path(out_dir) / SUBDIR
    return d if (d / BUNDLE).is_file() else None


def validate_visual(vdir: Path, backend: str) -> dict:
    """{passed, tokens, worst_cosine, max_abs_diff} (or passed False with a reason)."""
    from .runtime_rules import read_safetensors

    if backend != "cpu":
        return {"passed": False, "validated": False,
                "reason": "the TensorRT backend has no visual engine path yet; validate the visual component with "
                          "--backend cpu"}
    from .cpu_backend import CpuBackend

    meta = json.loads((vdir / BUNDLE).read_text())
    tensors = read_safetensors(vdir / TENSORS)
    be = CpuBackend(vdir)
    try:
        got = be.run({name: np.asarray(tensors[key]) for name, key in meta["inputs"].items()})
    finally:
        be.close()
    result: dict = {"validated": True, "outputs": {}}
    passed = True
    for name, key in meta["outputs"].items():
        a, b = np.asarray(got[name], np.float32), np.asarray(tensors[key], np.float32)
        if a.shape != b.shape:
            result["outputs"][name] = {"passed": False, "reason": f"shape {list(a.shape)}, expected {list(b.shape)}"}
            passed = False
            continue
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
        ok = bool(np.isfinite(a).all()) and float(cos.min()) >= MIN_COSINE
        result["outputs"][name] = {"passed": ok, "tokens": int(a.shape[0]), "worst_cosine": float(cos.min()),
                                   "max_abs_diff": float(np.abs(a - b).max())}
        passed &= ok
    result["passed"] = passed
    return result
