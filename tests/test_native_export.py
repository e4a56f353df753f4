"""`edgellm export --attention native`: the plugin-free (`trt_native_ops`) form of contract/edgellm-0.7/native.md.

Exports of tiny dense checkpoints are run by onnxruntime on the graph exactly as written (no lowering, no
precision rewrites) through the golden scenarios (ragged batch of 2: prefill + decode, chunked prefill +
decode) and held against HF transformers; `validate` passes; the native and plugin exports of one checkpoint
agree; the graph is standard ONNX with the runtime's native bindings; the TensorRT profiles cover it; FP8
and MXFP8 linears work natively; what the native path cannot express is refused with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import hf_reference_logits, make_hf_model, save_checkpoint
from onnx import TensorProto, helper

from edgellm_core.bindings import V0_7
from edgellm_export.cli import main
from edgellm_export.export import ExportOptions, export_checkpoint
from edgellm_validate.compare import cosine_rows, thresholds
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.twin import drive, load_bundle
from edgellm_validate.validate import validate_export

FAMILIES = ["llama", "qwen3", "mistral", "qwen2", "phi3"]
CAP = 4096  # 0.7.1's static native capacity


class RawOrt:
    """onnxruntime on model.onnx as written: no lowering, no fp16 widening, no MatMul splitting."""

    name = "onnxruntime-raw"

    def __init__(self, llm: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # TensorScatter's "in-place optimization not activated" notices
        self.session = ort.InferenceSession(str(llm / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        return dict(zip(self.outputs, self.session.run(None, feeds)))


def _steps(llm: Path, backend) -> dict:
    meta, _ = load_bundle(llm)
    return {(sc, k): (st, logits) for sc, k, st, logits in
            drive(llm, backend, meta["scenarios"], int(meta["kv_capacity"]))}


@pytest.fixture(scope="module")
def exports(hf_checkpoints, tmp_path_factory):
    """family -> (native llm dir, plugin llm dir, HF model), made once."""
    made = {}

    def get(family: str):
        if family not in made:
            ckpt, model = hf_checkpoints(family)
            root = tmp_path_factory.mktemp(f"native-{family}")
            export_checkpoint(ckpt, root / "native", ExportOptions(attention="native"))
            export_checkpoint(ckpt, root / "plugin")
            made[family] = (root / "native" / "llm", root / "plugin" / "llm", model)
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_unmodified_graph_matches_transformers_every_step(family, exports, record_property):
    llm, _, model = exports(family)
    ref = hf_reference_logits(model, llm)
    got = _steps(llm, RawOrt(llm))
    phases = {st["phase"] for st, _ in got.values()}
    assert phases == {"prefill", "chunked_prefill", "decode"}
    worst = 1.0
    for key, (st, logits) in got.items():
        assert len(set(st["context_lengths"])) > 1 or st["phase"] == "decode"  # ragged prefills
        cos = cosine_rows(logits, ref[key])
        worst = min(worst, float(cos.min()))
        assert cos.min() >= 0.999, (key, cos)
        assert (logits.argmax(-1) == ref[key].argmax(-1)).all(), key
    record_property("worst_cosine_vs_hf", worst)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_validate_passes_and_agrees_with_the_plugin_export(family, exports):
    llm, plugin_llm, _ = exports(family)
    res = validate_export(llm.parent)
    assert res["passed"], res["failures"]
    assert res["worst_cosine"] >= 0.9999 and res["top1_agreement"] == 1.0  # eager face == graph, as for plugin
    native = _steps(llm, RawOrt(llm))
    plugin = _steps(plugin_llm, CpuBackend(plugin_llm))
    assert native.keys() == plugin.keys()
    for key in native:
        assert cosine_rows(native[key][1], plugin[key][1]).min() >= 0.9999, key


def test_graph_is_standard_onnx_with_the_native_bindings(exports):
    llm, _, model = exports("qwen3")
    c = model.config
    n, h, hkv, d, v = c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.head_dim, c.vocab_size
    onnx.checker.check_model(str(llm / "model.onnx"), full_check=True)  # no schemas of ours registered
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in m.opset_import} == {"": 24} and m.ir_version == 10
    assert {nd.domain for nd in m.graph.node} == {""}
    ops = [nd.op_type for nd in m.graph.node]
    assert (ops.count("RotaryEmbedding"), ops.count("TensorScatter"), ops.count("Attention")) == (2 * n, 2 * n, n)
    assert "AttentionPlugin" not in ops
    for nd in m.graph.node:
        if nd.op_type == "Attention":
            attrs = {a.name: helper.get_attribute_value(a) for a in nd.attribute}
            assert attrs == {"scale": 1.0, "is_causal": 0}  # Q pre-scaled; no TRT-only attribute

    def dims(vi):
        return [dd.dim_param or dd.dim_value for dd in vi.type.tensor_type.shape.dim]

    cache = ["batch", hkv, CAP, d]
    want_in = [("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq_len", h]),
               ("rope_rotary_cos_sin", TensorProto.FLOAT, ["rope_batch", "max_pos", d]),
               ("context_lengths", TensorProto.INT32, ["batch"]),
               ("last_token_ids", TensorProto.INT64, ["batch", 1])]
    want_in += [(f"k_cache_{i}", TensorProto.FLOAT16, cache) for i in range(n)]
    want_in += [(f"v_cache_{i}", TensorProto.FLOAT16, cache) for i in range(n)]
    want_in += [("kvcache_start_index", TensorProto.INT32, ["kv_batch"])]
    assert [(i.name, i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input] == want_in
    want_out = [("logits", TensorProto.FLOAT, ["batch", 1, v])]
    want_out += [(f"present_k_cache_{i}", TensorProto.FLOAT16, cache) for i in range(n)]
    want_out += [(f"present_v_cache_{i}", TensorProto.FLOAT16, cache) for i in range(n)]
    assert [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in m.graph.output] == want_out
    # The presents are the TensorScatter results themselves (the runtime aliases them to the inputs).
    producers = {o: nd for nd in m.graph.node for o in nd.output}
    for i in range(n):
        for past, present in zip(V0_7.native_kv(i), V0_7.native_present_kv(i)):
            assert producers[present].op_type == "TensorScatter" and producers[present].input[0] == past

    config = json.loads((llm / "config.json").read_text())
    assert config["trt_native_ops"] is True and config["model_type"] == "llm"
    meta = json.loads((llm / "golden" / "bundle.json").read_text())
    assert meta["kv_capacity"] == CAP
    for sc in meta["scenarios"]:
        first = sc["steps"][0]
        assert first["kvcache_start_index"] == [0] * len(first["context_lengths"])  # never empty
        for st in sc["steps"]:
            if st["phase"] == "decode":
                assert st["context_lengths"] == [1, 1]  # the length of Q


def test_plugin_export_is_unchanged_by_the_option(exports):
    _, plugin_llm, _ = exports("qwen3")
    m = onnx.load(str(plugin_llm / "model.onnx"), load_external_data=False)
    assert {o.domain for o in m.opset_import} == {"", "trt_edgellm"}
    assert json.loads((plugin_llm / "config.json").read_text())["trt_native_ops"] is False
    assert json.loads((plugin_llm / "golden" / "bundle.json").read_text())["kv_capacity"] == 64


def test_unwritten_cache_rows_are_never_read(exports):
    """Caches that start as garbage give the same logits as zeroed ones: every key read was written by this
    sequence (the per-sequence mask), whatever its neighbour in the batch wrote."""
    llm, _, _ = exports("llama")
    from edgellm_validate.twin import Twin

    backend = RawOrt(llm)
    meta, _ = load_bundle(llm)
    sc = meta["scenarios"][0]
    rng = np.random.default_rng(0)
    twin = Twin(llm, backend, CAP)
    clean = twin.new_state(2)
    dirty = {k: rng.normal(0, 30, v.shape).astype(np.float16) for k, v in clean.items()}
    for st in sc["steps"]:
        args = (st["token_ids"], st["context_lengths"], st["kvcache_start_index"], st["last_token_ids"])
        a, clean = twin.step(clean, *args)
        b, dirty = twin.step(dirty, *args)
        assert np.array_equal(a, b)


def test_nvidias_shared_lower_right_mask_fails_the_ragged_batch(exports, tmp_path):
    """The same graph with NVIDIA's mask (one lower-right causal mask over max(start) + max(ctx) keys for the
    whole batch, native.md) lets the shorter sequence read padding rows: its decode logits leave HF's."""
    llm, _, model = exports("llama")
    m = onnx.load(str(llm / "model.onnx"))
    g = m.graph
    by_op = {nd.op_type: nd for nd in g.node}
    le, conj, kv_len = by_op["LessOrEqual"], by_op["And"], by_op["ReduceMax"].output[0]
    steps = next(nd for nd in g.node if nd.op_type == "Range").output[0]
    seq = next(nd for nd in g.node if nd.op_type == "Range").input[1]
    extra = [helper.make_node("Constant", [], ["lr_axes"], value=helper.make_tensor("a", TensorProto.INT64, [2],
                                                                                      [0, 2])),
             helper.make_node("Sub", [kv_len, seq], ["lr_off"]),
             helper.make_node("Add", [steps, "lr_off"], ["lr_rows"]),
             helper.make_node("Unsqueeze", ["lr_rows", "lr_axes"], ["lr_col"])]
    le.input[1] = "lr_col"  # col <= row + P - S, shared by every sequence
    conj.input[1] = conj.input[0]  # and no per-sequence key limit
    idx = list(g.node).index(le)
    for nd in extra[::-1]:
        g.node.insert(idx, nd)
    onnx.save(m, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for f in ("config.json", "embedding.safetensors"):
        (tmp_path / f).write_bytes((llm / f).read_bytes())
    (tmp_path / "golden").mkdir()
    for f in ("bundle.json", "logits.safetensors"):
        (tmp_path / "golden" / f).write_bytes((llm / "golden" / f).read_bytes())
    ref = hf_reference_logits(model, llm)
    got = _steps(tmp_path, RawOrt(tmp_path))
    short = [float(cosine_rows(lg[1:], ref[key][1:])[0]) for key, (st, lg) in got.items()
             if key[0] == "prefill_decode" and st["phase"] == "decode"]
    print("\nshort-sequence decode cosines with NVIDIA's mask:", [round(c, 3) for c in short])
    assert min(short) < 0.99, short  # what ours gets right (test_unmodified_graph_matches_transformers_every_step)


def test_trt_profiles_cover_every_native_input_with_static_dims_pinned(exports):
    from edgellm_validate.trt.profiles import (
        BuildLimits,
        ProfileError,
        check_inputs_covered,
        check_static_dims,
        input_names,
        limits_for_bundle,
        optimization_profiles,
    )

    llm, _, _ = exports("qwen3")
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    config = json.loads((llm / "config.json").read_text())
    meta, _ = load_bundle(llm)
    limits = limits_for_bundle(meta)
    assert limits.max_kv_cache_capacity == CAP
    profiles = optimization_profiles(config, limits)
    graph_inputs = {i.name: [dd.dim_param or dd.dim_value for dd in i.type.tensor_type.shape.dim]
                    for i in m.graph.input}
    assert input_names(config) == list(graph_inputs)
    check_inputs_covered(profiles, list(graph_inputs))
    check_static_dims(profiles, graph_inputs)
    b, hkv, d = limits.max_batch_size, 2, 64
    for pname, shapes in profiles.items():
        named: dict[str, set] = {}
        for name, dims in graph_inputs.items():
            rng = shapes[name]
            for k, dim in enumerate(dims):
                triple = (rng.min[k], rng.opt[k], rng.max[k])
                if isinstance(dim, int):
                    assert triple == (dim,) * 3, (pname, name, k)
                else:
                    named.setdefault(dim, set()).add(triple)
        assert all(len(v) == 1 for v in named.values()), (pname, named)
        assert shapes["k_cache_1"] == ((1, hkv, CAP, d), (b, hkv, CAP, d), (b, hkv, CAP, d))
    assert profiles["context"]["kvcache_start_index"].min == (0,)
    assert profiles["generation"]["kvcache_start_index"].min == (1,)
    assert BuildLimits().builder_config(True)["trt_native_ops"] is True
    with pytest.raises(ProfileError, match="max_kv_cache_capacity 4096"):
        check_static_dims(optimization_profiles(config, BuildLimits(max_kv_cache_capacity=2048)), graph_inputs)


def test_targets_gate_on_tensorrt_not_on_the_plugin_kernels(exports):
    """No AttentionPlugin: no decode-attention SM limit, so x86-cuda-native takes H100/H200 (SM 90); x86-cuda,
    whose image carries a plugin library not built for SM 90, points there; a target pinned to a TensorRT older
    than 10.15 cannot parse the graph."""
    from edgellm_validate.targets import TargetRefusal, check_target_can_run

    llm, plugin_llm, _ = exports("qwen3")
    report = check_target_can_run("x86-cuda", llm.parent, sm=89)
    assert report.sm == 89 and any("TensorRT 10.15" in d for d in report.deferred)
    with pytest.raises(TargetRefusal, match="SM 90.*meant for SM 80, 86, 89, 100, 120.*x86-cuda-native"):
        check_target_can_run("x86-cuda", llm.parent, sm=90)
    with pytest.raises(TargetRefusal, match="SM 90"):
        check_target_can_run("x86-cuda", plugin_llm.parent, sm=90)
    for target, version in (("thor-jp7", "10.13.3.9"), ("orin-jp6", "10.3")):
        with pytest.raises(TargetRefusal, match=f"needs TensorRT 10.15 or later.*has TensorRT {version}"):
            check_target_can_run(target, llm.parent)
    check_target_can_run("x86-cpu", llm.parent)  # nothing to lower
    # the plugin-free image's target: native exports on any SM it lists, plugin exports refused outright
    report = check_target_can_run("x86-cuda-native", llm.parent, sm=90)
    assert report.sm == 90 and any("TensorRT 10.15" in d for d in report.deferred)
    with pytest.raises(TargetRefusal, match="no Edge-LLM plugin library.*AttentionPlugin.*--attention native"):
        check_target_can_run("x86-cuda-native", plugin_llm.parent, sm=89)


def _fp8_checkpoint(root: Path, *, kv: bool = False) -> Path:
    """A ModelOpt-layout FP8 (per-tensor W8A8) checkpoint of a tiny Llama, quantized here (quant.md §3.2):
    weight = sat(W / s_w) in e4m3, s_w = amax/448, input scales from a calibration pass; lm_head in fp16."""
    import torch
    from safetensors.torch import save_file

    model = make_hf_model("llama", seed=4).half().float()
    amax: dict[str, float] = {}
    hooks = [mod.register_forward_hook(lambda mod, inp, out, name=name: amax.__setitem__(
        name, max(amax.get(name, 0.0), float(inp[0].abs().max()))))
        for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and "lm_head" not in name]
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)))
    for hk in hooks:
        hk.remove()
    state = {}
    for key, t in model.state_dict().items():
        mod = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and mod in amax:
            sw = t.abs().max() / 448.0
            state[key] = (t / sw).clamp(-448, 448).to(torch.float8_e4m3fn)
            state[mod + ".weight_scale"] = sw.float().reshape(())
            state[mod + ".input_scale"] = torch.tensor(amax[mod] / 448.0, dtype=torch.float32)
            if kv and mod.endswith(("k_proj", "v_proj")):
                state[mod + (".k_scale" if mod.endswith("k_proj") else ".v_scale")] = torch.tensor(0.05)
        else:
            state[key] = t.half().contiguous()
    root.mkdir(parents=True)
    save_file(state, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(model.config.to_dict(), default=str))
    (root / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv else None,
                         "exclude_modules": ["lm_head"]}}))
    return root


@pytest.mark.parametrize("kind", ["fp8", "mxfp8"])
def test_plugin_free_quant_formats(kind, tmp_path, record_property):
    """FP8 (standard Q/DQ: runs in onnxruntime as written) and MXFP8 (TensorRT's own `trt` ops, not the Edge-LLM
    plugin) export natively; the twin reproduces the golden, the plugin form agrees, an independent
    reference on dequantized weights stays within the format's bound."""
    from fixtures.dequant_reference import reference_model
    from fixtures.quant_layouts import make_layout_checkpoint

    ckpt = _fp8_checkpoint(tmp_path / "ckpt") if kind == "fp8" else make_layout_checkpoint(kind, tmp_path / "ckpt")
    assert main(["-q", "export", str(ckpt), str(tmp_path / "native"), "--attention", "native"]) == 0
    assert main(["-q", "export", str(ckpt), str(tmp_path / "plugin")]) == 0
    llm, plugin_llm = tmp_path / "native" / "llm", tmp_path / "plugin" / "llm"
    meta, _ = load_bundle(llm)
    assert meta["precision"] == kind
    res = validate_export(tmp_path / "native")
    assert res["passed"], res["failures"]
    assert res["worst_cosine"] >= 0.9999 and res["top1_agreement"] == 1.0
    m = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    assert {nd.domain for nd in m.graph.node} == ({""} if kind == "fp8" else {"", "trt"})
    native = _steps(llm, CpuBackend(llm))  # the twin, as validate runs it
    as_written = _steps(llm, RawOrt(llm)) if kind == "fp8" else native  # MXFP8's `trt` ops need the lowering
    plugin = _steps(plugin_llm, CpuBackend(plugin_llm))
    ref = hf_reference_logits(reference_model(ckpt), llm)
    worst = {"plugin": 1.0, "native_ref": 1.0, "plugin_ref": 1.0}
    for key, (_, logits) in native.items():
        worst["plugin"] = min(worst["plugin"], float(cosine_rows(logits, plugin[key][1]).min()))
        worst["native_ref"] = min(worst["native_ref"], float(cosine_rows(as_written[key][1], ref[key]).min()))
        worst["plugin_ref"] = min(worst["plugin_ref"], float(cosine_rows(plugin[key][1], ref[key]).min()))
    record_property("worst_cosines", worst)
    print(f"\n{kind}: {worst}")
    # Every linear input is quantized, so the two forms' different fp16 roundings of Q (fp32 in the plugin) land
    # ~1e-3 apart in cosine (FP16: 1e-6, test above); both are held to the format's golden bound, and stay
    # as close to the dequantized reference as each other.
    assert worst["plugin"] >= thresholds(kind)[0]
    assert worst["native_ref"] >= thresholds(kind)[2]
    assert worst["native_ref"] >= worst["plugin_ref"] - 0.002


QWEN3_5 = dict(head_dim=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
               layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
MOE = dict(head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
           mlp_only_layers=[1], num_hidden_layers=2)


@pytest.mark.parametrize("what, words", [
    ("qwen3_5", ["recurrent", "dense decoders only", "config.json"]),
    ("qwen3_moe", ["mixture-of-experts", "dense decoders only"]),
    ("fp8_kv", ["FP8 KV cache", "casts the K/V caches to fp16", "hf_quant_config.json"]),
    ("awq_gemm", ["int4_awq_gemm", "Int4GroupwiseGemmPlugin", "plugin-free formats"]),
])
def test_what_the_native_path_cannot_express_is_refused(what, words, tmp_path, capsys):
    from fixtures.quant_layouts import make_layout_checkpoint

    if what == "qwen3_5":
        ckpt = save_checkpoint(make_hf_model("qwen3_5_text", seed=1, **QWEN3_5), tmp_path / "ckpt")
    elif what == "qwen3_moe":
        ckpt = save_checkpoint(make_hf_model("qwen3_moe", seed=1, **MOE), tmp_path / "ckpt")
    elif what == "fp8_kv":
        ckpt = _fp8_checkpoint(tmp_path / "ckpt", kv=True)
    else:
        ckpt = make_layout_checkpoint(what, tmp_path / "ckpt")
    out = tmp_path / "out"
    capsys.readouterr()  # what making the checkpoint printed
    assert main(["-q", "export", str(ckpt), str(out), "--attention", "native"]) == 2
    raw = capsys.readouterr().err
    assert raw.startswith("edgellm: error: ") and raw.strip().count("\n") == 0  # one paragraph
    err = " ".join(raw.split())
    for w in words:
        assert w in err, (w, err)
    assert "without --attention native" in err
    assert not out.exists()


def test_trt_backend_builds_a_native_export_without_a_plugin_library(exports, tmp_path, monkeypatch):
    """`validate --backend trt` with no --plugin and no $EDGELLM_PLUGIN_PATH: nothing is loaded or asked of the
    plugin registry, the engine config says trt_native_ops, and a TensorRT older than 10.15 is refused (exit 3).
    TensorRT here is the stand-in (tests/fake_tensorrt.py: it runs the graph with onnxruntime)."""
    import fake_tensorrt as fake_trt

    from edgellm_core.errors import EnvironmentProblem
    from edgellm_validate.trt import plugin as plugin_mod

    native, _, _ = exports("llama")
    monkeypatch.delenv("EDGELLM_PLUGIN_PATH", raising=False)
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    device = fake_trt.FakeDevice(sm=90, name="Fake H100")  # no decode-attention kernels: fine without the plugin
    fake_trt.reset(device)
    fake_trt.REGISTRY.creators = set()  # an empty registry: a plugin lookup would fail
    opts = {"trt": fake_trt, "device": device, "engine_dir": tmp_path / "engine"}
    res = validate_export(native.parent, backend="trt", result_path=tmp_path / "v.json", backend_options=opts)
    assert res["passed"], res["failures"]
    assert res["backend_details"]["plugin"] is None
    cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert cfg["builder_config"]["trt_native_ops"] is True
    assert json.loads((tmp_path / "engine" / "build_record.json").read_text())["plugin"] is None
    monkeypatch.setattr(fake_trt, "__version__", "10.13.3.9")
    fake_trt.reset(fake_trt.FakeDevice(sm=90))
    with pytest.raises(EnvironmentProblem, match=r"10\.13\.3\.9.*plugin-free \(trt_native_ops\).*10\.15"):
        validate_export(native.parent, backend="trt", result_path=tmp_path / "v2.json",
                        backend_options={**opts, "device": fake_trt.FakeDevice(sm=90), "rebuild": True})
    fake_trt.reset()
