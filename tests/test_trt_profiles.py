"""The TensorRT optimization profiles are llm_build 0.7.1's, to the dim (contract text.md §8,
engine-build-and-containers.md §3.1-3.3); invalid limits fail with a clear error."""

from __future__ import annotations

import json

import onnx
import pytest

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_validate.trt.profiles import (
    CONTEXT,
    GENERATION,
    PROFILE_ORDER,
    BuildLimits,
    ProfileError,
    ShapeRange,
    check_inputs_covered,
    input_names,
    limits_for_bundle,
    model_dims,
    optimization_profiles,
    profiles_to_json,
)

# Shapes of the tiny qwen3 in the contract (N=2, H=256, Hkv=2, D=64).
CONFIG = {"model": "qwen3", "model_type": "llm", "edgellm_version": "0.7.1", "trt_native_ops": False,
          "vocab_size": 320, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 64, "partial_rotary_factor": 1.0, "num_deepstack_features": 0}


def table(b, seq, cap, h=256, hkv=2, d=64, r=64, layers=2):
    """The contract's table, written out by hand: {profile: {input: (min, opt, max)}}."""
    kv = {f"past_key_values_{i}": ((1, 2, hkv, 0, d), (b, 2, hkv, cap, d), (b, 2, hkv, cap, d))
          for i in range(layers)}
    common = {
        "context_lengths": ((1,), (b,), (b,)),
        "rope_rotary_cos_sin": ((1, cap, r), (b, cap, r), (b, cap, r)),
        "last_token_ids": ((1, 1), (b, 1), (b, 1)),
        **kv,
    }
    return {
        CONTEXT: {"inputs_embeds": ((1, 1, h), (b, seq // 2, h), (b, seq, h)),
                  "kvcache_start_index": ((0,), (b,), (b,)), **common},
        GENERATION: {"inputs_embeds": ((1, 1, h), (b, 1, h), (b, 1, h)),
                     "kvcache_start_index": ((1,), (b,), (b,)), **common},
    }


def as_tuples(profiles):
    return {p: {n: tuple(r) for n, r in shapes.items()} for p, shapes in profiles.items()}


def test_defaults_are_llm_builds():
    assert BuildLimits() == BuildLimits(max_batch_size=4, max_input_len=1024, max_kv_cache_capacity=4096,
                                        max_lora_rank=0)
    got = optimization_profiles(CONFIG)
    assert list(got) == list(PROFILE_ORDER) == [CONTEXT, GENERATION]  # context is profile 0
    assert as_tuples(got) == table(4, 1024, 4096)


def test_small_limits_match_the_table():
    got = optimization_profiles(CONFIG, BuildLimits(max_batch_size=2, max_input_len=64, max_kv_cache_capacity=64))
    assert as_tuples(got) == table(2, 64, 64)
    r = got[CONTEXT]["inputs_embeds"]
    assert isinstance(r, ShapeRange) and r.min == (1, 1, 256) and r.opt == (2, 32, 256) and r.max == (2, 64, 256)


def test_batch_one():
    got = optimization_profiles(CONFIG, BuildLimits(max_batch_size=1, max_input_len=16, max_kv_cache_capacity=32))
    assert as_tuples(got) == table(1, 16, 32)
    assert got[CONTEXT]["kvcache_start_index"] == ((0,), (1,), (1,))  # the empty-cache sentinel stays
    assert got[GENERATION]["kvcache_start_index"] == ((1,), (1,), (1,))
    assert got[GENERATION]["inputs_embeds"] == ((1, 1, 256), (1, 1, 256), (1, 1, 256))


def test_odd_input_length_uses_integer_division():
    got = optimization_profiles(CONFIG, BuildLimits(max_input_len=7, max_kv_cache_capacity=16))
    assert got[CONTEXT]["inputs_embeds"].opt == (4, 3, 256)
    got = optimization_profiles(CONFIG, BuildLimits(max_input_len=2, max_kv_cache_capacity=2))
    assert got[CONTEXT]["inputs_embeds"] == ((1, 1, 256), (4, 1, 256), (4, 2, 256))


def test_rotary_dim_head_dim_fallback_and_layers():
    cfg = {**CONFIG, "partial_rotary_factor": 0.5, "num_hidden_layers": 3}
    del cfg["head_dim"]  # llm_build falls back to hidden_size / num_attention_heads = 64
    got = optimization_profiles(cfg, BuildLimits(max_batch_size=2, max_input_len=8, max_kv_cache_capacity=8))
    assert as_tuples(got) == table(2, 8, 8, r=32, layers=3)
    assert model_dims(cfg).rotary_dim == 32
    assert input_names(cfg) == ["inputs_embeds", "past_key_values_0", "past_key_values_1", "past_key_values_2",
                                "rope_rotary_cos_sin", "context_lengths", "kvcache_start_index", "last_token_ids"]


def test_every_profile_names_every_input_once():
    got = optimization_profiles(CONFIG)
    for shapes in got.values():
        assert sorted(shapes) == sorted(input_names(CONFIG))


@pytest.mark.parametrize("limits, words", [
    (BuildLimits(max_input_len=1, max_kv_cache_capacity=8), ["max_input_len 1", "opt", ">= 2"]),
    (BuildLimits(max_input_len=4096, max_kv_cache_capacity=1024), ["exceeds max_kv_cache_capacity"]),
    (BuildLimits(max_batch_size=0), ["max_batch_size", "positive integer"]),
    (BuildLimits(max_kv_cache_capacity=-5), ["max_kv_cache_capacity"]),
    (BuildLimits(max_batch_size=True), ["max_batch_size"]),
    (BuildLimits(max_input_len=16.0, max_kv_cache_capacity=64), ["max_input_len"]),
])
def test_invalid_limits_are_refused_clearly(limits, words):
    with pytest.raises(ProfileError) as e:
        optimization_profiles(CONFIG, limits)
    assert e.value.exit_code == 2
    for w in words:
        assert w in str(e.value)


def test_lora_rank_is_unsupported():
    with pytest.raises(UnsupportedError, match="lora_model.onnx"):
        optimization_profiles(CONFIG, BuildLimits(max_lora_rank=8))


@pytest.mark.parametrize("change, exc, words", [
    ({"hidden_size": None}, ProfileError, "hidden_size"),
    ({"num_key_value_heads": 0}, ProfileError, "num_key_value_heads"),
    ({"num_hidden_layers": "2"}, ProfileError, "num_hidden_layers"),
    ({"partial_rotary_factor": 0}, ProfileError, "partial_rotary_factor"),
    ({"trt_native_ops": "yes"}, ProfileError, "trt_native_ops"),  # true: tests/test_native_export.py
    ({"trt_native_ops": True, "model_type": "hybrid_mamba", "num_linear_attn_layers": 1}, UnsupportedError,
     "hybrid"),
    ({"model_type": "eagle3_base"}, UnsupportedError, "vanilla"),
    ({"num_deepstack_features": -1}, ProfileError, "num_deepstack_features"),
    ({"num_deepstack_features": 2, "trt_native_ops": True}, UnsupportedError, "deepstack"),
])
def test_configs_the_vanilla_profiles_do_not_cover(change, exc, words):
    cfg = {**CONFIG, **change}
    if change.get("hidden_size", 1) is None:
        del cfg["hidden_size"]
    with pytest.raises(exc, match=words):
        optimization_profiles(cfg, where="llm/config.json")


def test_error_names_the_config_file():
    cfg = dict(CONFIG)
    del cfg["num_attention_heads"]
    with pytest.raises(ExportError) as e:
        optimization_profiles(cfg, where="OUT/llm/config.json")
    assert str(e.value).startswith("OUT/llm/config.json: ")


def test_json_form_is_plain_and_ordered():
    got = optimization_profiles(CONFIG, BuildLimits(max_batch_size=2, max_input_len=8, max_kv_cache_capacity=16))
    j = json.loads(json.dumps(profiles_to_json(got)))
    assert [(p["index"], p["name"]) for p in j] == [(0, "context"), (1, "generation")]
    assert j[0]["shapes"]["kvcache_start_index"] == {"min": [0], "opt": [2], "max": [2]}
    assert j[1]["shapes"]["past_key_values_1"] == {"min": [1, 2, 2, 0, 64], "opt": [2, 2, 2, 16, 64],
                                                    "max": [2, 2, 2, 16, 64]}


def test_builder_config_names():
    assert BuildLimits(2, 64, 128).builder_config() == {
        "max_input_len": 64, "eagle_draft": False, "eagle_base": False, "max_batch_size": 2, "max_lora_rank": 0,
        "max_kv_cache_capacity": 128, "trt_native_ops": False}


def _meta(batch=2, lens=(11, 6), cap=64):
    rows = [[1] * n + [0] * (max(lens) - n) for n in lens][:batch] or [[1]]
    rows += [[1] * max(lens)] * (batch - len(rows))
    return {"kv_capacity": cap, "scenarios": [{"name": "s", "steps": [
        {"phase": "prefill", "token_ids": rows, "context_lengths": [max(lens)] * batch},
        {"phase": "decode", "token_ids": [[1]] * batch, "context_lengths": [1] * batch}]}]}


def test_limits_for_the_golden_bundle():
    lim = limits_for_bundle(_meta())
    assert lim == BuildLimits(max_batch_size=4, max_input_len=64, max_kv_cache_capacity=64)
    assert limits_for_bundle(_meta(batch=6)).max_batch_size == 6
    assert limits_for_bundle(_meta(), BuildLimits(max_batch_size=2, max_input_len=16)).max_input_len == 16
    # the longest prefill must fit, even below llm_build's opt
    assert limits_for_bundle(_meta(lens=(20, 3)), BuildLimits(max_input_len=8)).max_input_len == 20
    with pytest.raises(ProfileError, match="exceeds max_kv_cache_capacity"):
        limits_for_bundle(_meta(lens=(80, 3)))


def test_coverage_check():
    got = optimization_profiles(CONFIG)
    check_inputs_covered(got, input_names(CONFIG))
    with pytest.raises(UnsupportedError, match="deepstack_embeds_0"):
        check_inputs_covered(got, [*input_names(CONFIG), "deepstack_embeds_0"])
    with pytest.raises(ProfileError, match="last_token_ids"):
        check_inputs_covered(got, input_names(CONFIG)[:-1])


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    pytest.importorskip("torch")
    from edgellm_export.demo_checkpoint import write_demo_checkpoint
    from edgellm_export.export import export_checkpoint

    d = tmp_path_factory.mktemp("profiles-demo")
    export_checkpoint(write_demo_checkpoint(d / "ckpt"), d / "out")
    return d / "out" / "llm"


def test_profiles_fit_the_exported_graph(demo_export):
    """Every graph input has a profile; static dims are pinned to their value; inputs that share a
    symbolic dim name get identical ranges (TensorRT requires same-named dims to agree)."""
    model = onnx.load(str(demo_export / "model.onnx"), load_external_data=False)
    config = json.loads((demo_export / "config.json").read_text())
    limits = BuildLimits(max_batch_size=3, max_input_len=32, max_kv_cache_capacity=64)
    profiles = optimization_profiles(config, limits)
    check_inputs_covered(profiles, [i.name for i in model.graph.input])
    for pname, shapes in profiles.items():
        named: dict[str, set] = {}
        for inp in model.graph.input:
            dims = inp.type.tensor_type.shape.dim
            rng = shapes[inp.name]
            assert len(dims) == len(rng.min), (pname, inp.name)
            for k, dim in enumerate(dims):
                triple = (rng.min[k], rng.opt[k], rng.max[k])
                if dim.HasField("dim_value"):
                    assert triple == (dim.dim_value,) * 3, (pname, inp.name, k)
                else:
                    named.setdefault(dim.dim_param, set()).add(triple)
        assert all(len(v) == 1 for v in named.values()), (pname, named)


def test_deepstack_inputs_get_the_inputs_embeds_ranges():
    """Qwen3-VL (setupDeepstackProfiles): every deepstack_embeds_i, after last_token_ids, in both profiles."""
    cfg = {**CONFIG, "num_deepstack_features": 3}
    names = input_names(cfg)
    assert names[names.index("last_token_ids") + 1:][:3] == ["deepstack_embeds_0", "deepstack_embeds_1",
                                                             "deepstack_embeds_2"]
    got = optimization_profiles(cfg, BuildLimits(4, 64, 128))
    for shapes in got.values():
        for i in range(3):
            assert shapes[f"deepstack_embeds_{i}"] == shapes["inputs_embeds"]
    assert got["context"]["deepstack_embeds_2"] == ShapeRange((1, 1, 256), (4, 32, 256), (4, 64, 256))
    assert got["generation"]["deepstack_embeds_0"].max == (4, 1, 256)
    check_inputs_covered(got, names)
