"""Build a TensorRT engine from an export the way Edge-LLM 0.7's `llm_build` does.

Sequence (contract engine-build-and-containers.md §3.2, §4.2): load the plugin library,
strongly typed network, `parse_from_file` (so `model.onnx.data` is found next to the graph),
the aliased-plugin-I/O preview feature (KV cache input and output are one buffer), memory
monitoring where TensorRT has it, the two profiles in context-then-generation order, and
**no** precision flags, workspace limit, timing cache or compatibility modes: precision is
whatever the strongly typed graph says. The engine directory gets llm_build's layout
(`llm.engine`, `config.json` + `builder_config`, tokenizer files, chat template, embedding)
plus `build_record.json`: TensorRT version, plugin, limits, profiles, build time, memory.

`__LUNOWUD` (llm_build's undocumented TensorRT workaround flags) is only set on explicit request
and is recorded; without it a Python build can differ from llm_build's on TensorRT >= 10.13.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgellm_core import __version__
from edgellm_core.digests import sha256_file
from edgellm_core.errors import EnvironmentProblem, ExportError

from ..export_dir import find_llm_dir
from ..runtime_rules import RuntimeRefusal
from . import plugin as plugin_mod
from .profiles import BuildLimits, check_inputs_covered, optimization_profiles, profiles_to_json
from .trt_api import SINK, import_tensorrt, process_logger, required_plugins, tensorrt_version

ENGINE_FILE = "llm.engine"
RECORD_FILE = "build_record.json"
RECORD_FORMAT = 1
# What llm_build 0.7.1 copies next to the engine (text.md §8). Missing optional ones are skipped.
SIDECARS = ("tokenizer.json", "tokenizer_config.json", "processed_chat_template.json", "embedding.safetensors")
ALIASED_IO_FEATURE = "ALIASED_PLUGIN_IO_10_03"


class EngineBuildFailed(RuntimeRefusal, ExportError):
    """TensorRT could not parse or build the export: validation fails (exit code 1), with TensorRT's errors."""

    exit_code = 1


@dataclass
class BuildOptions:
    limits: BuildLimits = field(default_factory=BuildLimits)
    plugin_path: str | None = None  # else $EDGELLM_PLUGIN_PATH
    profiling_detailed: bool = False  # llm_build --profilingDetailed
    verbose: bool = False  # TensorRT verbose log (llm_build --debug)
    lunowud: str | None = None  # explicit __LUNOWUD value; None leaves the environment alone
    reuse: bool = True  # keep an existing engine whose build inputs are unchanged


def export_digests(llm: Path) -> dict[str, str]:
    """sha256 of the files an engine is built from, from the export's manifest when it has one."""
    names = ("model.onnx", "model.onnx.data", "config.json")
    listed = {}
    manifest = llm.parent / "manifest.json"
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            listed = {n: files[f"{llm.name}/{n}"]["sha256"] for n in names if f"{llm.name}/{n}" in files}
        except (ValueError, KeyError, TypeError):
            listed = {}
    return {n: listed.get(n) or sha256_file(llm / n) for n in names if (llm / n).is_file()}


def build_fingerprint(llm: Path, limits: BuildLimits, trt_version: str, plugin_sha: str | None,
                      sm: int | None, lunowud: str | None) -> dict:
    """Everything that decides the engine: an equal fingerprint means the old engine can be reused."""
    return {"export": export_digests(llm), "limits": limits.as_dict(), "tensorrt": trt_version,
            "plugin_sha256": plugin_sha, "sm": sm, "lunowud": lunowud, "tool": f"edgellm-export {__version__}"}


def reusable_record(engine_dir: Path, fingerprint: dict) -> dict | None:
    """The previous build record if its fingerprint matches and its engine file is intact."""
    try:
        record = json.loads((engine_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    engine = engine_dir / ENGINE_FILE
    if record.get("format") != RECORD_FORMAT or record.get("fingerprint") != fingerprint or not engine.is_file():
        return None
    if engine.stat().st_size != record.get("engine", {}).get("size") or \
            sha256_file(engine) != record.get("engine", {}).get("sha256"):
        return None
    return record


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _copy_sidecar(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # same filesystem: no second copy of a large embedding
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _lunowud(value: str | None):
    """Set `__LUNOWUD` for one build only (llm_build sets it for its whole, short-lived process)."""
    if value is None:
        yield
        return
    before = os.environ.get("__LUNOWUD")
    os.environ["__LUNOWUD"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("__LUNOWUD", None)
        else:
            os.environ["__LUNOWUD"] = before


def _builder_config(trt, builder, profiles, opts: BuildOptions, version: str):
    """llm_build's builder config: aliased plugin I/O, memory monitoring, the two profiles; no precision
    flags, workspace limit, timing cache or compatibility modes."""
    bconfig = builder.create_builder_config()
    if not hasattr(trt.PreviewFeature, ALIASED_IO_FEATURE):
        raise EnvironmentProblem(f"TensorRT {version} has no {ALIASED_IO_FEATURE} preview feature (needs 10.3 or "
                                 "newer); Edge-LLM binds each KV cache input and output to one buffer")
    bconfig.set_preview_feature(getattr(trt.PreviewFeature, ALIASED_IO_FEATURE), True)
    flags = []
    if hasattr(trt.BuilderFlag, "MONITOR_MEMORY"):  # TensorRT >= 10.6
        bconfig.set_flag(trt.BuilderFlag.MONITOR_MEMORY)
        flags.append("MONITOR_MEMORY")
    if opts.profiling_detailed:
        bconfig.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in profiles:  # dict order = context (0), generation (1)
        p = builder.create_optimization_profile()
        for inp, rng in profiles[name].items():
            p.set_shape(inp, rng.min, rng.opt, rng.max)
        bconfig.add_optimization_profile(p)
    return bconfig, flags


def engine_config(config: dict, limits: BuildLimits) -> dict:
    """The config.json llm_build 0.7.1 writes next to the engine: the export's plus `builder_config`."""
    return {**config, "builder_config": limits.builder_config(config.get("trt_native_ops") is True),
            "num_deepstack_features": config.get("num_deepstack_features") or 0}  # llm_build counts the inputs


def build_engine(export_dir: str | os.PathLike, engine_dir: str | os.PathLike, options: BuildOptions | None = None,
                 *, device=None, trt=None) -> dict:
    """Build (or reuse) `engine_dir/llm.engine` from an export; returns the build record.

    `device` (a PycudaDevice) adds the GPU and its sampled peak memory to the record.
    """
    opts = options or BuildOptions()
    llm = find_llm_dir(export_dir)
    engine_dir = Path(engine_dir)
    config_path = llm / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot be read as JSON ({e})", config_path) from None
    profiles = optimization_profiles(config, opts.limits, where=config_path)

    import onnx

    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    check_inputs_covered(profiles, [i.name for i in model.graph.input])
    wanted = required_plugins(model)
    del model

    trt = trt or import_tensorrt()
    version = tensorrt_version(trt)
    plugin_info = None  # a plugin-free (trt_native_ops) graph needs no plugin library
    if wanted:
        plugin = plugin_mod.load_plugin_library(opts.plugin_path)
        plugin_mod.check_creators(trt, plugin, wanted)
        plugin_info = plugin.record()
    sm = device.sm if device is not None else None
    fingerprint = build_fingerprint(llm, opts.limits, version, plugin_info["sha256"] if plugin_info else None, sm,
                                    opts.lunowud)
    if opts.reuse:
        old = reusable_record(engine_dir, fingerprint)
        if old is not None:
            return {**old, "reused": True}

    from .cuda_device import PeakSampler, host_memory

    probes = {"host_rss": lambda: host_memory().get("rss", 0)}
    hooks = {}
    if device is not None:
        probes["device_used"] = device.used_memory
        hooks = {"enter": device.thread_enter, "exit": device.thread_exit}
    with _lunowud(opts.lunowud):  # TensorRT reads it when the builder is created
        logger = process_logger(trt, verbose=opts.verbose)
        mark = len(SINK.messages)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(llm / "model.onnx")):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or SINK.errors(mark)
            raise EngineBuildFailed("TensorRT's ONNX parser rejected the graph: " + " | ".join(errors[:5]),
                                    llm / "model.onnx")
        check_inputs_covered(profiles, [network.get_input(i).name for i in range(network.num_inputs)])
        bconfig, flags = _builder_config(trt, builder, profiles, opts, version)
        t0 = time.perf_counter()
        with PeakSampler(probes, **hooks) as sampler:
            plan = builder.build_serialized_network(network, bconfig)
        seconds = time.perf_counter() - t0
    if plan is None:
        errors = SINK.errors(mark)[-5:] or ["no error was logged"]
        raise EngineBuildFailed("TensorRT could not build the engine: " + " | ".join(errors), llm)
    # IHostMemory exposes its buffer: the plan is written and hashed in place, never copied into a Python
    # bytes object (on a board's unified memory that copy would be one more engine-sized allocation).
    blob = memoryview(plan).cast("B")
    del parser, network, builder, bconfig

    engine_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(engine_dir / ENGINE_FILE, blob)
    engine_file = {"file": ENGINE_FILE, "size": blob.nbytes, "sha256": hashlib.sha256(blob).hexdigest()}
    blob.release()
    del plan
    _write_atomic(engine_dir / "config.json",
                  (json.dumps(engine_config(config, opts.limits), indent=2) + "\n").encode())
    for name in SIDECARS:
        if (llm / name).is_file():
            _copy_sidecar(llm / name, engine_dir / name)
    mem = host_memory()
    record = {
        "format": RECORD_FORMAT,
        "tool": f"edgellm-export {__version__}",
        "export": str(llm),
        "edgellm_version": config.get("edgellm_version"),
        "tensorrt_version": version,
        "plugin": plugin_info,
        "device": device.info() if device is not None else None,
        "limits": opts.limits.as_dict(),
        "profiles": profiles_to_json(profiles),
        "builder": {"strongly_typed": True, "preview_features": [ALIASED_IO_FEATURE], "flags": flags,
                    "precision_flags": [], "profiling_detailed": opts.profiling_detailed,
                    "lunowud": opts.lunowud},
        "build_seconds": round(seconds, 3),
        "memory": {
            "host_peak_rss_bytes": mem.get("peak_rss"),
            "host_rss_sampled_peak_bytes": sampler.peaks.get("host_rss"),
            "device_used_before_bytes": sampler.baseline.get("device_used"),
            "device_used_sampled_peak_bytes": sampler.peaks.get("device_used"),
        },
        "engine": engine_file,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomic(engine_dir / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return {**record, "reused": False}


VISUAL_ENGINE_FILE = "visual.engine"
ENGINE_FILES = {"visual": VISUAL_ENGINE_FILE, "audio": "audio_encoder.engine"}  # visual_build's, audio_build's
# what visual_build / audio_build copy next to the engine (the runners read them from the engine directory)
ENGINE_SIDECARS = ("preprocessor_config.json", "phi4mm_gn_proj.safetensors")


def build_visual_engine(visual_dir: str | os.PathLike, engine_dir: str | os.PathLike, limits=None, *,
                        plugin_path: str | None = None, trt=None) -> dict:
    return build_encoder_engine("visual", visual_dir, engine_dir, limits, plugin_path=plugin_path, trt=trt)


def build_encoder_engine(component: str, visual_dir: str | os.PathLike, engine_dir: str | os.PathLike, limits=None,
                         *, plugin_path: str | None = None, trt=None) -> dict:
    """visual_build's (or audio_build's) engine for `OUT/visual/` (`OUT/audio/`): its one optimization profile
    (visual_profiles.py, audio_profiles.py), the Edge-LLM plugin library only when the graph has a plugin node
    (the Qwen towers' ViTAttentionPlugin); writes `engine_dir/visual.engine` (`audio_encoder.engine`) and the
    export's config.json with `builder_config` (the limits), as the builders do, and the sidecars the runners
    read from there. Returns {engine, profile, tensorrt_version, plugin}."""
    import onnx

    if component == "audio":
        from .audio_profiles import audio_profile as make_profile
        from .audio_profiles import default_limits
    else:
        from .visual_profiles import default_limits
        from .visual_profiles import visual_profile as make_profile

    visual_dir, engine_dir = Path(visual_dir), Path(engine_dir)
    config_path = visual_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot be read as JSON ({e})", config_path) from None
    limits = limits or default_limits(config)
    model = onnx.load(str(visual_dir / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    profiles = {component: make_profile(config, dims, limits, where=config_path)}
    check_inputs_covered(profiles, list(dims))
    wanted = required_plugins(model)
    del model
    trt = trt or import_tensorrt()
    version = tensorrt_version(trt)
    plugin_info = None
    if wanted:
        plugin = plugin_mod.load_plugin_library(plugin_path)
        plugin_mod.check_creators(trt, plugin, wanted)
        plugin_info = plugin.record()
    logger = process_logger(trt)
    mark = len(SINK.messages)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(visual_dir / "model.onnx")):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or SINK.errors(mark)
        raise EngineBuildFailed(f"TensorRT's ONNX parser rejected the {component} graph: " + " | ".join(errors[:5]),
                                visual_dir / "model.onnx")
    bconfig, _ = _builder_config(trt, builder, profiles, BuildOptions(), version)
    plan = builder.build_serialized_network(network, bconfig)
    if plan is None:
        errors = SINK.errors(mark)[-5:] or ["no error was logged"]
        raise EngineBuildFailed(f"TensorRT could not build the {component} engine: " + " | ".join(errors), visual_dir)
    blob = memoryview(plan).cast("B")
    del parser, network, builder, bconfig
    engine_dir.mkdir(parents=True, exist_ok=True)
    engine_file = engine_dir / ENGINE_FILES[component]
    _write_atomic(engine_file, blob)
    blob.release()
    del plan
    _write_atomic(engine_dir / "config.json",
                  (json.dumps({**config, "builder_config": limits.as_dict()}, indent=2) + "\n").encode())
    for name in ENGINE_SIDECARS:
        if (visual_dir / name).is_file():
            _copy_sidecar(visual_dir / name, engine_dir / name)
    return {"engine": str(engine_file), "profile": profiles_to_json(profiles),
            "tensorrt_version": version, "plugin": plugin_info}
