"""The smoke check's one-layer engine: built and run through the whole TensorRT path (profiles, build,
runner with the KV cache bound in place, both profiles) and compared with the CPU twin.

Here TensorRT is the stand-in (tests/fake_tensorrt.py: its "engine" runs the graph with onnxruntime and
enforces the profiles), so these tests hold the check's plumbing and its verdicts; on a board the same
code builds a real engine with the real plugin library (the HIL workflow runs the smoke check first).
"""

from __future__ import annotations

import _ctypes
import sys
from pathlib import Path

import fake_tensorrt
import numpy as np
import onnx
import pytest

from edgellm_validate import smoke, smoke_engine
from edgellm_validate.trt import plugin as plugin_mod

SOME_SO = Path(_ctypes.__file__).resolve()  # any loadable library stands in for the plugin library


@pytest.fixture
def fake_board(monkeypatch):
    device = fake_tensorrt.FakeDevice(sm=87, name="Fake Orin")
    fake_tensorrt.reset(device)
    fake_tensorrt.REGISTRY.creators.update(plugin_mod.exported_plugins())
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(smoke, "cuda_devices", lambda: ([{"index": 0, "name": "Fake Orin", "sm": 87}], "fake"))
    monkeypatch.setattr(smoke, "_open_device", lambda: device)
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    yield device
    fake_tensorrt.reset()


def test_one_layer_engine_builds_runs_and_matches_the_twin(fake_board):
    report = smoke.run_smoke("orin-jp6", plugin_path=str(SOME_SO))
    assert report["ok"], report["problems"]
    engine = report["engine"]
    assert engine["ok"] and engine["steps"] == 3 and engine["compared_with_cpu"]
    assert len(engine["cosines"]) == 3 and min(engine["cosines"]) > 0.9999 and all(engine["top1_agree"])
    builds = [c for c in fake_tensorrt.CALLS if c[0] == "build"]
    assert len(builds) == 1  # one engine, built once, run in both profiles


def test_the_graph_is_valid_and_uses_the_bindings(tmp_path):
    llm = smoke_engine.write_one_layer_export(tmp_path / "llm")
    model = onnx.load(str(llm / "model.onnx"))
    from edgellm_core.ops import register_schemas

    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["inputs_embeds", "past_key_values_0", "rope_rotary_cos_sin",
                                                   "context_lengths", "kvcache_start_index", "last_token_ids"]
    assert [o.name for o in model.graph.output] == ["logits", "present_key_values_0"]
    assert [n.op_type for n in model.graph.node if n.domain] == ["AttentionPlugin"]


def test_a_failed_build_is_a_named_problem(fake_board):
    fake_tensorrt.STATE["fail_build"] = True
    report = smoke.run_smoke("orin-jp6", plugin_path=str(SOME_SO))
    assert not report["ok"] and report["engine"] == {"ok": False}
    assert any("one-layer engine check failed" in p and "could not build" in p for p in report["problems"])


def test_an_engine_that_computes_something_else_fails(fake_board, monkeypatch):
    write = fake_board.write

    def wrong_logits(ptr, array):  # the "engine" negates its logits: top-1 and cosine both go wrong
        array = np.asarray(array)
        if array.dtype == np.float32 and array.shape[-1] == smoke_engine.VOCAB:
            array = -array
        write(ptr, array)

    monkeypatch.setattr(fake_board, "write", wrong_logits)
    report = smoke.run_smoke("orin-jp6", plugin_path=str(SOME_SO))
    assert not report["ok"]
    assert sum("disagrees with the CPU twin" in p for p in report["problems"]) == 3, report["problems"]


def test_no_engine_flag_and_missing_plugins_skip_the_build(fake_board):
    report = smoke.run_smoke("orin-jp6", plugin_path=str(SOME_SO), engine_check=False)
    assert report["ok"] and "engine" not in report
    fake_tensorrt.REGISTRY.creators = {("AttentionPlugin", "1", "")}
    report = smoke.run_smoke("orin-jp6", plugin_path=str(SOME_SO))
    assert not report["ok"] and "engine" not in report  # the registry problem is reported, no build tried
    assert not [c for c in fake_tensorrt.CALLS if c[0] == "build"]


# ---------------------------------------------------------------- the plugin-free target (x86-cuda-native)


@pytest.fixture
def fake_h100(monkeypatch):
    """An image with TensorRT (the stand-in, version >= 10.15) and no plugin library, on an SM 90 GPU: the
    registry is empty, so any plugin lookup would be a problem."""
    device = fake_tensorrt.FakeDevice(sm=90, name="Fake H100")
    fake_tensorrt.reset(device)
    fake_tensorrt.REGISTRY.creators = set()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(smoke, "cuda_devices", lambda: ([{"index": 0, "name": "Fake H100", "sm": 90}], "fake"))
    monkeypatch.setattr(smoke, "_open_device", lambda: device)
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    monkeypatch.delenv("EDGELLM_PLUGIN_PATH", raising=False)
    yield device
    fake_tensorrt.reset()


def test_plugin_free_target_builds_the_native_layer_without_a_plugin(fake_h100, monkeypatch):
    made = []
    write = smoke_engine.write_one_layer_export

    def recorded(llm, *args, **kwargs):
        out = write(llm, *args, **kwargs)
        made.append({node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node})
        return out

    monkeypatch.setattr(smoke_engine, "write_one_layer_export", recorded)
    report = smoke.run_smoke("x86-cuda-native")
    assert report["ok"], report["problems"]
    assert report["plugin"] is None and report["sm"] == 90  # SM 90: TensorRT's attention, not the plugin's
    engine = report["engine"]
    assert engine["form"] == "plugin-free" and engine["steps"] == 3 and engine["compared_with_cpu"]
    assert min(engine["cosines"]) > 0.9999 and all(engine["top1_agree"])
    assert len([c for c in fake_tensorrt.CALLS if c[0] == "build"]) == 1
    assert len(made) == 1 and {"RotaryEmbedding", "TensorScatter", "Attention"} <= made[0]
    assert "AttentionPlugin" not in made[0]


def test_plugin_free_target_needs_tensorrt_10_15(fake_h100, monkeypatch):
    monkeypatch.setattr(fake_tensorrt, "__version__", "10.13.3.9")
    report = smoke.run_smoke("x86-cuda-native")
    assert not report["ok"] and "engine" not in report
    assert len(report["problems"]) == 1
    assert "10.13.3.9" in report["problems"][0] and "plugin-free" in report["problems"][0]
    assert "10.15" in report["problems"][0]
    # and the plugin image's range: TensorRT 11 removed the V2 plugin path the AttentionPlugin uses
    monkeypatch.setattr(fake_tensorrt, "__version__", "11.0.0.3")
    report = smoke.run_smoke("x86-cuda", plugin_path=str(SOME_SO), engine_check=False)
    assert any("11.0.0.3" in p and "plugin library works with" in p for p in report["problems"])


def test_sm_rules_differ_between_the_plugin_and_plugin_free_targets():
    from edgellm_validate.targets import get_target

    native, plugin = get_target("x86-cuda-native"), get_target("x86-cuda")
    assert smoke.sm_problems(native, 90) == []
    assert any("decode attention" in p for p in smoke.sm_problems(plugin, 90))
    assert smoke.sm_problems(native, 75) == ["the GPU is SM 75; target x86-cuda-native is meant for SM "
                                             "80, 86, 89, 90, 100, 103, 120"]


def test_the_native_graph_is_standard_onnx_with_the_native_bindings(tmp_path):
    import onnxruntime as ort

    llm = smoke_engine.write_one_layer_export(tmp_path / "llm", native=True)
    model = onnx.load(str(llm / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)  # no schema of ours registered: standard ops only
    assert [i.name for i in model.graph.input] == ["inputs_embeds", "rope_rotary_cos_sin", "context_lengths",
                                                   "last_token_ids", "k_cache_0", "v_cache_0",
                                                   "kvcache_start_index"]
    assert [o.name for o in model.graph.output] == ["logits", "present_k_cache_0", "present_v_cache_0"]
    assert not [n for n in model.graph.node if n.domain]
    ort.InferenceSession(str(llm / "model.onnx"), providers=["CPUExecutionProvider"])  # loads unmodified
