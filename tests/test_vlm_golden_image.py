"""The golden bundle's image scenario: `edgellm validate` runs the exported vision encoder on its golden inputs,
scatters its rows into a prompt's image tokens (MRoPE positions where the model has them) and replays the
language model against logits the exporter computed from its own eager faces. Its expected logits are checked
here against transformers' full forward on the same prompt and image (independent of both faces)."""

from __future__ import annotations

import json

import pytest
from fixtures.tower_checks import row_cosines
from safetensors.numpy import load_file

from edgellm_export.cli import main
from edgellm_validate.validate import validate_export


def image_scenario(llm):
    meta = json.loads((llm / "golden" / "bundle.json").read_text())
    (sc,) = [s for s in meta["scenarios"] if s["name"] == "image_prefill_decode"]
    expected = load_file(str(llm / "golden" / "logits.safetensors"))
    return meta, sc, [expected[st["logits"]] for st in sc["steps"]]


def hf_logits(model, sc, **vision):
    import torch

    prompt = sc["steps"][0]["token_ids"][0]
    ids = torch.tensor([prompt + [st["token_ids"][0][0] for st in sc["steps"][1:]]])
    with torch.no_grad():
        logits = model(input_ids=ids, **vision).logits[0].numpy()
    return [logits[len(prompt) - 1 + k] for k in range(len(sc["steps"]))]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from test_qwen2_5_vl_visual import make_qwen2_5_vl

    root = tmp_path_factory.mktemp("golden_image_qwen")
    ckpt, model = make_qwen2_5_vl(root / "ckpt")
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0
    return model, root / "out"


def test_qwen2_5_vl_image_scenario_matches_transformers_and_validates(qwen, record_property):
    import torch

    from edgellm_export.visual import qwen2_5_vl as qvl

    model, out = qwen
    meta, sc, expected = image_scenario(out / "llm")
    image = sc["image"]
    tokens = sum(t * h * w for t, h, w in qvl.GOLDEN_GRIDS) // 4  # two images of different sizes in one prompt
    assert image["rows"] == [0, tokens] and len(image["positions"]) == 3
    assert meta["kv_capacity"] == 128  # the image prompt does not fit the text scenarios' 64
    prompt = sc["steps"][0]["token_ids"][0]
    assert prompt == sc["steps"][0]["token_ids"][1]  # two copies: the text scenarios' batch of 2
    assert prompt.count(500) == tokens and prompt.count(502) == prompt.count(503) == 2
    patches = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["input"]
    want = hf_logits(model, sc, pixel_values=torch.from_numpy(patches).float(),
                     image_grid_thw=torch.tensor(qvl.GOLDEN_GRIDS))
    cos = [float(row_cosines(e[:1], g[None])[0]) for e, g in zip(expected, want)]
    record_property("golden_image_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(e[0].argmax()) for e in expected] == [int(g.argmax()) for g in want]
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    steps = [s for s in res["steps"] if s["scenario"] == "image_prefill_decode"]
    assert len(steps) == len(sc["steps"]) and min(s["min_cosine"] for s in steps) >= 0.999


def test_a_wrong_encoder_fails_the_image_scenario_too(qwen, tmp_path):
    """One flipped weight byte in the tower: its own golden fails, and so does the language model's image
    scenario (the encoder's rows now differ), while the text scenarios still pass."""
    import shutil

    _, out = qwen
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bad / "visual" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x40
    data.write_bytes(bytes(raw))
    res = validate_export(bad, result_path=tmp_path / "v.json", verify=False)
    assert not res["passed"]
    by = {}
    for s in res["steps"]:
        by.setdefault(s["scenario"], []).append(s["min_cosine"])
    assert min(by["image_prefill_decode"]) < 0.999
    assert min(by["prefill_decode"]) >= 0.999 and min(by["chunked_prefill_decode"]) >= 0.999


@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_internvl_image_scenario_with_plain_rope(tmp_path, record_property, attention):
    """InternVL3.5: one 256-token tile in the prompt, plain RoPE (no positions in the bundle); in the plugin-free
    form too (its per-step inputs and static 4096-row cache)."""
    import torch
    from test_internvl_visual import VARIANTS, make_internvl

    ckpt, model = make_internvl(tmp_path / "ckpt", VARIANTS["layer_norm"])
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out"), "--attention", attention]) == 0
    meta, sc, expected = image_scenario(tmp_path / "out" / "llm")
    capacity = 4096 if attention == "native" else 832  # the image: two tiles and the thumbnail, 768 tokens
    assert sc["image"]["positions"] is None and sc["image"]["rows"] == [0, 768] and meta["kv_capacity"] == capacity
    if attention == "native":
        assert [st["context_lengths"] for st in sc["steps"][1:]] == [[1, 1]] * 4
    tile = load_file(str(tmp_path / "out" / "visual" / "golden" / "tensors.safetensors"))["input"]
    want = hf_logits(model, sc, pixel_values=torch.from_numpy(tile).float())
    cos = [float(row_cosines(e[:1], g[None])[0]) for e, g in zip(expected, want)]
    record_property("golden_image_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(e[0].argmax()) for e in expected] == [int(g.argmax()) for g in want]
    assert validate_export(tmp_path / "out", result_path=tmp_path / "v.json")["passed"]


def test_qwen3_vl_image_scenario_with_deepstack(tmp_path, record_property):
    """Qwen3-VL: the scenario carries the deepstack outputs' names; its expected logits (the eager decoder adding
    each feature after its layer) against HF's full forward; validation replays it with the tower's own rows."""
    import torch
    from test_qwen3_vl_visual import make_qwen3_vl

    from edgellm_export.visual import qwen3_vl as q3

    ckpt, model = make_qwen3_vl(tmp_path / "ckpt")
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 0
    _, sc, expected = image_scenario(tmp_path / "out" / "llm")
    assert sc["image"]["deepstack"] == ["deepstack_features_0", "deepstack_features_1"]
    patches = load_file(str(tmp_path / "out" / "visual" / "golden" / "tensors.safetensors"))["input"]
    prompt = sc["steps"][0]["token_ids"][0]
    ids = torch.tensor([prompt + [st["token_ids"][0][0] for st in sc["steps"][1:]]])
    want = hf_logits(model, sc, pixel_values=torch.from_numpy(patches).float(),  # both images, one prompt
                     image_grid_thw=torch.tensor(q3.GOLDEN_GRIDS), mm_token_type_ids=(ids == 500).int())
    cos = [float(row_cosines(e[:1], g[None])[0]) for e, g in zip(expected, want)]
    record_property("golden_image_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(e[0].argmax()) for e in expected] == [int(g.argmax()) for g in want]
    res = validate_export(tmp_path / "out", result_path=tmp_path / "v.json")
    assert res["passed"], res["failures"]
    assert min(s["min_cosine"] for s in res["steps"] if s["scenario"] == "image_prefill_decode") >= 0.999
