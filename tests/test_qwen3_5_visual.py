"""Qwen3.5's vision tower (Qwen3-VL's without deepstack features) exported next to its hybrid language model,
and the golden image scenario through GatedDeltaNet and gated-attention layers with interleaved MRoPE;
against transformers' tower and full forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.tower_checks import row_cosines
from safetensors.numpy import load_file
from test_qwen3_5 import QWEN3_5
from test_vlm_golden_image import hf_logits, image_scenario

from edgellm_export.cli import main
from edgellm_export.visual import qwen3_vl as q3
from edgellm_validate.validate import validate_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    root = tmp_path_factory.mktemp("qwen3_5_visual")
    # as the Qwen3.5 VLM releases: interleaved MRoPE over the 64 rotary channels (head_dim 256 x 0.25)
    rope = {**QWEN3_5["rope_parameters"], "mrope_section": [11, 11, 10], "mrope_interleaved": True}
    text = {**QWEN3_5, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "rms_norm_eps": 1e-5,
            "rope_parameters": rope}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256,
              "num_position_embeddings": 64}
    torch.manual_seed(5)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(
        text_config=text, vision_config=vision, image_token_id=500, video_token_id=501, vision_start_token_id=502,
        vision_end_token_id=503)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or "pos_embed" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(root / "ckpt")
    model.float()
    assert main(["-q", "export", str(root / "ckpt"), str(root / "out")]) == 0
    return model, root / "out"


def test_tower_config_and_no_deepstack(exported):
    model, out = exported
    cfg = json.loads((out / "visual" / "config.json").read_text())
    assert cfg["model_type"] == cfg["vision_config"]["model_type"] == "qwen3_5"  # 0.7.1's name for this tower
    golden = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))
    assert set(k for k in golden if k.startswith("expected_")) == {"expected_output"}  # no deepstack outputs
    assert json.loads((out / "llm" / "config.json").read_text())["num_deepstack_features"] == 0


def test_tower_and_image_scenario_match_transformers(exported, record_property):
    import torch

    model, out = exported
    golden = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))
    with torch.no_grad():
        hf = model.model.visual(torch.from_numpy(golden["input"]).float(),
                                grid_thw=torch.tensor(q3.GOLDEN_GRIDS)).pooler_output.numpy()
    tower = float(row_cosines(golden["expected_output"], hf).min())
    _, sc, expected = image_scenario(out / "llm")
    prompt = sc["steps"][0]["token_ids"][0]
    ids = torch.tensor([prompt + [st["token_ids"][0][0] for st in sc["steps"][1:]]])
    want = hf_logits(model, sc, pixel_values=torch.from_numpy(golden["input"]).float(),  # both images
                     image_grid_thw=torch.tensor(q3.GOLDEN_GRIDS), mm_token_type_ids=(ids == 500).int())
    cos = [float(row_cosines(e[:1], g[None])[0]) for e, g in zip(expected, want)]
    record_property("tower_cosine_vs_hf", tower)
    record_property("golden_image_cosine_vs_hf", min(cos))
    assert tower >= 0.999 and min(cos) >= 0.999, (tower, cos)
    assert [int(e[0].argmax()) for e in expected] == [int(g.argmax()) for g in want]
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    assert np.isfinite([s["min_cosine"] for s in res["steps"]]).all()
