"""TensorRT with the real Edge-LLM plugin on a real GPU: build an engine from an export exactly as
llm_build would, check its profiles against ours, and validate the export on it.

Needs: `tensorrt` (the target's own), pycuda, EDGELLM_PLUGIN_PATH, and a GPU whose SM the
Edge-LLM decode kernels support (not SM 90). Anything missing skips with the reason, or fails
with `--require-gpu` / EDGELLM_REQUIRE_GPU=1. The export comes from EDGELLM_TRT_TEST_EXPORT
(an `edgellm export` directory made on a host with torch) or, where torch is installed, from
the built-in demo checkpoint. A plugin-free export (`--attention native`; the x86-cuda-native image)
needs no plugin library and no decode-attention SM, but TensorRT 10.15 or later.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from gpu_option import skip_or_fail

EXPORT_ENV = "EDGELLM_TRT_TEST_EXPORT"


def _is_native(export_dir: Path) -> bool:
    import json

    from edgellm_validate.export_dir import find_llm_dir

    return json.loads((find_llm_dir(export_dir) / "config.json").read_text()).get("trt_native_ops") is True


@pytest.fixture(scope="module")
def gpu(request):
    cfg = request.config
    try:
        import tensorrt as trt
    except ImportError as e:
        skip_or_fail(cfg, f"tensorrt cannot be imported ({e}); it comes with the target's TensorRT "
                          "(JetPack/DriveOS packages or an NVIDIA image), not from PyPI")
    try:
        import pycuda.driver  # noqa: F401
    except ImportError as e:
        skip_or_fail(cfg, f"pycuda cannot be imported ({e})")
    from edgellm_core.errors import EnvironmentProblem
    from edgellm_validate.targets import NATIVE_MIN_TENSORRT, decode_attention_supported
    from edgellm_validate.trt.cuda_device import PycudaDevice
    from edgellm_validate.trt.plugin import resolve_plugin_path

    native = _is_native(request.getfixturevalue("export_dir"))  # after the imports: no export made in vain
    plugin = None
    if native:  # TensorRT's own RotaryEmbedding / TensorScatter / Attention: no plugin library
        if tuple(int(x) for x in trt.__version__.split(".")[:2]) < NATIVE_MIN_TENSORRT:
            skip_or_fail(cfg, f"the export is plugin-free (trt_native_ops), which needs TensorRT 10.15 or later; "
                              f"this is {trt.__version__}")
    else:
        try:
            plugin, _ = resolve_plugin_path()
        except EnvironmentProblem as e:
            skip_or_fail(cfg, str(e))
    try:
        dev = PycudaDevice(0)
    except EnvironmentProblem as e:
        skip_or_fail(cfg, str(e))
    sm, name = dev.sm, dev.name
    dev.close()
    if not native and not decode_attention_supported(sm):
        skip_or_fail(cfg, f"{name} is SM {sm}, which Edge-LLM's decode attention kernels do not support "
                          "(SM 90 = H100/H200 in particular); an Orin, Thor, Ampere, Ada or Blackwell GPU is needed")
    return SimpleNamespace(trt=trt, sm=sm, name=name, plugin=plugin, native=native)


@pytest.fixture(scope="module")
def export_dir(request, tmp_path_factory):
    given = os.environ.get(EXPORT_ENV)
    if given:
        return Path(given)
    try:
        import torch  # noqa: F401
    except ImportError:
        skip_or_fail(request.config, f"no export to test: set {EXPORT_ENV} to an `edgellm export` directory "
                                     "(torch, needed to make one here, is not installed)")
    from edgellm_export.demo_checkpoint import write_demo_checkpoint
    from edgellm_export.export import export_checkpoint

    d = tmp_path_factory.mktemp("trt-real")
    export_checkpoint(write_demo_checkpoint(d / "ckpt"), d / "out")
    return d / "out"


def test_tensorrt_has_what_edgellm_needs(gpu):
    major, minor = (int(x) for x in gpu.trt.__version__.split(".")[:2])
    assert (major, minor) >= ((10, 15) if gpu.native else (10, 3)), gpu.trt.__version__
    if not gpu.native:
        assert hasattr(gpu.trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03")
    assert hasattr(gpu.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def test_plugin_registers_the_attention_plugin(gpu):
    from edgellm_validate.trt.plugin import ATTENTION_PLUGIN, check_creators, load_plugin_library

    if gpu.native:
        pytest.skip("a plugin-free export: no plugin library is involved")

    plugin = load_plugin_library()
    check_creators(gpu.trt, plugin, [ATTENTION_PLUGIN])


def test_engine_profiles_are_ours(gpu, export_dir, tmp_path):
    import json

    from edgellm_validate.export_dir import find_llm_dir
    from edgellm_validate.smoke_engine import NATIVE_CAPACITY
    from edgellm_validate.trt.build import BuildOptions, build_engine
    from edgellm_validate.trt.cuda_device import PycudaDevice
    from edgellm_validate.trt.profiles import BuildLimits, optimization_profiles
    from edgellm_validate.trt.runner import TrtRunner

    # a plugin-free graph's caches have a static capacity, which the profiles must match
    limits = BuildLimits(max_batch_size=2, max_input_len=32,
                         max_kv_cache_capacity=NATIVE_CAPACITY if gpu.native else 64)
    dev = PycudaDevice(0)
    try:
        rec = build_engine(export_dir, tmp_path / "engine", BuildOptions(limits), device=dev)
        assert rec["reused"] is False and rec["tensorrt_version"] == gpu.trt.__version__
        assert rec["device"]["sm"] == gpu.sm and rec["build_seconds"] > 0
        assert rec["memory"]["host_peak_rss_bytes"] > 0
        assert build_engine(export_dir, tmp_path / "engine", BuildOptions(limits), device=dev)["reused"] is True
        runner = TrtRunner(tmp_path / "engine" / "llm.engine", dev)
        try:
            config = json.loads((find_llm_dir(export_dir) / "config.json").read_text())
            ours = optimization_profiles(config, limits)
            for k, shapes in enumerate(ours.values()):
                for name, rng in shapes.items():
                    got = runner.engine.get_tensor_profile_shape(name, k)
                    assert [tuple(d) for d in got] == [rng.min, rng.opt, rng.max], (k, name)
            presents = ("present_k_cache_", "present_v_cache_") if gpu.native else ("present_key_values_",)
            assert runner.aliases and set(runner.aliases) == {n for n in runner.outputs if n.startswith(presents)}
        finally:
            runner.close()
    finally:
        dev.close()


def test_validate_on_tensorrt(gpu, export_dir, tmp_path):
    from edgellm_validate.validate import validate_export

    res = validate_export(export_dir, backend="trt", result_path=tmp_path / "validation.json",
                          backend_options={"engine_dir": tmp_path / "engine"})
    assert res["backend"] == "tensorrt"
    assert res["passed"], res["failures"]
    assert res["backend_details"]["device"]["sm"] == gpu.sm
