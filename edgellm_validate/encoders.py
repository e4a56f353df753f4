"""Validating the encoder components (`OUT/visual/`, `OUT/audio/`): each graph on its golden inputs against the
exporter's eager face.

The bundle (`<component>/golden/bundle.json`) names the graph inputs and outputs and the tensors holding them
(`<component>/golden/tensors.safetensors`). The CPU backend runs the graph through onnxruntime as exported; the
TensorRT backend builds the engine visual_build / audio_build would (trt/build.py: one profile, the plugin
library when the graph has a plugin node) and runs it. Every output row (one image or audio token) must reach
MIN_COSINE against the expected row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COMPONENTS = ("visual", "audio")  # OUT/ subdirectories, in the order they run (before the language model)
BUNDLE = Path("golden") / "bundle.json"
TENSORS = Path("golden") / "tensors.safetensors"
MIN_COSINE = 0.999  # an fp16 encoder against its fp32-computed, fp16-stored reference


def encoder_dirs(out_dir: Path) -> dict[str, Path]:
    """{component: OUT/<component>} for every encoder the export has with its golden bundle."""
    return {c: Path(out_dir) / c for c in COMPONENTS if (Path(out_dir) / c / BUNDLE).is_file()}


def validate_encoder(component: str, vdir: Path, backend: str, options: dict | None = None,
                     keep: dict | None = None) -> dict:
    """{passed, validated, outputs: {name: {passed, tokens, worst_cosine, max_abs_diff}}}. `options` (TensorRT):
    engine_dir (the LLM's; the encoder's engine goes to its `<component>/`), plugin_path, trt, device,
    visual_limits / audio_limits. `keep` receives the outputs themselves (the LLM's image or audio scenario
    scatters them into its prompt)."""
    from .runtime_rules import read_safetensors

    meta = json.loads((vdir / BUNDLE).read_text())
    tensors = read_safetensors(vdir / TENSORS)
    feeds = {name: np.asarray(tensors[key]) for name, key in meta["inputs"].items()}
    result: dict = {"validated": True, "outputs": {}}
    if backend == "trt":
        got, result["engine"] = _run_on_tensorrt(component, vdir, feeds, options or {})
    else:
        from .cpu_backend import CpuBackend

        be = CpuBackend(vdir)
        try:
            got = be.run(feeds)
        finally:
            be.close()
    if keep is not None:
        keep.update(got)
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


def _run_on_tensorrt(component: str, vdir: Path, feeds: dict, options: dict) -> tuple[dict, dict]:
    """Build (trt/build.py) and run the encoder's engine once on `feeds`; returns (outputs, build record)."""
    import tempfile

    from .trt.build import build_encoder_engine
    from .trt.runner import TrtRunner

    engine_root = options.get("engine_dir")
    scratch = None if engine_root else tempfile.TemporaryDirectory(prefix=f"edgellm-{component}-engine-")
    engine_dir = Path(engine_root) / component if engine_root else Path(scratch.name)
    device = options.get("device")
    own = device is None
    try:
        record = build_encoder_engine(component, vdir, engine_dir, options.get(f"{component}_limits"),
                                      plugin_path=options.get("plugin_path"), trt=options.get("trt"))
        if own:
            from .trt.cuda_device import PycudaDevice

            device = PycudaDevice(options.get("device_ordinal", 0))
        runner = TrtRunner(record["engine"], device, trt=options.get("trt"), num_profiles=1,
                           choose_profile=lambda feeds: 0)
        try:
            return runner.run(feeds), {k: v for k, v in record.items() if k != "engine"}
        finally:
            runner.close()
    finally:
        if own and device is not None:
            device.close()
        if scratch is not None:
            scratch.cleanup()
