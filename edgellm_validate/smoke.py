"""The first thing run in every validation container: is this image fit for its target?

`python -m edgellm_validate.smoke [--target NAME] [--plugin PATH] [--json]` prints the versions that matter
(python, numpy, onnx, onnxruntime, tensorrt and where it comes from), imports the validation path, and on a
TensorRT target checks TensorRT's version against what the Edge-LLM release works with, loads the Edge-LLM
plugin library, checks that it registers every plugin an export can contain (AttentionPlugin,
Int4GroupwiseGemmPlugin, the hybrids' ops: trt/plugin.exported_plugins), and checks the GPU's SM against the
target (the CUDA driver API through ctypes, nvidia-smi as a fallback). When all of that holds it builds a
one-layer engine from a graph made on the spot and runs a prefill and decode steps through it, against the
CPU twin (smoke_engine.py; `--no-engine` skips it). A plugin-free target (platforms.json `plugin: false`)
has no plugin library to load: its TensorRT must be 10.15 or later, any SM it lists will do (TensorRT's own
attention, not the plugin's kernels), and its one-layer engine is the plugin-free graph. It exits 1 with every problem
listed when the image cannot serve the target, so a wrong image or machine fails in seconds instead of
after a model's engine build. The last output line is `EDGELLM_SMOKE_JSON {...}` for the host
(`edgellm_export.make.containers.smoke`). `--versions-only` prints just the versions as JSON (used at
image build time for /opt/edgellm/versions.json).

Stdlib only at import time; never imports torch.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

MARKER = "EDGELLM_SMOKE_JSON "
TARGET_ENV = "EDGELLM_TARGET"
# distribution name -> module name
PACKAGES = {"edgellm-export": "edgellm_validate", "numpy": "numpy", "onnx": "onnx", "onnxruntime": "onnxruntime",
            "ml_dtypes": "ml_dtypes", "pydantic": "pydantic", "pycuda": "pycuda", "tensorrt": "tensorrt",
            "torch": "torch"}
# cuDeviceGetAttribute ids
_CC_MAJOR, _CC_MINOR = 75, 76


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions without importing anything heavy: distribution metadata, and where each module lives
    (TensorRT from JetPack's apt packages may have no pip metadata, and must come from the base image)."""
    out: dict = {"python": platform.python_version(), "machine": platform.machine(),
                 "executable": sys.executable, "packages": {}}
    for dist, module in PACKAGES.items():
        spec = importlib.util.find_spec(module)
        if spec is None:
            continue
        version = _dist_version(dist)
        if version is None and dist == "tensorrt":
            version = next((v for d in ("tensorrt-cu13", "tensorrt-cu12", "tensorrt_libs")
                            if (v := _dist_version(d))), None)
        out["packages"][dist] = {"version": version, "origin": spec.origin}
    return out


def cuda_devices() -> tuple[list[dict], str]:
    """[{index, name, sm}] of the visible GPUs and how they were found ('' and a reason when none)."""
    names = ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                break
            count = ctypes.c_int()
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                break
            devices = []
            for i in range(count.value):
                dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
                lib.cuDeviceGet(ctypes.byref(dev), i)
                lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
                lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
                buf = ctypes.create_string_buffer(256)
                lib.cuDeviceGetName(buf, 256, dev)
                devices.append({"index": i, "name": buf.value.decode(errors="replace"),
                                "sm": major.value * 10 + minor.value})
            return devices, f"CUDA driver API ({name})"
        except AttributeError:
            break
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            text = subprocess.run([smi, "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        devices = []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[2].replace(".", "").isdigit():
                major, _, minor = parts[2].partition(".")
                devices.append({"index": int(parts[0]), "name": parts[1], "sm": int(major) * 10 + int(minor or 0)})
        if devices:
            return devices, "nvidia-smi"
    return [], ("no GPU visible: libcuda.so.1 cannot be loaded or initialised and nvidia-smi found none "
                "(is the container started with the NVIDIA runtime / GPU device requests?)")


def sm_problems(target, sm: int) -> list[str]:
    """Why a GPU of `sm` cannot serve `target` (empty when it can)."""
    from .targets import SM_RENUMBER, decode_attention_supported

    problems = []
    if target.sm is not None and SM_RENUMBER.get(sm, sm) != SM_RENUMBER.get(target.sm, target.sm):
        problems.append(f"the GPU is SM {sm}, but target {target.name} is SM {target.sm}")
    elif target.sm is None and target.sm_choices and sm not in target.sm_choices:
        built = "'s plugin library is built" if target.plugin else " is meant"
        problems.append(f"the GPU is SM {sm}; target {target.name}{built} for SM "
                        f"{', '.join(map(str, target.sm_choices))}")
    if target.plugin and not decode_attention_supported(sm):
        problems.append(f"SM {sm} is not supported by Edge-LLM's decode attention kernels")
    return problems


def run_smoke(target_name: str | None = None, *, plugin_path: str | None = None,
              platforms_path: str | None = None, engine_check: bool = True) -> dict:
    """Everything the smoke check finds, with `ok` and `problems`; never raises for a problem it can name."""
    problems: list[str] = []
    report: dict = {"target": target_name, "versions": versions()}
    try:
        importlib.import_module("edgellm_validate.validate")
        report["validate_import"] = True
    except Exception as e:  # whatever is missing, say it
        report["validate_import"] = False
        problems.append(f"the validation path does not import: {type(e).__name__}: {e}")
    target = None
    if target_name:
        try:
            from .targets import edgellm_release, get_target

            target = get_target(target_name, platforms_path=platforms_path)
            report["backend"] = target.backend
            report["edgellm_release"] = edgellm_release(platforms_path)
        except Exception as e:
            problems.append(f"target {target_name!r}: {e}")
    if target is not None and target.backend == "cpu":
        try:
            import onnxruntime as ort

            report["onnxruntime_providers"] = list(ort.get_available_providers())
        except Exception as e:
            problems.append(f"the CPU backend needs onnxruntime, which does not import: {e}")
    if target is not None and target.backend == "trt":
        _smoke_trt(target, plugin_path, report, problems)
        if engine_check and not problems:  # everything it needs is there: build and run a one-layer engine
            _smoke_engine(plugin_path if target.plugin else None, report, problems, native=not target.plugin)
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _smoke_trt(target, plugin_path, report: dict, problems: list[str]) -> None:
    trt = None
    try:
        import tensorrt as trt

        report["tensorrt"] = {"version": getattr(trt, "__version__", None), "origin": trt.__file__}
    except Exception as e:
        problems.append(f"tensorrt does not import ({e}); the image must provide TensorRT for {target.name}")
    if trt is not None:
        from .trt.trt_api import check_tensorrt_version

        try:
            check_tensorrt_version(trt, report.get("edgellm_release"), native=not target.plugin)
        except Exception as e:
            problems.append(e.paragraph() if hasattr(e, "paragraph") else str(e))
    if trt is not None and not target.plugin:  # a plugin-free image: nothing to load, nothing to look up
        report["plugin"] = None
    elif trt is not None:
        try:
            from .trt import plugin as plugin_mod

            loaded = plugin_mod.load_plugin_library(plugin_path)
            report["plugin"] = {"path": str(loaded.path), "source": loaded.source}
            wanted = plugin_mod.exported_plugins()
            plugin_mod.check_creators(trt, loaded, wanted)
            report["plugin"]["attention_plugin"] = True
            report["plugin"]["creators"] = [op for op, _, _ in wanted]
        except Exception as e:
            problems.append(str(e))
    devices, how = cuda_devices()
    report["gpus"], report["gpu_query"] = devices, how
    if not devices:
        problems.append(how)
    for d in devices[:1]:  # the device the backend uses (ordinal 0)
        report["sm"] = d["sm"]
        problems.extend(sm_problems(target, d["sm"]))


def _open_device():
    from .trt.cuda_device import PycudaDevice

    return PycudaDevice(0)


def _smoke_engine(plugin_path, report: dict, problems: list[str], *, native: bool = False) -> None:
    """smoke_engine.py: build a one-layer engine (the plugin-free graph when `native`) and run a prefill and
    decode steps on this GPU."""
    import tempfile

    import tensorrt as trt

    from .smoke_engine import run_engine_check

    try:
        with tempfile.TemporaryDirectory(prefix="edgellm-smoke-") as work:
            result = run_engine_check(Path(work), plugin_path=plugin_path, device=_open_device(), trt=trt,
                                      native=native)
    except Exception as e:  # a build or run failure is exactly what this check is for: report it
        message = e.paragraph() if hasattr(e, "paragraph") else f"{type(e).__name__}: {e}"
        problems.append(f"the one-layer engine check failed: {message}")
        report["engine"] = {"ok": False}
        return
    problems.extend(result.pop("problems"))
    report["engine"] = {"ok": not result.get("problems"), **result}


def _print_human(report: dict, out) -> None:
    v = report["versions"]
    print(f"python {v['python']} ({v['machine']}) {v['executable']}", file=out)
    for dist, info in v["packages"].items():
        print(f"  {dist} {info['version'] or '?'}  {info['origin']}", file=out)
    if report.get("target"):
        print(f"target {report['target']} ({report.get('backend', '?')})", file=out)
    for key in ("tensorrt", "plugin", "gpu_query", "engine"):
        if report.get(key):
            print(f"{key}: {report[key]}", file=out)
    for d in report.get("gpus", []):
        print(f"  GPU {d['index']}: {d['name']} (SM {d['sm']})", file=out)
    for p in report["problems"]:
        print(f"PROBLEM: {p}", file=out)
    print("smoke check " + ("passed" if report["ok"] else "FAILED"), file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgellm_validate.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=os.environ.get(TARGET_ENV) or None,
                   help=f"a platform-matrix target (default: ${TARGET_ENV})")
    p.add_argument("--plugin", help="the Edge-LLM plugin library (default: $EDGELLM_PLUGIN_PATH)")
    p.add_argument("--platforms", help="the platform matrix (default: $EDGELLM_PLATFORMS or the package's)")
    p.add_argument("--json", action="store_true", help="only the marker line with the JSON report")
    p.add_argument("--no-engine", action="store_true",
                   help="skip building and running the one-layer engine on a TensorRT target")
    p.add_argument("--versions-only", action="store_true", help="print the versions as JSON and exit")
    args = p.parse_args(argv)
    if args.versions_only:
        print(json.dumps(versions(), indent=2, sort_keys=True))
        return 0
    report = run_smoke(args.target, plugin_path=args.plugin, platforms_path=args.platforms,
                       engine_check=not args.no_engine)
    if not args.json:
        _print_human(report, sys.stdout)
    print(MARKER + json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
