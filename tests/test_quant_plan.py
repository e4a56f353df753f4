"""Quantization metadata becomes a per-linear plan, checked against the tensors actually present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_export.checkpoint import open_checkpoint
from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint
from edgellm_export.quant.plan import FP8, FP16, INT4_AWQ_GEMM, INT4_GPTQ, NVFP4, detect_format, parse_quant_plan

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quant_json(ckpt: Path, q: dict) -> None:
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": q}))


def fp8_checkpoint(path: Path, skip: str | None = None) -> Path:
    """The demo with every decoder linear in ModelOpt's FP8 per-tensor layout (quant.md §7)."""
    ckpt = write_demo_checkpoint(path)
    state = load_file(str(ckpt / "model.safetensors"))
    for key in list(state):
        if key.endswith(".weight") and key.split(".")[-2] in LINEAR and (skip is None or skip not in key):
            w = state[key].float()
            scale = w.abs().max() / 448.0
            state[key] = (w / scale).to(torch.float8_e4m3fn)
            state[key[: -len("weight")] + "weight_scale"] = scale.reshape(())
            state[key[: -len("weight")] + "input_scale"] = torch.tensor(0.05)
    save_file(state, str(ckpt / "model.safetensors"))
    quant_json(ckpt, {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]})
    return ckpt


@pytest.mark.parametrize("algo", ["W4A8_NVFP4_FP8", "NVFP4_AWQ", "W8A16", "FP8_PER_CHANNEL_PER_TOKEN", "W4A8_AWQ",
                                  "fp8_pb_wo", "NVFP4_SVD", "W4A16_NVFP4"])
def test_unimplemented_modelopt_algorithms_are_refused_by_name(algo, tmp_path, capsys):
    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    quant_json(ckpt, {"quant_algo": algo, "group_size": 128})
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert repr(algo) in err and "hf_quant_config.json" in err and "not supported" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qc,phrase", [
    ({"quant_method": "compressed-tensors"}, "'compressed-tensors'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "'fp8'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size -1"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8-bit"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}, "only run group size 128"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "GEMM layout"),
    ({"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION"}, "MIXED_PRECISION"),
])
def test_embedded_metadata_refusals(qc, phrase, tmp_path, capsys):
    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = qc
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_kv_cache_formats_other_than_fp8_are_refused(tmp_path):
    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    quant_json(ckpt, {"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"})
    with pytest.raises(UnsupportedError, match="KV cache quantization 'INT8'"):
        parse_quant_plan(ckpt, {})


def test_exclusions_with_wildcards_and_mixed_precision(tmp_path):
    ckpt = tmp_path
    quant_json(ckpt, {"quant_algo": "FP8", "exclude_modules": ["lm_head", "model.layers.1.*"]})
    plan = parse_quant_plan(ckpt, {})
    assert plan.for_linear("layers.0.mlp.up_proj").format == FP8
    assert plan.for_linear("layers.1.mlp.up_proj").format == FP16
    assert plan.for_linear("lm_head").format == FP16
    quant_json(ckpt, {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8", "quantized_layers": {
        "model.layers.0.mlp.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
        "lm_head": {"quant_algo": "FP8"}}})
    plan = parse_quant_plan(ckpt, {})
    up = plan.for_linear("layers.0.mlp.up_proj")
    assert (up.format, up.group_size) == (NVFP4, 16)  # per-layer group size, not a dominant one
    assert plan.for_linear("lm_head").format == FP8
    assert plan.for_linear("layers.0.mlp.down_proj").format == FP16  # unlisted in mixed = FP16
    assert plan.kv_cache == FP8


def test_consistent_fp8_checkpoint_is_recognised_and_exported(tmp_path, capsys):
    ckpt = fp8_checkpoint(tmp_path / "ckpt")
    with open_checkpoint(ckpt) as c:
        assert detect_format(c, "layers.0.self_attn.q_proj") == FP8
        assert detect_format(c, "lm_head") == FP16
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 0
    assert main(["-q", "validate", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "llm" / "golden" / "bundle.json").read_text())
    assert meta["precision"] == "fp8"


def test_layer_contradicting_metadata_is_named(tmp_path, capsys):
    ckpt = fp8_checkpoint(tmp_path / "ckpt", skip="layers.1.mlp.down_proj")
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "layers.1.mlp.down_proj" in err and "FP8 (fp8)" in err and "tensors are fp16" in err
    assert "hf_quant_config.json" in err


def test_awq_and_gptq_layouts_are_told_apart(tmp_path):
    k, n, g = 256, 128, 128
    save_file({
        "model.layers.0.self_attn.q_proj.qweight": torch.zeros(k, n // 8, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(k // g, n // 8, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.scales": torch.zeros(k // g, n, dtype=torch.float16),
        "model.layers.0.self_attn.k_proj.qweight": torch.zeros(k // 8, n, dtype=torch.int32),
        "model.layers.0.self_attn.k_proj.qzeros": torch.zeros(k // g, n // 8, dtype=torch.int32),
        "model.layers.0.self_attn.k_proj.scales": torch.zeros(k // g, n, dtype=torch.float16),
        "model.layers.0.self_attn.k_proj.g_idx": torch.zeros(k, dtype=torch.int32),
    }, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path) as c:
        assert detect_format(c, "layers.0.self_attn.q_proj") == INT4_AWQ_GEMM
        assert detect_format(c, "layers.0.self_attn.k_proj") == INT4_GPTQ


def test_broken_metadata_file(tmp_path):
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"producer": {}}))
    with pytest.raises(ExportError, match="no 'quantization' object"):
        parse_quant_plan(tmp_path, {})
