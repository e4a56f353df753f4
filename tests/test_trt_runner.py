"""The TensorRT build/run path on a CPU: pure helpers, and `validate --backend trt` end to end with a
stand-in TensorRT whose "engine" runs the graph on onnxruntime through fake device memory.

What this proves without a GPU: the builder is configured as llm_build configures it (strongly
typed, aliased plugin I/O, the two profiles in order, no precision flags), the engine directory
and build record are written and reused, and the runner binds the twin's inputs correctly
(profile per phase, every shape and address re-set per step, KV caches bound in place and never
copied back to the host). Real TensorRT is exercised by tests/test_trt_integration.py.
"""

from __future__ import annotations

import _ctypes
import json
from pathlib import Path

import fake_tensorrt as fake_trt
import ml_dtypes
import numpy as np
import onnx
import pytest

from edgellm_core.errors import EnvironmentProblem
from edgellm_validate.targets import TargetRefusal
from edgellm_validate.trt import plugin as plugin_mod
from edgellm_validate.trt.backend import default_engine_dir
from edgellm_validate.trt.build import BuildOptions, EngineBuildFailed, build_engine
from edgellm_validate.trt.cuda_device import PeakSampler, host_memory
from edgellm_validate.trt.profiles import BuildLimits, optimization_profiles, profiles_to_json
from edgellm_validate.trt.runner import (
    DeviceTensor,
    EngineRunError,
    TrtRunner,
    alias_map,
    as_engine_dtype,
    select_profile,
)
from edgellm_validate.trt.trt_api import numpy_dtype, required_plugins
from edgellm_validate.validate import validate_export

STAND_IN_PLUGIN = str(Path(_ctypes.__file__).resolve())  # any loadable shared object


# ---------------------------------------------------------------- pure helpers


def feeds(start_len, seq):
    return {"kvcache_start_index": np.zeros(start_len, np.int32), "inputs_embeds": np.zeros((2, seq, 8), np.float16)}


def test_profile_per_phase():
    assert select_profile(feeds(0, 11)) == 0  # prefill
    assert select_profile(feeds(0, 1)) == 0  # one-token prefill is still a prefill
    assert select_profile(feeds(2, 5)) == 0  # chunked prefill
    assert select_profile(feeds(2, 1)) == 1  # decode


def test_alias_map():
    ins = ["inputs_embeds", "past_key_values_0", "past_key_values_1"]
    outs = ["logits", "present_key_values_0", "present_key_values_1", "present_key_values_2"]
    assert alias_map(ins, outs) == {"present_key_values_0": "past_key_values_0",
                                    "present_key_values_1": "past_key_values_1"}


def test_alias_map_carries_hybrid_states_in_place():
    ins = ["inputs_embeds", "past_key_values_0", "context_lengths", "conv_state_0", "conv_state_1",
           "recurrent_state_0", "recurrent_state_1"]
    outs = ["logits", "present_key_values_0", "present_conv_state_0", "present_conv_state_1",
            "present_recurrent_state_0", "present_recurrent_state_1"]
    assert alias_map(ins, outs) == {
        "present_key_values_0": "past_key_values_0", "present_conv_state_0": "conv_state_0",
        "present_conv_state_1": "conv_state_1", "present_recurrent_state_0": "recurrent_state_0",
        "present_recurrent_state_1": "recurrent_state_1"}


def test_dtypes():
    assert numpy_dtype(fake_trt.DataType.HALF) == np.float16
    assert numpy_dtype(fake_trt.DataType.INT64) == np.int64
    assert numpy_dtype(fake_trt.DataType.FP8) == ml_dtypes.float8_e4m3fn
    with pytest.raises(TypeError, match="INT4"):
        numpy_dtype(fake_trt.DataType.INT4)
    fp8 = np.dtype(ml_dtypes.float8_e4m3fn)
    raw = np.array([0x38, 0x40], np.uint8)  # 1.0 and 2.0 in e4m3
    assert as_engine_dtype(raw, fp8).astype(np.float32).tolist() == [1.0, 2.0]  # reinterpreted, not converted
    assert as_engine_dtype(np.array([3], np.uint8), np.dtype(np.int8)).tolist() == [3]
    assert as_engine_dtype(np.ones(2, np.float32), np.dtype(np.float16)).dtype == np.float16


def test_required_plugins():
    from onnx import helper

    nodes = [helper.make_node("AttentionPlugin", ["a"], ["b"], domain="trt_edgellm"),
             helper.make_node("AttentionPlugin", ["b"], ["c"], domain="trt_edgellm"),
             helper.make_node("TRT_FP4DynamicQuantize", ["c"], ["d"], domain="trt"),  # TensorRT's own
             helper.make_node("MatMul", ["d", "d"], ["e"]),
             helper.make_node("Custom", ["e"], ["f"], domain="x", plugin_version="2", plugin_namespace="ns")]
    g = helper.make_graph(nodes, "g", [], [])
    assert required_plugins(helper.make_model(g)) == [("AttentionPlugin", "1", ""), ("Custom", "2", "ns")]


def test_peak_sampler_and_host_memory():
    values = iter([5, 9, 7] + [3] * 1000)
    with PeakSampler({"x": lambda: next(values), "broken": lambda: 1 / 0}, interval=0.001) as s:
        pass
    assert s.baseline == {"x": 5} and s.peaks["x"] == 9
    mem = host_memory()
    assert mem["peak_rss"] >= mem.get("rss", 0) > 0


def test_default_engine_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGELLM_ENGINE_DIR", raising=False)
    assert default_engine_dir(tmp_path / "out" / "llm") == tmp_path / "out.engine"
    monkeypatch.setenv("EDGELLM_ENGINE_DIR", str(tmp_path / "e"))
    assert default_engine_dir(tmp_path / "out" / "llm") == tmp_path / "e"


# ---------------------------------------------------------------- with the stand-in TensorRT


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("torch")
    from edgellm_export.demo_checkpoint import write_demo_checkpoint
    from edgellm_export.export import export_checkpoint

    d = tmp_path_factory.mktemp("trt-fake")
    export_checkpoint(write_demo_checkpoint(d / "ckpt"), d / "out")
    return d / "out"


@pytest.fixture()
def env(monkeypatch):
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    device = fake_trt.FakeDevice(sm=87)
    fake_trt.reset(device)
    return device


def options(tmp_path, device, **extra):
    return {"trt": fake_trt, "device": device, "plugin_path": STAND_IN_PLUGIN,
            "engine_dir": tmp_path / "engine", **extra}


def calls(kind):
    return [c for c in fake_trt.CALLS if c[0] == kind]


def test_validate_with_trt_backend(demo, tmp_path, env):
    res = validate_export(demo, backend="trt", result_path=tmp_path / "v.json",
                          backend_options=options(tmp_path, env))
    assert res["passed"], res["failures"]
    assert res["backend"] == "tensorrt" and res["worst_cosine"] > 0.999 and res["top1_agreement"] == 1.0
    assert len(res["steps"]) == 11
    details = res["backend_details"]
    assert details["target"]["target"] == "this-gpu" and details["target"]["sm"] == 87
    assert details["limits"] == {"max_batch_size": 4, "max_input_len": 64, "max_kv_cache_capacity": 64,
                                 "max_lora_rank": 0}
    assert details["build"]["reused"] is False
    assert json.loads((tmp_path / "v.json").read_text())["backend_details"]["device"]["sm"] == 87

    # Built like llm_build: strongly typed, aliased plugin I/O, no precision flags.
    assert calls("create_network") == [("create_network", 1 << 1)]
    (_, preview, flags), = calls("build")
    assert preview == {"ALIASED_PLUGIN_IO_10_03": True} and flags == ["MONITOR_MEMORY"]
    assert calls("parse_from_file")[0][1] == str(demo / "llm" / "model.onnx")

    # llm_build's engine directory, plus the record.
    eng = tmp_path / "engine"
    for name in ("llm.engine", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "processed_chat_template.json", "embedding.safetensors", "build_record.json"):
        assert (eng / name).is_file(), name
    cfg = json.loads((eng / "config.json").read_text())
    assert cfg["builder_config"] == {"max_input_len": 64, "eagle_draft": False, "eagle_base": False,
                                     "max_batch_size": 4, "max_lora_rank": 0, "max_kv_cache_capacity": 64,
                                     "trt_native_ops": False}
    rec = json.loads((eng / "build_record.json").read_text())
    export_cfg = json.loads((demo / "llm" / "config.json").read_text())
    assert rec["profiles"] == profiles_to_json(optimization_profiles(export_cfg, BuildLimits(4, 64, 64)))
    assert rec["tensorrt_version"] == fake_trt.__version__ and rec["builder"]["precision_flags"] == []
    assert rec["plugin"]["path"] == STAND_IN_PLUGIN and rec["build_seconds"] >= 0
    assert rec["memory"]["host_peak_rss_bytes"] > 0 and rec["memory"]["device_used_sampled_peak_bytes"] >= 0
    assert rec["device"]["sm"] == 87

    # The export directory is untouched (its manifest still verifies) and the engine is reused.
    fake_trt.reset(env)
    res2 = validate_export(demo, backend="trt", result_path=tmp_path / "v2.json",
                           backend_options=options(tmp_path, env))
    assert res2["passed"] and res2["backend_details"]["build"]["reused"] is True
    assert calls("build") == []


def test_runner_binds_like_the_runtime(demo, tmp_path, env):
    from edgellm_validate.twin import run_twin

    record = build_engine(demo, tmp_path / "e", BuildOptions(BuildLimits(4, 64, 64), plugin_path=STAND_IN_PLUGIN),
                          device=env, trt=fake_trt)
    runner = TrtRunner(tmp_path / "e" / record["engine"]["file"], env, trt=fake_trt)
    seen = []

    class Spy:
        def run(self, feeds):
            out = runner.run(feeds)
            seen.append((feeds, out))
            return out

    run = run_twin(demo / "llm", Spy())
    assert len(run.steps) == 11
    ctx = runner.context
    profiles = [k for what, *k in ctx.log if what == "profile"]
    assert profiles == [[0], [1], [0], [1]]  # prefill, decodes | prefill, chunk, decodes
    assert sum(1 for what, *_ in ctx.log if what == "shape") == 11 * len(runner.inputs)  # every shape, every step
    # KV caches: uploaded once per scenario and layer (the twin's zeroed buffers), then bound in place.
    kv_ptrs = {buf.ptr for buf in runner._kv.values()}
    assert sum(1 for p in env.uploads if p in kv_ptrs) == 2 * 2
    for _, out in seen:
        for i in range(2):
            present = out[f"present_key_values_{i}"]
            assert isinstance(present, DeviceTensor) and present.shape == (2, 2, 2, 64, 64)
            assert ctx.addresses[f"present_key_values_{i}"] == ctx.addresses[f"past_key_values_{i}"]
        assert isinstance(out["logits"], np.ndarray) and out["logits"].shape[:2] == (2, 1)
    # A handle reads back the cache, which holds the prompt's keys now.
    assert np.abs(np.asarray(seen[-1][1]["present_key_values_0"]).astype(np.float32)).sum() > 0

    # Feeding a fresh host cache makes older handles stale.
    stale = seen[-1][1]["present_key_values_0"]
    first_feeds = dict(seen[0][0])
    runner.run(first_feeds)
    assert not stale.valid
    bad = dict(seen[-1][0], past_key_values_0=stale)
    with pytest.raises(EngineRunError, match="stale"):
        runner.run(bad)
    # A shape outside the profiles is an error naming the input and the profile's range.
    too_big = dict(first_feeds, inputs_embeds=np.zeros((5, 3, 128), np.float16),
                   context_lengths=np.ones(5, np.int32))
    with pytest.raises(EngineRunError, match=r"inputs_embeds shape \[5, 3, 128\] is outside profile 0"):
        runner.run(too_big)
    runner.close()
    with pytest.raises(EngineRunError, match="closed"):
        runner.run(first_feeds)


def test_h200_is_refused_before_any_build(demo, tmp_path, env):
    h200 = fake_trt.FakeDevice(sm=90, name="NVIDIA H200")
    fake_trt.reset(h200)
    with pytest.raises(TargetRefusal, match="SM 90"):
        validate_export(demo, backend="trt", result_path=tmp_path / "v.json", backend_options=options(tmp_path, h200))
    assert calls("Builder") == [] and h200.closed


def test_named_target_must_match_the_gpu(demo, tmp_path, env):
    with pytest.raises(TargetRefusal, match="SM 87, but target thor-jp7 is SM 110"):
        validate_export(demo, backend="trt", result_path=tmp_path / "v.json",
                        backend_options=options(tmp_path, env, target="thor-jp7"))
    res = validate_export(demo, backend="trt", result_path=tmp_path / "v.json",
                          backend_options=options(tmp_path, env, target="orin-jp6"))
    assert res["passed"] and res["backend_details"]["target"]["target"] == "orin-jp6"


def test_plugin_without_the_attention_creator(demo, tmp_path, env):
    fake_trt.REGISTRY.creators = set()
    with pytest.raises(EnvironmentProblem, match="does not register AttentionPlugin v1"):
        validate_export(demo, backend="trt", result_path=tmp_path / "v.json", backend_options=options(tmp_path, env))


def test_missing_plugin_env(demo, tmp_path, env, monkeypatch):
    monkeypatch.delenv("EDGELLM_PLUGIN_PATH", raising=False)
    opts = options(tmp_path, env)
    del opts["plugin_path"]
    with pytest.raises(EnvironmentProblem, match="EDGELLM_PLUGIN_PATH is not set"):
        validate_export(demo, backend="trt", result_path=tmp_path / "v.json", backend_options=opts)


def test_build_failure_is_a_failed_validation(demo, tmp_path, env):
    fake_trt.STATE["fail_build"] = True
    res = validate_export(demo, backend="trt", result_path=tmp_path / "v.json", backend_options=options(tmp_path, env))
    assert not res["passed"]
    assert "TensorRT could not build the engine" in res["failures"][0]
    assert env.closed
    with pytest.raises(EngineBuildFailed) as e:
        build_engine(demo, tmp_path / "e2", BuildOptions(BuildLimits(4, 64, 64), plugin_path=STAND_IN_PLUGIN),
                     trt=fake_trt)
    assert e.value.exit_code == 1


def test_parser_failure_names_the_graph(demo, tmp_path, env):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    (broken / "llm" / "model.onnx.data").unlink()
    with pytest.raises(EngineBuildFailed, match="parser rejected the graph: external data"):
        build_engine(broken, tmp_path / "e", BuildOptions(BuildLimits(4, 64, 64), plugin_path=STAND_IN_PLUGIN),
                     trt=fake_trt)


def test_extra_graph_input_is_refused_before_tensorrt(demo, tmp_path, env):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(demo, other)
    m = onnx.load(str(other / "llm" / "model.onnx"), load_external_data=False)
    m.graph.input.append(onnx.helper.make_tensor_value_info("deepstack_embeds_0", onnx.TensorProto.FLOAT16,
                                                            ["batch", "seq_len", 128]))
    onnx.save(m, str(other / "llm" / "model.onnx"))
    with pytest.raises(Exception, match="deepstack_embeds_0"):
        build_engine(other, tmp_path / "e", BuildOptions(BuildLimits(4, 64, 64), plugin_path=STAND_IN_PLUGIN),
                     trt=fake_trt)
    assert calls("Builder") == []


def test_lunowud_only_on_request(demo, tmp_path, env, monkeypatch):
    import os

    monkeypatch.setenv("__LUNOWUD", "")
    monkeypatch.delenv("__LUNOWUD")  # absent now, and restored to absent after the test
    seen = []
    real_builder = fake_trt.Builder

    class Builder(real_builder):
        def __init__(self, logger):
            seen.append(os.environ.get("__LUNOWUD"))
            super().__init__(logger)

    monkeypatch.setattr(fake_trt, "Builder", Builder)
    opts = BuildOptions(BuildLimits(4, 64, 64), plugin_path=STAND_IN_PLUGIN)
    rec = build_engine(demo, tmp_path / "a", opts, trt=fake_trt)
    assert rec["builder"]["lunowud"] is None and seen == [None]
    opts.lunowud = "-peep:fc_h_fusion=off"
    rec = build_engine(demo, tmp_path / "b", opts, trt=fake_trt)
    assert rec["builder"]["lunowud"] == "-peep:fc_h_fusion=off" and seen[-1] == "-peep:fc_h_fusion=off"
    assert "__LUNOWUD" not in os.environ  # set for that build only
    # a different __LUNOWUD is a different engine: not reused
    opts.lunowud = None
    assert build_engine(demo, tmp_path / "b", opts, trt=fake_trt)["reused"] is False


def test_validate_side_imports_stay_light():
    """The device side must import without torch; TensorRT and pycuda only when used."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import edgellm_validate.validate, edgellm_validate.targets, edgellm_validate.trt.backend\n"
            "import edgellm_validate.trt.build, edgellm_validate.trt.runner, edgellm_validate.trt.cuda_device\n"
            "print(sorted(m for m in ('torch', 'tensorrt', 'pycuda', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
