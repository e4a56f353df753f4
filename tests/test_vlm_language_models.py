"""The language model of Qwen2.5-VL, exported on its own (`--components llm`): a Qwen2 decoder whose config
sits under the wrapper's `text_config` (or at the root, as the hub's Qwen2.5-VL releases ship it), with MRoPE
signalled the way the 0.7.1 runtime understands it and the multimodal token ids in its config.json.

Reference: transformers' Qwen2_5_VLForConditionalGeneration on text-only prompts (its MRoPE positions are
then (t, t, t), which is ordinary RoPE: what the runtime's per-sequence table holds until the multimodal
runner writes image rows). The vision tower is not exported yet (issue 11); the checkpoint carries one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BASE
from safetensors.numpy import load_file, save_file
from test_parity_hf import assert_parity, twin_vs_hf

from edgellm_export.cli import main
from edgellm_validate.validate import validate_export

MROPE = [8, 12, 12]  # temporal, height, width: 32 rotate-half pairs of head_dim 64
TOKENS = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503}


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    """(checkpoint dir, fp32 HF model): tiny random Qwen2.5-VL saved in bf16 by transformers."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    cfg = Qwen2_5_VLConfig(
        text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": MROPE}, "rope_theta": 10000.0},
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                       "out_hidden_size": BASE["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]},
        initializer_range=0.05, **TOKENS)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # random biases and norms: every optional path carries signal
            if "visual" not in name and (name.endswith(".bias") or "norm" in name):
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("qwen2_5_vl") / "ckpt"
    model.to(torch.bfloat16).save_pretrained(path)
    model.float()
    return path, model


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_language_model_matches_transformers(vl_checkpoint, tmp_path):
    ckpt, model = vl_checkpoint
    assert json.loads((ckpt / "config.json").read_text())["text_config"]["model_type"] == "qwen2_5_vl_text"
    rows = twin_vs_hf(ckpt, model, tmp_path / "out", components=("llm",))
    assert_parity(rows)
    assert validate_export(tmp_path / "out")["passed"]
    cfg = json.loads((tmp_path / "out" / "llm" / "config.json").read_text())
    # MRoPE as the runtime's collectRopeConfig knows it: "default" + mrope_section (never the string "mrope")
    assert cfg["rope_scaling"] == {"type": "default", "rope_type": "default", "mrope_section": MROPE}
    assert {k: cfg[k] for k in TOKENS} == TOKENS
    assert cfg["vision_config"]["out_hidden_size"] == BASE["hidden_size"] and cfg["model"] == "qwen2_5_vl_text"
    assert not (tmp_path / "out" / "visual").exists()


def test_hub_layouts_export_the_same_graph(vl_checkpoint, tmp_path, capsys):
    """The hub's Qwen2.5-VL releases: a flat config (text fields at the root, rope_scaling type "mrope");
    newer checkpoints: weights under model.language_model. / model.visual. Same graph and weights either way."""
    ckpt, _ = vl_checkpoint
    raw = json.loads((ckpt / "config.json").read_text())
    flat = _copy(ckpt, tmp_path / "flat")
    text = dict(raw.pop("text_config"))
    text.pop("rope_parameters")
    (flat / "config.json").write_text(json.dumps({**raw, **text, "model_type": "qwen2_5_vl",
                                                  "rope_scaling": {"type": "mrope", "mrope_section": MROPE},
                                                  "rope_theta": 10000.0}))
    nested = _copy(ckpt, tmp_path / "nested")
    tensors = load_file(str(ckpt / "model.safetensors"))
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    save_file(renamed, str(nested / "model.safetensors"), metadata={"format": "pt"})
    outs = {}
    for name, src in (("saved", ckpt), ("flat", flat), ("nested", nested)):
        assert main(["-q", "export", str(src), str(tmp_path / "out" / name), "--components", "llm",
                     "--no-golden"]) == 0
        outs[name] = tmp_path / "out" / name / "llm"
    for name in ("flat", "nested"):
        assert (outs[name] / "model.onnx.data").read_bytes() == (outs["saved"] / "model.onnx.data").read_bytes()
        assert (outs[name] / "model.onnx").read_bytes() == (outs["saved"] / "model.onnx").read_bytes()
        mine = json.loads((outs[name] / "config.json").read_text())
        want = json.loads((outs["saved"] / "config.json").read_text())
        assert {k: v for k, v in mine.items() if k != "model"} == {k: v for k, v in want.items() if k != "model"}
    assert json.loads((outs["flat"] / "config.json").read_text())["model"] == "qwen2_5_vl"


def test_vision_tower_is_never_dropped_silently_and_bad_mrope_is_refused(vl_checkpoint, tmp_path, capsys):
    ckpt, _ = vl_checkpoint
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    assert "visual encoder (vision_config)" in capsys.readouterr().err and not (tmp_path / "out").exists()
    bad = _copy(ckpt, tmp_path / "bad")
    raw = json.loads((bad / "config.json").read_text())
    raw["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 8]
    (bad / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(bad), str(tmp_path / "out"), "--components", "llm"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "mrope_section [8, 12, 8] covers 56 rotary channels" in err
    assert "rotary dim is 64" in err and not (tmp_path / "out").exists()


def test_internvl_hf_layout_language_model_matches_transformers(tmp_path):
    """InternVL3.5 as transformers lays it out (`internvl`: text_config, weights under language_model.model. and
    language_model.lm_head): the inner Qwen2 decoder, found through the wrapper, against the HF model on
    text-only prompts; the image token id reaches the runtime config."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    cfg = InternVLConfig(text_config={"model_type": "qwen2", **text, "rope_theta": 10000.0},
                         vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "image_size": [28, 28], "patch_size": [14, 14]},
                         image_token_id=500, downsample_ratio=0.5, initializer_range=0.05)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and (name.endswith(".bias") or "norm" in name):
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(4.0)
    ckpt = tmp_path / "ckpt"
    model.to(torch.bfloat16).save_pretrained(ckpt)
    model.float()
    assert_parity(twin_vs_hf(ckpt, model, tmp_path / "out", components=("llm",)))
    out = json.loads((tmp_path / "out" / "llm" / "config.json").read_text())
    assert out["image_token_id"] == 500 and out["model"] == "qwen2" and "vision_config" in out
    # InternVL3's own layout (`internvl_chat`, remote code): the decoder's config under llm_config, the tower
    # under vision_model. / mlp1.; the same language model comes out
    chat = _copy(ckpt, tmp_path / "chat")
    raw = json.loads((ckpt / "config.json").read_text())
    llm = {**raw.pop("text_config"), "architectures": ["Qwen2ForCausalLM"]}
    (chat / "config.json").write_text(json.dumps({**raw, "model_type": "internvl_chat", "llm_config": llm,
                                                  "architectures": ["InternVLChatModel"]}))
    tensors = load_file(str(ckpt / "model.safetensors"))
    prefixes = {"vision_tower.": "vision_model.", "multi_modal_projector.": "mlp1."}
    renamed = {next((new + k[len(old):] for old, new in prefixes.items() if k.startswith(old)), k): v
               for k, v in tensors.items()}
    save_file(renamed, str(chat / "model.safetensors"), metadata={"format": "pt"})
    assert main(["-q", "export", str(chat), str(tmp_path / "chat_out"), "--components", "llm"]) == 0
    got = tmp_path / "chat_out" / "llm"
    assert (got / "model.onnx.data").read_bytes() == (tmp_path / "out" / "llm" / "model.onnx.data").read_bytes()
    assert json.loads((got / "config.json").read_text()) == out
