"""Quantized checkpoints the exporter must refuse: each gives one clear error naming the file and the
problem, exit code 2, and leaves no output behind. Nothing is ever exported as something else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.quant_layouts import make_layout_checkpoint
from safetensors.torch import load_file, save_file
from test_quant_plan import fp8_checkpoint, quant_json

from edgellm_export.cli import main


@pytest.fixture(scope="module")
def layout_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {k: make_layout_checkpoint(k, root / k) for k in ("awq_gemm", "gptq_desc_act")}


def edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def refused(ckpt: Path, tmp_path: Path, capsys, *phrases: str) -> str:
    out = tmp_path / "out"
    assert main(["-q", "export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    for p in phrases:
        assert p in err, (p, err)
    assert not out.exists() and not list(tmp_path.glob("out.partial*"))
    assert err.count("\n") <= 2  # one paragraph, not a traceback
    return err


def test_autoawq_zeros_of_the_wrong_shape_are_refused(layout_ckpts, tmp_path, capsys):
    """Zeros that do not cover every (group, channel) have no meaning to split (q - z of what?)."""
    def edit(state):
        key = "model.layers.1.mlp.down_proj.qzeros"
        state[key] = state[key][:-1].clone()
    ckpt = edited(layout_ckpts["awq_gemm"], tmp_path / "ckpt", edit)
    refused(ckpt, tmp_path, capsys, "model.layers.1.mlp.down_proj.qzeros", "shape")


def test_gptq_zeros_of_the_wrong_dtype_are_refused(layout_ckpts, tmp_path, capsys):
    def edit(state):
        key = "model.layers.0.self_attn.o_proj.qzeros"
        state[key] = state[key].to(torch.int64)
    ckpt = edited(layout_ckpts["gptq_desc_act"], tmp_path / "ckpt", edit)
    refused(ckpt, tmp_path, capsys, "model.layers.0.self_attn.o_proj.qzeros", "I64")


def test_int4_scales_whose_zero_correction_leaves_fp16_are_refused(layout_ckpts, tmp_path, capsys):
    """A group whose q - z does not fit needs 128 * (c - z) * scale in fp16; beyond ~64 it cannot."""
    def edit(state):
        key = "model.layers.1.mlp.down_proj"
        z = state[f"{key}.qzeros"].numpy().view(np.uint32).copy()
        q = state[f"{key}.qweight"].numpy().view(np.uint32).copy()
        z[0, 0] = (z[0, 0] & ~np.uint32(0xF)) | np.uint32(1)  # zero 1 ...
        q[0, 0] = (q[0, 0] & ~np.uint32(0xF)) | np.uint32(15)  # ... and q 15: q - z = 14
        state[f"{key}.qzeros"] = torch.from_numpy(z.view(np.int32))
        state[f"{key}.qweight"] = torch.from_numpy(q.view(np.int32))
        state[f"{key}.scales"][0, 0] = 1000.0
    ckpt = edited(layout_ckpts["awq_gemm"], tmp_path / "ckpt", edit)
    refused(ckpt, tmp_path, capsys, "model.layers.1.mlp.down_proj.scales", "layers.1.mlp.down_proj",
            "exceeds fp16")


def test_gptq_groups_of_unequal_size_are_refused(layout_ckpts, tmp_path, capsys):
    def edit(state):
        g = state["model.layers.0.self_attn.q_proj.g_idx"].clone()
        g[(g == 0).nonzero()[0]] = 1  # group 0 loses a member, group 1 gains one
        state["model.layers.0.self_attn.q_proj.g_idx"] = g
    ckpt = edited(layout_ckpts["gptq_desc_act"], tmp_path / "ckpt", edit)
    refused(ckpt, tmp_path, capsys, "layers.0.self_attn.q_proj", "g_idx")


def test_a_tensor_the_metadata_does_not_explain_is_refused(tmp_path, capsys):
    """A KV cache scale without kv_cache_quant_algo: honouring or dropping it silently are both wrong."""
    ckpt = fp8_checkpoint(tmp_path / "src")
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.01)
    save_file(state, str(ckpt / "model.safetensors"))
    refused(ckpt, tmp_path, capsys, "layers.0.self_attn.k_proj.k_scale", "does not account for")


def test_fp8_kv_cache_without_its_scales_is_refused(tmp_path, capsys):
    """The reference exporter defaults a missing k_scale to 1.0 (quant.md §9.14)."""
    ckpt = fp8_checkpoint(tmp_path / "src")
    quant_json(ckpt, {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]})
    refused(ckpt, tmp_path, capsys, "hf_quant_config.json", "FP8 KV cache", "k_scale")


def test_bad_scale_values_are_refused_and_nothing_is_left(tmp_path, capsys):
    ckpt = fp8_checkpoint(tmp_path / "src")
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.input_scale"] = torch.tensor(float("nan"))
    save_file(state, str(ckpt / "model.safetensors"))
    refused(ckpt, tmp_path, capsys, "layers.1.mlp.up_proj.input_scale", "non-finite")


def test_quantized_tensor_of_the_wrong_shape_is_named(tmp_path, capsys):
    ckpt = fp8_checkpoint(tmp_path / "src")
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(4)
    save_file(state, str(ckpt / "model.safetensors"))
    refused(ckpt, tmp_path, capsys, "layers.0.mlp.down_proj.weight_scale", "shape [4]")


def test_modelopt_int4_group_size_other_than_128_is_refused_with_the_reason(tmp_path, capsys):
    ckpt = fp8_checkpoint(tmp_path / "src")
    quant_json(ckpt, {"quant_algo": "W4A16_AWQ", "group_size": 64, "exclude_modules": ["lm_head"]})
    refused(ckpt, tmp_path, capsys, "hf_quant_config.json", "group_size 64", "only run group size 128")


def test_metadata_naming_a_format_the_tensors_do_not_have_is_refused(tmp_path, capsys):
    ckpt = fp8_checkpoint(tmp_path / "src")
    quant_json(ckpt, {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]})
    refused(ckpt, tmp_path, capsys, "hf_quant_config.json", "layers.0.self_attn.q_proj", "NVFP4 (nvfp4)",
            "tensors are fp8")


def test_awq_metadata_on_an_unquantized_checkpoint_is_a_contradiction(tmp_path, capsys):
    ckpt = fp8_checkpoint(tmp_path / "src")
    (ckpt / "hf_quant_config.json").unlink()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    refused(ckpt, tmp_path, capsys, "config.json", "awq (int4_awq_gemm)", "tensors are fp8")
