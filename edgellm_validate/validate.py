"""`edgellm validate OUT`: run a backend through the golden bundle and judge the result."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgellm_core.errors import EnvironmentProblem, ExportError
from edgellm_core.manifest import verify_manifest
from edgellm_core.runtime_limits import runtime_limits

from .compare import step_metrics, verdict
from .encoders import MIN_COSINE as ENCODER_MIN_COSINE
from .encoders import encoder_dirs, validate_encoder
from .export_dir import find_llm_dir
from .runtime_rules import RuntimeRefusal
from .twin import BUNDLE, load_bundle, run_twin

RESULT_FILE = "validation.json"


def validate_export(out_dir: str | Path, *, backend: str = "cpu", result_path: Path | None = None,
                    backend_options: dict | None = None, verify: bool = True) -> dict:
    """`verify=False` (--no-verify) skips the manifest check, for pipelines that already trust OUT."""
    t0 = time.perf_counter()
    llm = find_llm_dir(out_dir, need=(BUNDLE,))
    if verify:
        verify_manifest(llm.parent)  # never validate (or trust) files altered after export
    meta, _ = load_bundle(llm)
    if backend == "trt":  # TensorRT + Edge-LLM plugin; options: see edgellm_validate.trt.backend
        from .trt.backend import open_trt_backend

        be = open_trt_backend(llm, meta, **(backend_options or {}))
    elif backend != "cpu":
        raise ExportError(f"backend {backend!r} is not available in this build (try --backend cpu or trt)")
    else:
        try:
            from .cpu_backend import CpuBackend

            be = CpuBackend(llm)
        except ImportError as e:  # e.g. onnxruntime missing on a device image
            raise EnvironmentProblem(f"the CPU backend needs onnxruntime, which cannot be imported ({e}); "
                                     "install it with `pip install onnxruntime`") from None
    encoders, outputs = {}, {}
    try:
        for component, edir in encoder_dirs(llm.parent).items():  # the encoders on their golden inputs first
            options = {**(backend_options or {}), "device": getattr(be, "device", None),  # (encoders.py), on the
                       "engine_dir": getattr(be, "engine_dir", None)}  # LLM's device: their outputs feed the
            outputs[component] = {}                                     # image / audio scenarios
            encoders[component] = validate_encoder(component, edir, backend, options, keep=outputs[component])
        run = run_twin(llm, be, outputs)
    except RuntimeRefusal as e:
        result = {"passed": False, "failures": [f"the runtime would refuse this export: {e}"], "steps": []}
    else:
        metrics = [step_metrics(s.scenario, s.index, s.phase, s.logits, s.expected) for s in run.steps]
        result = verdict(metrics, meta.get("precision", "fp16"))
    finally:
        be.close()
    result.update({"backend": be.name, "export": str(llm), "manifest_verified": verify,
                   "seconds": round(time.perf_counter() - t0, 3)})
    if encoders:
        result["components"] = encoders
    for component, enc in encoders.items():
        if not enc["passed"]:
            result["passed"] = False
            result.setdefault("failures", []).append(
                f"{component}: the encoder's output differs from its golden (cosine below {ENCODER_MIN_COSINE})")
    limits = runtime_limits(json.loads((llm / "config.json").read_text()))
    if limits:  # not failures: what the runtime does regardless of the export (core/runtime_limits.py)
        result["runtime_limits"] = limits
    if getattr(be, "details", None):  # e.g. the TensorRT backend's target check, device and build record
        result["backend_details"] = be.details
    path = result_path or (Path(out_dir) / RESULT_FILE)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["result_file"] = str(path)
    return result
