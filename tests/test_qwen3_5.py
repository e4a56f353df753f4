"""Qwen3.5 text: GatedDeltaNet layers and gated full attention, exported and held to HF transformers.

The twin runs the lowered graph (the runtime kernels' semantics, including the 0.7.1 conv kernel's
prefill path that ignores an incoming conv state) over the golden scenarios: a ragged batch of 2 through
plain prefill + decode and chunked prefill + decode. The chunked scenario only agrees with HF because the
graph feeds the conv the previous chunk's inputs (models/blocks/gdn.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import hf_reference_logits, make_hf_model, save_checkpoint
from onnx import TensorProto
from onnx import load as onnx_load

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
# Real Qwen3.5 attention shapes: head_dim 256 with a quarter rotary (64), 4 query heads per KV head.
QWEN3_5 = dict(head_dim=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
               layer_types=LAYER_TYPES, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128,
               linear_value_head_dim=128, linear_conv_kernel_dim=4,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})


@pytest.fixture(scope="module")
def qwen3_5_export(tmp_path_factory):
    from edgellm_export.export import ExportOptions, export_checkpoint

    model = make_hf_model("qwen3_5_text", seed=5, **QWEN3_5)
    root = tmp_path_factory.mktemp("qwen3_5")
    ckpt = save_checkpoint(model, root / "ckpt")
    export_checkpoint(ckpt, root / "out", ExportOptions())
    return ckpt, model, root / "out"


def test_twin_matches_transformers_over_prefill_chunked_prefill_and_decode(qwen3_5_export):
    from edgellm_validate.compare import cosine_rows
    from edgellm_validate.cpu_backend import CpuBackend
    from edgellm_validate.twin import run_twin

    _, model, out = qwen3_5_export
    llm = out / "llm"
    ref = hf_reference_logits(model, llm)
    phases = set()
    steps = run_twin(llm, CpuBackend(llm)).steps
    for s in steps:
        want = ref[(s.scenario, s.index)]
        cos = float(cosine_rows(s.logits, want).min())
        assert cos >= 0.999, f"{s.scenario}[{s.index}] ({s.phase}): cosine {cos}"
        np.testing.assert_array_equal(s.logits.argmax(-1), want.argmax(-1), f"{s.scenario}[{s.index}] top-1")
        phases.add(s.phase)
    assert phases == {"prefill", "chunked_prefill", "decode"} and len(steps) >= 10


def test_validate_passes_and_names_the_runtime_limit(qwen3_5_export):
    """validate passes, and carries the hybrid's known runtime limit (the system-prompt cache) into the
    qualification case and summary.md, as a note, not a failure."""
    from edgellm_validate.report import case_from_validation, new_report, render_summary
    from edgellm_validate.validate import validate_export

    out = qwen3_5_export[2]
    res = validate_export(out)
    assert res["passed"], res["failures"]
    assert len(res["runtime_limits"]) == 1 and "system-prompt cache" in res["runtime_limits"][0]
    case = case_from_validation("qwen3_5 fp16", res, target="x86-cpu", export_dir=out)
    assert case["verdict"] == "pass" and case["runtime_limits"] == res["runtime_limits"]
    md = render_summary(new_report([case]))
    assert "## Known runtime limits" in md and "qwen3_5 fp16: system-prompt cache" in md


def test_graph_bindings_in_the_runtime_order(qwen3_5_export):
    """KV caches by attention ordinal, then after last_token_ids every conv state, then every recurrent
    state, by recurrent ordinal (families.md §3); outputs in the same order after the logits."""
    _, _, out = qwen3_5_export
    graph = onnx_load(str(out / "llm" / "model.onnx"), load_external_data=False).graph

    def sig(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_value or d.dim_param for d in t.shape.dim]

    conv_dim = 2 * 2 * 128 + 4 * 128
    assert [sig(i) for i in graph.input] == [
        ("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq_len", 256]),
        ("past_key_values_0", TensorProto.FLOAT16, ["batch", 2, 2, "past_len", 256]),
        ("rope_rotary_cos_sin", TensorProto.FLOAT, ["rope_batch", "max_pos", 64]),
        ("context_lengths", TensorProto.INT32, ["batch"]),
        ("kvcache_start_index", TensorProto.INT32, ["kv_batch"]),
        ("last_token_ids", TensorProto.INT64, ["batch", 1]),
        *[(f"conv_state_{k}", TensorProto.FLOAT16, ["batch", conv_dim, 4]) for k in range(3)],
        *[(f"recurrent_state_{k}", TensorProto.FLOAT, ["batch", 4, 128, 128]) for k in range(3)],
    ]
    assert [o.name for o in graph.output] == [
        "logits", "present_key_values_0", *[f"present_conv_state_{k}" for k in range(3)],
        *[f"present_recurrent_state_{k}" for k in range(3)]]
    ops = [n.op_type for n in graph.node if n.domain == "trt_edgellm"]
    assert ops.count("causal_conv1d") == 3 and ops.count("gated_delta_net") == 3
    assert ops.count("AttentionPlugin") == 1
    a_log = [i for i in graph.initializer if i.name.endswith("A_log")]
    assert len(a_log) == 3 and all(i.data_type == TensorProto.FLOAT for i in a_log)  # kept fp32


def test_runtime_config_is_hybrid(qwen3_5_export):
    _, _, out = qwen3_5_export
    cfg = json.loads((out / "llm" / "config.json").read_text())
    assert cfg["model_type"] == "hybrid_mamba" and cfg["model"] == "qwen3_5_text"
    assert cfg["num_linear_attn_layers"] == 3 and cfg["num_attention_layers"] == 1
    assert (cfg["recurrent_state_num_heads"], cfg["recurrent_state_head_dim"], cfg["recurrent_state_size"]) == (
        4, 128, 128)
    assert (cfg["conv_dim"], cfg["conv_kernel"], cfg["use_rope"]) == (2 * 2 * 128 + 4 * 128, 4, True)
    assert cfg["layer_types"] == ["mamba", "attention", "mamba", "mamba"]
    assert cfg["kv_layer_configs"] == [None, {"num_kv_heads": 2, "head_dim": 256}, None, None]
    assert cfg["partial_rotary_factor"] == 0.25


def test_trt_profiles_cover_the_hybrid_graph(qwen3_5_export):
    """llm_build's profiles for a hybrid: KV per attention layer, conv and recurrent states per recurrent
    layer with fixed dims after the batch; every input covered, static dims pinned to the graph's."""
    from edgellm_validate.trt.profiles import BuildLimits, check_inputs_covered, optimization_profiles

    llm = qwen3_5_export[2] / "llm"
    graph = onnx_load(str(llm / "model.onnx"), load_external_data=False).graph
    profiles = optimization_profiles(json.loads((llm / "config.json").read_text()),
                                     BuildLimits(max_batch_size=3, max_input_len=32, max_kv_cache_capacity=64))
    check_inputs_covered(profiles, [i.name for i in graph.input])
    for shapes in profiles.values():
        for inp in graph.input:
            rng = shapes[inp.name]
            for k, dim in enumerate(inp.type.tensor_type.shape.dim):
                if dim.HasField("dim_value"):
                    assert (rng.min[k], rng.opt[k], rng.max[k]) == (dim.dim_value,) * 3, (inp.name, k)
        assert shapes["conv_state_2"].min == (1, 2 * 2 * 128 + 4 * 128, 4)
        assert shapes["recurrent_state_0"].max == (3, 4, 128, 128)
        assert "past_key_values_1" not in shapes


def test_norms_hold_one_plus_w(qwen3_5_export):
    """(1 + w) RMSNorm weights: the initializer holds 1 + w rounded once to fp16."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    ckpt, _, out = qwen3_5_export
    m = onnx.load(str(out / "llm" / "model.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name in ("layers.1.input_layernorm.weight", "layers.1.self_attn.q_norm.weight", "norm.weight"):
        want = (tensors[f"model.{name}"].float() + 1).half().numpy()
        np.testing.assert_array_equal(init[f"{name}+1"], want)
    # The GatedDeltaNet's own norm uses the plain convention.
    np.testing.assert_array_equal(init["layers.0.linear_attn.norm.weight"],
                                  tensors["model.layers.0.linear_attn.norm.weight"].half().numpy())


@pytest.mark.parametrize("layer_types, message", [
    (["linear_attention", "full_attention", "mamba", "full_attention"], "'mamba'"),
    (["linear_attention", "full_attention"], "one entry per layer"),
])
def test_bad_layer_plan_is_refused(tmp_path, capsys, layer_types, message):
    from edgellm_export.cli import main

    model = make_hf_model("qwen3_5_text", seed=1, **{**QWEN3_5, "num_hidden_layers": 4})
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    cfg_path = ckpt / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["layer_types"] = layer_types
    cfg_path.write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, words", [
    ({"linear_key_head_dim": 64}, ["GatedDeltaNet head dims 64 (key) / 128 (value)", "only 128 / 128"]),
    ({"linear_conv_kernel_dim": 9}, ["linear_conv_kernel_dim 9", "1..8"]),
    ({"linear_num_value_heads": 3}, ["linear_num_value_heads (3)", "multiple of linear_num_key_heads (2)"]),
])
def test_kernel_shapes_the_runtime_cannot_run_are_refused(tmp_path, capsys, change, words):
    """GatedDeltaNet dims the 0.7.1 kernels do not have, named with the supported values; exit 2, nothing written."""
    from edgellm_export.cli import main

    ckpt = save_checkpoint(make_hf_model("qwen3_5_text", seed=1, **QWEN3_5), tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw.update(change)
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_quantized_checkpoint_is_refused(tmp_path, capsys):
    from edgellm_export.cli import main

    model = make_hf_model("qwen3_5_text", seed=1, **QWEN3_5)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                  "version": "gemm"}
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_hf_reference_is_consistent_with_itself():
    """The reference: HF's full forward equals its own cached prefill + decode (so a twin mismatch is ours)."""
    model = make_hf_model("qwen3_5_text", seed=5, **QWEN3_5)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        out = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    cos = torch.nn.functional.cosine_similarity(full, step, dim=0)
    assert float(cos) > 0.99999


def _vlm_checkpoint(root):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = {k: v for k, v in QWEN3_5.items()}
    text.update(vocab_size=512, hidden_size=256, intermediate_size=512, rms_norm_eps=1e-5)
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256)
    torch.manual_seed(3)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(4.0)
    return save_checkpoint(model, root / "ckpt"), model


def _llava_checkpoint(root):
    """A tiny LLaVA: a language model this version exports (a Llama decoder), a tower it does not (CLIP; 0.7.1's
    runtime has no LLaVA runner either)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(3)
    text = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                      image_token_id=500)).eval()
    return save_checkpoint(model, root / "ckpt"), model


@pytest.mark.parametrize("components, code, words", [
    (None, 2, ["a visual encoder (vision_config)", "--components llm"]),
    ("llm,visual", 2, ["--components visual", "not implemented yet", "vision towers: internvl"]),
    ("llm,video", 2, ["'video'", "llm, visual, audio"]),
])
def test_a_vlm_never_loses_its_vision_tower_silently(tmp_path, capsys, components, code, words):
    """Without --components, a checkpoint with an encoder this version cannot export (LLaVA's) is refused (it
    used to be exported as its language model alone, exit 0); asking for the encoder says it is not implemented."""
    from edgellm_export.cli import main

    ckpt, _ = _llava_checkpoint(tmp_path)
    args = ["-q", "export", str(ckpt), str(tmp_path / "out")] + (["--components", components] if components else [])
    assert main(args) == code
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_vlm_wrapper_exports_its_text_part(tmp_path):
    """The `qwen3_5` VLM wrapper (`Qwen3_5ForConditionalGeneration`, keys under `model.language_model.` and
    `model.visual.`), with `--components llm`: its text decoder is exported and matches HF's text-only forward;
    config.json carries the wrapper's vision_config verbatim for the runtime's VLM runner."""
    from edgellm_export.export import ExportOptions, export_checkpoint
    from edgellm_validate.compare import cosine_rows
    from edgellm_validate.cpu_backend import CpuBackend
    from edgellm_validate.twin import run_twin

    ckpt, model = _vlm_checkpoint(tmp_path)
    export_checkpoint(ckpt, tmp_path / "out", ExportOptions(components=("llm",)))  # the vision tower: knowingly not
    llm = tmp_path / "out" / "llm"
    cfg = json.loads((llm / "config.json").read_text())
    assert cfg["model"] == "qwen3_5_text" and cfg["model_type"] == "hybrid_mamba"
    assert cfg["vision_config"] == json.loads((ckpt / "config.json").read_text())["vision_config"]
    ref = hf_reference_logits(model, llm)
    for s in run_twin(llm, CpuBackend(llm)).steps:
        want = ref[(s.scenario, s.index)]
        assert float(cosine_rows(s.logits, want).min()) >= 0.999, (s.scenario, s.index)
        np.testing.assert_array_equal(s.logits.argmax(-1), want.argmax(-1))


def test_trt_backend_binds_the_states_in_place(qwen3_5_export, tmp_path, monkeypatch):
    """Through the TensorRT path (the stand-in: profiles enforced, graph run with onnxruntime, presents
    written through their inputs' addresses): every conv and recurrent state is aliased to its input like
    the KV cache, and head_dim 256 with 4 query heads per KV head passes the target's kernel check."""
    from pathlib import Path as _Path

    import fake_tensorrt as fake_trt

    from edgellm_validate.trt import plugin as plugin_mod
    from edgellm_validate.trt.plugin import exported_plugins
    from edgellm_validate.validate import validate_export

    out = qwen3_5_export[2]
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    device = fake_trt.FakeDevice(sm=87)
    fake_trt.reset(device)
    fake_trt.REGISTRY.creators.update(exported_plugins())
    import _ctypes

    opts = {"trt": fake_trt, "device": device, "plugin_path": str(_Path(_ctypes.__file__).resolve()),
            "engine_dir": tmp_path / "engine"}
    res = validate_export(out, backend="trt", result_path=tmp_path / "v.json", backend_options=opts)
    fake_trt.reset()
    assert res["passed"], res["failures"]
    aliased = res["backend_details"]["engine"]["aliased"]
    assert aliased == {"present_key_values_0": "past_key_values_0",
                       **{f"present_conv_state_{k}": f"conv_state_{k}" for k in range(3)},
                       **{f"present_recurrent_state_{k}": f"recurrent_state_{k}" for k in range(3)}}
