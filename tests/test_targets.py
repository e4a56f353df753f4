"""The platform matrix and capability gating: refuse, before any work, what a target cannot run."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgellm_validate import targets
from edgellm_validate.targets import (
    DECODE_ATTENTION_SMS,
    PRECISIONS,
    TargetError,
    TargetRefusal,
    check_target_can_run,
    decode_attention_supported,
    get_target,
    inspect_export,
    load_platforms,
    precisions_for_sm,
)

ALL_TARGETS = ["x86-cpu", "x86-cuda", "x86-cuda-native", "orin-jp6", "orin-jp7", "thor-jp7", "drive-thor"]
PLUGIN_TARGETS = [t for t in ALL_TARGETS if t != "x86-cuda-native"]  # what a plugin export can run on
CONFIG = {"model": "llama", "model_type": "llm", "edgellm_version": "0.7.1", "vocab_size": 64, "hidden_size": 256,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}


# ---------------------------------------------------------------- the matrix


def test_matrix_has_every_target_with_its_facts():
    ts = load_platforms()
    assert list(ts) == ALL_TARGETS
    assert ts["x86-cpu"].backend == "cpu" and all(ts[n].backend == "trt" for n in ALL_TARGETS[1:])
    orin = ts["orin-jp6"]
    assert (orin.sm, orin.tensorrt, orin.cuda, orin.arch) == (87, "10.3", "12.6", "aarch64")
    assert orin.docker_run["runtime"] == "nvidia"
    assert orin.precisions == {"fp16", "int8", "int4", "fp8_embedding"}
    assert ts["orin-jp7"].sm == 87 and ts["orin-jp7"].cuda == "13.2"
    assert ts["thor-jp7"].sm == 110 and ts["thor-jp7"].tensorrt == "10.13.3.9"
    assert {"fp8", "nvfp4", "mxfp8", "fp8_kv"} <= ts["thor-jp7"].precisions
    cuda = ts["x86-cuda"]
    assert cuda.sm is None and cuda.precisions is None and "runtime" not in cuda.docker_run
    assert cuda.docker_run["device_requests"][0]["capabilities"] == [["gpu"]]
    for name in ALL_TARGETS:
        assert ts[name].precisions is None or ts[name].precisions <= set(PRECISIONS)
    native = ts["x86-cuda-native"]  # the plugin-free image: no plugin build, SM 90 among its GPUs
    assert not native.plugin and not native.plugin_build and 90 in native.sm_choices
    assert native.docker_run == cuda.docker_run and native.arch == "x86_64"
    assert all(ts[n].plugin for n in ALL_TARGETS if n != "x86-cuda-native")


def test_base_images_default_and_override():
    assert get_target("orin-jp6").image().startswith("nvcr.io/nvidia/l4t-jetpack:r36")
    assert get_target("orin-jp6").image("my/l4t:r36.4") == "my/l4t:r36.4"
    drive = get_target("drive-thor")
    assert drive.base_image_required
    with pytest.raises(TargetError, match="no public base image"):
        drive.image()
    assert get_target("drive-thor", base_image="local/driveos-sdk:7.2").image() == "local/driveos-sdk:7.2"


def test_docker_kwargs():
    assert get_target("thor-jp7").docker_run_kwargs() == {"runtime": "nvidia", "network_mode": "host"}

    class DeviceRequest(dict):
        def __init__(self, **kw):
            super().__init__(kw)

    docker = SimpleNamespace(types=SimpleNamespace(DeviceRequest=DeviceRequest))
    kw = get_target("x86-cuda").docker_run_kwargs(docker)
    assert isinstance(kw["device_requests"][0], DeviceRequest) and kw["device_requests"][0]["count"] == -1


def test_unknown_target():
    with pytest.raises(TargetError, match="unknown target 'orin'.*orin-jp6"):
        get_target("orin")


@pytest.mark.parametrize("content, words", [
    ("not json", "not valid JSON"),
    ('{"targets": 3}', "no 'targets'"),
    ('{"targets": {"t": {"backend": "tpu"}}}', r"targets\.t\.backend: must be one of cpu, trt, found 'tpu'"),
    ('{"targets": {"t": {"backend": "trt", "sm": "87"}}}', r"targets\.t\.sm: must be an integer or null, found '87'"),
    ('{"targets": {"t": {"backend": "trt", "sm": 87, "precisions": ["fp6"]}}}',
     r"targets\.t\.precisions\[0\]: must be one of fp16"),
])
def test_malformed_matrix(tmp_path, content, words):
    p = tmp_path / "platforms.json"
    p.write_text(content)
    with pytest.raises(TargetError, match=words):
        load_platforms(p)


def test_matrix_path_from_env(tmp_path, monkeypatch):
    p = tmp_path / "m.json"
    p.write_text('{"targets": {"mine": {"backend": "trt", "sm": 89, "base_image": "x"}}}')
    monkeypatch.setenv(targets.PLATFORMS_ENV, str(p))
    assert list(load_platforms()) == ["mine"]
    monkeypatch.setenv(targets.PLATFORMS_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(TargetError, match="missing"):
        load_platforms()


# ---------------------------------------------------------------- hardware facts


def test_sm_capabilities():
    assert precisions_for_sm(87) == {"fp16", "fp8_embedding", "int8", "int4"}  # Orin: no FP8 / FP4
    assert precisions_for_sm(86) == precisions_for_sm(80) == precisions_for_sm(87)
    assert {"fp8", "fp8_kv"} <= precisions_for_sm(89) and "nvfp4" not in precisions_for_sm(89)
    assert set(PRECISIONS) == precisions_for_sm(110) == precisions_for_sm(120) == precisions_for_sm(100)


def test_decode_attention_excludes_sm90():
    assert not decode_attention_supported(90)  # H100 / H200
    assert not decode_attention_supported(75) and not decode_attention_supported(103)
    assert decode_attention_supported(110)  # Thor, renumbered to 101 by the plugins
    assert all(decode_attention_supported(s) for s in DECODE_ATTENTION_SMS)


# ---------------------------------------------------------------- synthetic exports


def _safetensors_header(path: Path, dtype: str, shape) -> None:
    """A valid safetensors file holding a zero `embedding` of `dtype` and `shape`."""
    nbytes = {"F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}[dtype] * int(np.prod(shape))
    header = json.dumps({"embedding": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))


def make_export(root: Path, *, nodes=(), inits=(), kv_type=TensorProto.FLOAT16, config=None, emb="F16",
                precision=None, manifest=True) -> Path:
    """A minimal export directory: graph inputs like the 0.7 contract's, whatever nodes a test needs."""
    llm = root / "llm"
    (llm / "golden").mkdir(parents=True)
    cfg = {**CONFIG, **(config or {})}
    d, hkv = cfg.get("head_dim") or 64, cfg["num_key_value_heads"]
    inputs = [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16, ["batch", "seq_len", 256]),
              helper.make_tensor_value_info("past_key_values_0", kv_type, ["batch", 2, hkv, "past_len", d])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 64])]
    graph = helper.make_graph(list(nodes) or [helper.make_node("Identity", ["inputs_embeds"], ["logits"])],
                              "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid("trt_edgellm", 1),
                                                   helper.make_opsetid("trt", 1)])
    model.ir_version = 10
    onnx.save(model, str(llm / "model.onnx"))
    (llm / "config.json").write_text(json.dumps(cfg))
    _safetensors_header(llm / "embedding.safetensors", emb, (64, 256))
    if precision:
        (llm / "golden" / "bundle.json").write_text(json.dumps({"precision": precision}))
    return root


def attn(**attrs):
    return helper.make_node("AttentionPlugin", ["q", "k", "v", "past_key_values_0", "c", "r", "s"], ["a", "p"],
                            domain="trt_edgellm", num_q_heads=4, num_kv_heads=2, head_size=64,
                            enable_tree_attention=0, **attrs)


def fp8_linear():
    w = numpy_helper.from_array(np.zeros((4, 4), np.uint8), "w")
    w.data_type = TensorProto.FLOAT8E4M3FN
    s = numpy_helper.from_array(np.array(1.0, np.float16), "s")
    return ([helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], output_dtype=TensorProto.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"])], [w, s])


def nvfp4_linear():
    w = numpy_helper.from_array(np.zeros((4, 2), np.uint8), "w4")
    w.data_type, w.dims[-1] = TensorProto.FLOAT4E2M1, 4
    bs = numpy_helper.from_array(np.zeros((4, 1), np.uint8), "bs")
    bs.data_type = TensorProto.FLOAT8E4M3FN  # FP8 block scales: dequantized into a scale, not FP8 compute
    s2 = numpy_helper.from_array(np.array(1.0, np.float32), "s2")
    return ([helper.make_node("TRT_FP4DynamicQuantize", ["x", "s2"], ["xq", "xs"], domain="trt"),
             helper.make_node("DequantizeLinear", ["bs", "s2"], ["blk"]),
             helper.make_node("DequantizeLinear", ["w4", "blk"], ["wd"], axis=-1, block_size=16)], [w, bs, s2])


def test_fp16_export(tmp_path):
    f = inspect_export(make_export(tmp_path, nodes=[attn()]))
    assert f.precisions == {"fp16"} and f.custom_ops == [("trt_edgellm", "AttentionPlugin")]
    assert (f.edgellm_version, f.head_dim, f.num_attention_heads, f.num_key_value_heads) == ("0.7.1", 64, 4, 2)


def test_detects_each_precision(tmp_path):
    fp8_nodes, fp8_inits = fp8_linear()
    assert "fp8" in inspect_export(make_export(tmp_path / "a", nodes=fp8_nodes, inits=fp8_inits)).precisions
    f = inspect_export(make_export(tmp_path / "b", nodes=nvfp4_linear()[0], inits=nvfp4_linear()[1]))
    assert f.precisions == {"fp16", "nvfp4"}  # its FP8 block scales do not count as FP8 compute
    f = inspect_export(make_export(tmp_path / "c", kv_type=TensorProto.FLOAT8E4M3FN,
                                   nodes=[attn(enable_fp8_kv_cache=1, qkv_scales=[1.0, 1.0, 1.0])]))
    assert f.precisions == {"fp16", "fp8_kv"}
    int4 = helper.make_node("Int4GroupwiseGemmPlugin", ["x", "qw", "sc"], ["y"], domain="trt_edgellm",
                            gemm_n=128, gemm_k=128, group_size=128)
    assert inspect_export(make_export(tmp_path / "d", nodes=[int4])).precisions == {"fp16", "int4"}
    mx = [helper.make_node("TRT_MXFP8DynamicQuantize", ["x"], ["q", "e"], domain="trt"),
          helper.make_node("TRT_MXFP8DequantizeLinear", ["q", "e"], ["y"], domain="trt")]
    assert inspect_export(make_export(tmp_path / "e", nodes=mx)).precisions == {"fp16", "mxfp8"}
    sq = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.INT8)]
    assert inspect_export(make_export(tmp_path / "f", nodes=sq)).precisions == {"fp16", "int8"}
    f = inspect_export(make_export(tmp_path / "g", emb="F8_E4M3"))
    assert f.precisions == {"fp16", "fp8_embedding"} and "F8_E4M3" in f.evidence["fp8_embedding"][0]


def test_bundle_label_counts_too(tmp_path):
    f = inspect_export(make_export(tmp_path / "a", precision="int4_awq_gemm+fp8_kv"))
    assert {"int4", "fp8_kv"} <= f.precisions and "golden bundle" in f.evidence["int4"][0]
    f = inspect_export(make_export(tmp_path / "b", precision="fp16+w2a16"))
    assert f.unknown_labels == ["w2a16"]
    report = check_target_can_run("thor-jp7", tmp_path / "b")
    assert any("w2a16" in w for w in report.warnings)


# ---------------------------------------------------------------- gating


@pytest.mark.parametrize("target", PLUGIN_TARGETS)
def test_plain_fp16_runs_everywhere(tmp_path, target):
    report = check_target_can_run(target, make_export(tmp_path, nodes=[attn()]))
    assert report.target == target and report.precisions == ["fp16"]
    assert (report.deferred != []) == (target == "x86-cuda")  # only there is the SM unknown up front


def test_orin_refuses_fp8_and_fp4_before_any_work(tmp_path):
    nodes, inits = fp8_linear()
    out = make_export(tmp_path / "fp8", nodes=nodes, inits=inits)
    for name in ("orin-jp6", "orin-jp7"):
        with pytest.raises(TargetRefusal) as e:
            check_target_can_run(name, out)
        assert e.value.exit_code == 2
        assert f"target {name} cannot run this export" in str(e.value) and "fp8 (" in str(e.value)
        assert "SM 89" in str(e.value)
    out = make_export(tmp_path / "fp4", nodes=nvfp4_linear()[0], inits=nvfp4_linear()[1])
    with pytest.raises(TargetRefusal, match="nvfp4.*SM 100"):
        check_target_can_run("orin-jp6", out)
    assert check_target_can_run("thor-jp7", out).precisions == ["fp16", "nvfp4"]
    assert check_target_can_run("drive-thor", out).sm == 110


def test_orin_runs_int4_int8_and_fp8_embedding(tmp_path):
    int4 = helper.make_node("Int4GroupwiseGemmPlugin", ["x", "qw", "sc"], ["y"], domain="trt_edgellm")
    sq = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.INT8)
    out = make_export(tmp_path, nodes=[attn(), int4, sq], emb="F8_E4M3")
    report = check_target_can_run("orin-jp6", out)
    assert report.precisions == ["fp16", "fp8_embedding", "int4", "int8"]
    assert any("compatible" in w for w in report.warnings)


def test_fp8_kv_cache_is_refused_on_orin(tmp_path):
    out = make_export(tmp_path, kv_type=TensorProto.FLOAT8E4M3FN, nodes=[attn(enable_fp8_kv_cache=1)])
    with pytest.raises(TargetRefusal, match="fp8_kv"):
        check_target_can_run("orin-jp6", out)
    check_target_can_run("thor-jp7", out)


def test_x86_cuda_is_gated_by_the_gpu_found(tmp_path):
    nodes, inits = fp8_linear()
    out = make_export(tmp_path, nodes=nodes, inits=inits)
    assert check_target_can_run("x86-cuda", out, sm=89).sm == 89  # Ada: FP8 yes
    with pytest.raises(TargetRefusal, match="fp8.*SM 86"):
        check_target_can_run("x86-cuda", out, sm=86)
    with pytest.raises(TargetRefusal) as e:
        check_target_can_run("x86-cuda", out, sm=90)
    assert "SM 90 is not supported by Edge-LLM's decode attention" in str(e.value)
    assert "H100/H200" in str(e.value)


def test_h200_is_refused_even_for_fp16(tmp_path):
    with pytest.raises(TargetRefusal, match="SM 90"):
        check_target_can_run("x86-cuda", make_export(tmp_path, nodes=[attn()]), sm=90)


def test_wrong_board_for_the_target(tmp_path):
    with pytest.raises(TargetRefusal, match="GPU is SM 110, but target orin-jp6 is SM 87"):
        check_target_can_run("orin-jp6", make_export(tmp_path), sm=110)
    check_target_can_run("thor-jp7", make_export(tmp_path / "b"), sm=101)  # Thor under CUDA 12


def test_every_reason_is_given_at_once(tmp_path):
    nodes, inits = fp8_linear()
    out = make_export(tmp_path, nodes=nodes, inits=inits, kv_type=TensorProto.FLOAT8E4M3FN,
                      config={"edgellm_version": "0.10.0", "head_dim": 96, "num_attention_heads": 40,
                              "num_key_value_heads": 4})
    with pytest.raises(TargetRefusal) as e:
        check_target_can_run("orin-jp6", out)
    msg = str(e.value)
    for words in ("Edge-LLM 0.10.0", "0.7.1", "fp8 (", "fp8_kv (", "head_dim 96", "ratio 10"):
        assert words in msg, words


def test_cpu_target_needs_lowerings(tmp_path):
    odd = helper.make_node("NoSuchPlugin", ["x"], ["y"], domain="trt_edgellm")
    with pytest.raises(TargetRefusal, match="no CPU lowering for trt_edgellm::NoSuchPlugin"):
        check_target_can_run("x86-cpu", make_export(tmp_path, nodes=[attn(), odd]))


def test_not_an_export(tmp_path):
    from edgellm_core.errors import ExportError

    with pytest.raises(ExportError, match="no llm/model.onnx"):
        check_target_can_run("x86-cpu", tmp_path)
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "model.onnx").write_bytes(b"\xff\xff garbage")
    with pytest.raises(ExportError, match="cannot be parsed as ONNX"):
        check_target_can_run("x86-cpu", tmp_path)


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory):
    pytest.importorskip("torch")
    from edgellm_export.demo_checkpoint import write_demo_checkpoint
    from edgellm_export.export import ExportOptions, export_checkpoint

    d = tmp_path_factory.mktemp("targets-demo")
    ckpt = write_demo_checkpoint(d / "ckpt")
    export_checkpoint(ckpt, d / "fp16")
    export_checkpoint(ckpt, d / "fp8emb", ExportOptions(fp8_embedding=True))
    return d


def test_real_exports(demo_exports):
    for name in PLUGIN_TARGETS:
        assert check_target_can_run(name, demo_exports / "fp16").precisions == ["fp16"]
    with pytest.raises(TargetRefusal, match="x86-cuda-native has no Edge-LLM plugin library"):
        check_target_can_run("x86-cuda-native", demo_exports / "fp16", sm=89)
    r = check_target_can_run("orin-jp6", demo_exports / "fp8emb")
    assert r.precisions == ["fp16", "fp8_embedding"]
    with pytest.raises(TargetRefusal, match="SM 90"):
        check_target_can_run("x86-cuda", demo_exports / "fp16", sm=90)


def test_moe_plugins_are_gated_by_their_kernels_sms(tmp_path):
    """NvFP4MoEPluginGeforce's CuTeDSL kernels run on SM 120/121 only (canImplement): refused on Thor (110, which
    has FP4 otherwise) and on SM 100, kept on 120/121 and deferred where the SM is unknown; the CPU twin lowers it.
    Int4MoePlugin (Marlin, SM 80+) runs on every target, Orin included."""
    moe = helper.make_node("NvFP4MoEPluginGeforce", ["l", "x"], ["y"], domain="trt_edgellm")
    nodes, inits = nvfp4_linear()
    out = make_export(tmp_path / "fp4", nodes=[attn(), moe, *nodes], inits=inits)
    for name in ("thor-jp7", "drive-thor"):
        with pytest.raises(TargetRefusal, match=r"NvFP4MoEPluginGeforce .* SM 120, 121 only, not SM 110"):
            check_target_can_run(name, out)
    with pytest.raises(TargetRefusal, match="NvFP4MoEPluginGeforce"):
        check_target_can_run("x86-cuda", out, sm=100)
    assert check_target_can_run("x86-cuda", out, sm=120).precisions == ["fp16", "nvfp4"]
    spark = replace(targets.get_target("x86-cuda"), name="gb10", sm_choices=(121,))  # an SM 121 machine
    assert check_target_can_run(spark, out, sm=121).precisions == ["fp16", "nvfp4"]
    with pytest.raises(TargetRefusal, match="SM 121, but target x86-cuda is meant for SM 80, 86, 89, 100, 120"):
        check_target_can_run("x86-cuda", out, sm=121)  # its image's plugin library is not built for 121
    assert any("NvFP4MoEPluginGeforce runs on SM 120, 121" in d for d in check_target_can_run("x86-cuda", out).deferred)
    check_target_can_run("x86-cpu", out)
    int4 = helper.make_node("Int4MoePlugin", ["l", "x"], ["y"], domain="trt_edgellm")
    out = make_export(tmp_path / "int4", nodes=[attn(), int4])
    assert check_target_can_run("orin-jp6", out).precisions == ["fp16", "int4"]
    check_target_can_run("thor-jp7", out)
    check_target_can_run("x86-cuda", out, sm=120)


def test_nemotron_nvfp4_moe_plugin_is_gated_by_its_kernels_sms(tmp_path):
    """Nvfp4MoePlugin (Nemotron-H NVFP4 experts): prefill GEMMs are CuTeDSL tcgen05 kernels for SM 100/101/103/110
    (kernelSrcs/nvfp4_moe_cutedsl): kept on Thor and SM 100, refused on GeForce Blackwell (120) and Hopper (90),
    deferred where the SM is unknown; the CPU twin lowers it."""
    moe = helper.make_node("Nvfp4MoePlugin", ["l", "x"], ["y"], domain="trt_edgellm")
    nodes, inits = nvfp4_linear()
    out = make_export(tmp_path / "fp4", nodes=[attn(), moe, *nodes], inits=inits)
    for name in ("thor-jp7", "drive-thor"):
        assert check_target_can_run(name, out).precisions == ["fp16", "nvfp4"]
    check_target_can_run("x86-cuda", out, sm=100)  # (103: no XQA decode attention kernels, refused anyway)
    for sm in (120, 90):
        with pytest.raises(TargetRefusal, match=r"Nvfp4MoePlugin .* SM 100, 101, 103, 110 only, not SM"):
            check_target_can_run("x86-cuda", out, sm=sm)
    assert any("Nvfp4MoePlugin runs on SM 100, 101, 103, 110" in d
               for d in check_target_can_run("x86-cuda", out).deferred)
    check_target_can_run("x86-cpu", out)
