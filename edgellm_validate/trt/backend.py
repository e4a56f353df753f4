"""`validate --backend trt`: the TensorRT backend behind the same interface as the CPU one.

Construction does every cheap check first, so a wrong machine fails in seconds, before any
engine is built: `tensorrt` and pycuda import, the plugin library loads and registers the
plugins the graph uses, the GPU's SM and the export's precisions are acceptable to the target
(SM 90 is refused: Edge-LLM's decode attention is not built for it), and the build limits
derived from the golden bundle make valid profiles. The engine itself is built (or reused
when its inputs are unchanged) at the first step, so a build failure is reported by
`validate` as a failed validation with TensorRT's errors.

Engines are never written inside the export directory (its manifest would no longer match):
by default they go to a sibling `<OUT>.engine/`, or `engine_dir` / $EDGELLM_ENGINE_DIR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..targets import (
    TargetRefusal,
    check_target_can_run,
    device_target,
    edgellm_release,
    get_target,
    inspect_export,
    target_refusals,
)
from . import plugin as plugin_mod
from .build import ENGINE_FILE, BuildOptions, build_engine
from .profiles import BuildLimits, limits_for_bundle, optimization_profiles
from .trt_api import check_tensorrt_version, import_tensorrt, required_plugins, tensorrt_version

ENGINE_DIR_ENV = "EDGELLM_ENGINE_DIR"


def default_engine_dir(llm_dir: Path) -> Path:
    env = os.environ.get(ENGINE_DIR_ENV)
    if env:
        return Path(env)
    out = llm_dir.parent if llm_dir.name == "llm" else llm_dir
    return out.with_name(out.name + ".engine")


class TrtBackend:
    name = "tensorrt"

    def __init__(self, llm_dir: Path, meta: dict, *, engine_dir: str | os.PathLike | None = None,
                 plugin_path: str | None = None, limits: BuildLimits | None = None, target: str | None = None,
                 lunowud: str | None = None, rebuild: bool = False, device_ordinal: int = 0,
                 platforms_path: str | None = None, device=None, trt=None):
        import onnx

        self.llm_dir = Path(llm_dir)
        self.trt = trt or import_tensorrt()
        config = json.loads((self.llm_dir / "config.json").read_text())
        release = config.get("edgellm_version")
        check_tensorrt_version(self.trt, release if isinstance(release, str) else None,
                               native=config.get("trt_native_ops") is True)
        model = onnx.load(str(self.llm_dir / "model.onnx"), load_external_data=False)
        wanted = required_plugins(model)
        del model
        # A plugin-free (trt_native_ops) graph needs no plugin library: none is loaded, none is asked for.
        self.plugin = plugin_mod.load_plugin_library(plugin_path) if wanted else None
        if wanted:
            plugin_mod.check_creators(self.trt, self.plugin, wanted)
        self.limits = limits_for_bundle(meta, limits)
        optimization_profiles(config, self.limits, where=self.llm_dir / "config.json")
        if device is None:
            from .cuda_device import PycudaDevice

            device = PycudaDevice(device_ordinal)
        self.device = device
        try:
            if target:
                report = check_target_can_run(get_target(target, platforms_path=platforms_path), self.llm_dir,
                                              sm=device.sm, platforms_path=platforms_path)
            else:
                reasons, report = target_refusals(device_target(device.sm), inspect_export(self.llm_dir),
                                                  sm=device.sm, release=edgellm_release(platforms_path))
                if reasons:
                    raise TargetRefusal(f"this GPU ({device.name}, SM {device.sm}) cannot run this export: "
                                        + "; ".join(reasons), self.llm_dir)
        except BaseException:
            device.close()
            raise
        self.engine_dir = Path(engine_dir) if engine_dir else default_engine_dir(self.llm_dir)
        plugin = str(self.plugin.path) if self.plugin is not None else None
        self.options = BuildOptions(limits=self.limits, plugin_path=plugin, lunowud=lunowud, reuse=not rebuild)
        self.details = {"target": report.as_dict(), "device": device.info(),
                        "tensorrt_version": tensorrt_version(self.trt), "plugin": plugin,
                        "engine_dir": str(self.engine_dir), "limits": self.limits.as_dict()}
        self._runner = None

    def _start(self) -> None:
        from .runner import TrtRunner

        record = build_engine(self.llm_dir, self.engine_dir, self.options, device=self.device, trt=self.trt)
        self.details["build"] = {k: record.get(k) for k in ("reused", "build_seconds", "memory", "engine",
                                                            "tensorrt_version")}
        self.details["build_record"] = str(self.engine_dir / "build_record.json")
        self._runner = TrtRunner(self.engine_dir / ENGINE_FILE, self.device, trt=self.trt)
        self.details["engine"] = self._runner.info()

    def run(self, feeds: dict) -> dict:
        if self._runner is None:
            self._start()
        return self._runner.run(feeds)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self.device is not None:
            self.device.close()
            self.device = None


def open_trt_backend(llm_dir: Path, meta: dict, **options) -> TrtBackend:
    """Options: engine_dir, plugin_path, limits (BuildLimits), target (a platforms.json name), lunowud,
    rebuild, device_ordinal, platforms_path."""
    return TrtBackend(Path(llm_dir), meta, **options)
