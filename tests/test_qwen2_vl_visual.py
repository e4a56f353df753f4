"""Qwen2-VL's own vision tower exported as `OUT/visual/` (LayerNorm blocks, QuickGELU MLP, full attention per
frame through the ViTAttentionPlugin, no window inputs), validated.

Reference: transformers' Qwen2VisionTransformerPretrainedModel on the same patches and image grids; it computes its
rotary angles and cu_seqlens itself from grid_thw, our graph gets them from `preprocess` (the runtime's rules), so
agreement checks both. onnxruntime runs the exported graph with the plugin lowered (CPU backend). The golden
bundle's image scenario is checked against transformers' full forward on the same prompt and patches.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import BASE
from fixtures.tower_checks import rel_err, row_cosines
from safetensors.numpy import load_file

from edgellm_export.cli import main
from edgellm_export.visual import qwen2_vl as q2
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.trt import visual_profiles
from edgellm_validate.trt.profiles import ShapeRange
from edgellm_validate.validate import validate_export

MROPE = [8, 12, 12]  # head_dim 64: the sections cover the 32 rotary frequencies
TOKENS = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503}
# initializer_range 0.15 (with the patch embedding scaled down, below) so that every block moves the output: with
# transformers' default 0.02 the patch embedding dominates and a tower without RoPE, attending across images, or with
# another activation would still pass a cosine of 0.999.
VISION = {"depth": 3, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 4, "hidden_size": BASE["hidden_size"],
          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
          "initializer_range": 0.15}
MAX_REL_ERR = 0.004  # |graph - HF| / |HF| over all rows; measured ~0.001 (fp16), GELU for QuickGELU gives ~0.012


def make_qwen2_vl(path, dtype: str = "bfloat16", **vision):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    cfg = Qwen2VLConfig(
        text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": MROPE}, "rope_theta": 10000.0},
        vision_config={**VISION, **vision}, initializer_range=0.05, **TOKENS)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases and norms: every optional path carries signal
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.model.visual.patch_embed.proj.weight.mul_(0.2)
        model.lm_head.weight.mul_(4.0)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path, model.float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_vl_visual")
    ckpt, model = make_qwen2_vl(root / "ckpt")
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0  # llm and visual, by default
    return ckpt, model, root / "out"


def spec_of(ckpt):
    return q2.parse(json.loads((ckpt / "config.json").read_text()), BASE["hidden_size"], None)


def hf_tower(model, patches: np.ndarray, grids) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(patches).float(), grid_thw=torch.tensor(grids)).pooler_output
    return out.numpy()


def run_visual(out, feeds) -> np.ndarray:
    be = CpuBackend(out / "visual")
    try:
        return be.run(feeds)["output"].astype(np.float32)
    finally:
        be.close()


@pytest.mark.parametrize("grids", [q2.GOLDEN_GRIDS, ((1, 8, 8),), ((1, 2, 24), (1, 22, 4)), ((2, 4, 12), (1, 16, 16))],
                         ids=["golden", "square", "wide_and_tall", "two_frames_and_large"])
def test_visual_graph_matches_transformers(exported, grids, record_property):
    """Square, very wide and very tall images, two images in one call, and a two-frame input (one attention
    sequence per frame)."""
    ckpt, model, out = exported
    spec = spec_of(ckpt)
    t = sum(a * b * c for a, b, c in grids)
    patches = (np.random.default_rng(5).standard_normal((t, spec.patch_dim)) * 1.2).astype(np.float16)
    got = run_visual(out, {q2.INPUT: patches, **q2.preprocess(grids, spec)})
    want = hf_tower(model, patches, grids)
    assert got.shape == want.shape == (t // 4, BASE["hidden_size"])
    cos, err = row_cosines(got, want), rel_err(got, want)
    record_property("worst_cosine_vs_hf", float(cos.min()))
    record_property("rel_err_vs_hf", err)
    assert cos.min() >= 0.999, cos.min()
    assert err <= MAX_REL_ERR, err


def test_the_comparison_tells_the_activation_apart(exported, record_property):
    """QuickGELU and GELU differ by at most ~0.02: the relative-error bound (not the cosine) is what would catch a
    tower exported with the wrong one; show that it does, on the golden grids."""
    import torch

    ckpt, model, out = exported
    spec, grids = spec_of(ckpt), q2.GOLDEN_GRIDS
    t = sum(a * b * c for a, b, c in grids)
    patches = (np.random.default_rng(5).standard_normal((t, spec.patch_dim)) * 1.2).astype(np.float16)
    got = run_visual(out, {q2.INPUT: patches, **q2.preprocess(grids, spec)})
    blocks = model.model.visual.blocks
    acts = [b.mlp.act for b in blocks]
    try:
        for b in blocks:
            b.mlp.act = torch.nn.GELU()
        other = hf_tower(model, patches, grids)
    finally:
        for b, act in zip(blocks, acts):
            b.mlp.act = act
    err = rel_err(got, other)
    record_property("rel_err_vs_hf_with_gelu", err)
    assert err > 2 * MAX_REL_ERR, err


def test_golden_bundle_matches_transformers(exported, record_property):
    """The bundle's expected rows (the eager face over the weights as written) against HF, and the graph on the
    bundle's inputs (what `validate` replays)."""
    _, model, out = exported
    golden = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))
    assert set(golden) == {*q2.INPUTS, "expected_output"}  # the preprocessing travels with the bundle
    want = hf_tower(model, golden["input"], [list(g) for g in q2.GOLDEN_GRIDS])
    cos, err = row_cosines(golden["expected_output"], want), rel_err(golden["expected_output"], want)
    record_property("golden_expected_cosine_vs_hf", float(cos.min()))
    record_property("golden_expected_rel_err_vs_hf", err)
    assert cos.min() >= 0.999 and err <= MAX_REL_ERR, (cos.min(), err)
    got = run_visual(out, {name: golden[name] for name in q2.INPUTS})
    assert row_cosines(got, golden["expected_output"]).min() >= 0.9999


def test_layout_config_graph_and_profile(exported):
    ckpt, _, out = exported
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["vision_config"]["model_type"] == "qwen2_vl_vision"  # what recent transformers write
    cfg = json.loads((out / "visual" / "config.json").read_text())
    # ... mapped to the type 0.7.1's stringToModelType accepts, where visual_build reads it first
    assert cfg["model_type"] == cfg["vision_config"]["model_type"] == "qwen2_vl"
    assert visual_profiles.model_type(cfg) == "qwen2_vl"
    assert {k: cfg[k] for k in TOKENS} == TOKENS
    assert cfg["text_config"] == {"vocab_size": BASE["vocab_size"], "rope_theta": 10000.0,
                                  "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": MROPE}}
    graph = onnx.load(str(out / "visual" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == list(q2.INPUTS) and [o.name for o in graph.output] == ["output"]
    plugins = [nd for nd in graph.node if nd.op_type == "ViTAttentionPlugin"]
    assert len(plugins) == VISION["depth"] and all(nd.domain == "trt_edgellm" for nd in plugins)
    assert {(a.name, a.i) for a in plugins[0].attribute} == {("num_heads", 2), ("head_size", 32)}
    assert all(list(nd.input[3:5]) == ["cu_seqlens", "max_seqlen_carrier"] for nd in plugins)  # full attention
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    prof = visual_profiles.visual_profile(cfg, dims)  # visual_build's defaults 4 / 1024 / 512
    assert set(prof) == set(dims)  # every graph input, nothing else
    assert prof["input"] == ShapeRange((16, 1176), (2056, 1176), (4096, 1176))  # 3*2*14*14
    assert prof["rotary_pos_emb"] == ShapeRange((16, 16), (2056, 16), (4096, 16))  # head_dim 32 / 2
    assert prof["cu_seqlens"] == ShapeRange((2,), (257,), (257,))
    assert prof["max_seqlen_carrier"] == ShapeRange((1,), (1024,), (2048,))


def test_image_scenario_matches_transformers_and_validates(exported, record_property):
    """The language model's golden image scenario (both golden images in one prompt, MRoPE positions): its
    expected logits against HF's full forward on the same prompt and patches; then `validate` passes."""
    import torch

    _, model, out = exported
    llm = out / "llm"
    meta = json.loads((llm / "golden" / "bundle.json").read_text())
    (sc,) = [s for s in meta["scenarios"] if s["name"] == "image_prefill_decode"]
    logits = load_file(str(llm / "golden" / "logits.safetensors"))
    expected = [logits[st["logits"]] for st in sc["steps"]]
    tokens = sum(t * h * w for t, h, w in q2.GOLDEN_GRIDS) // 4
    assert sc["image"]["rows"] == [0, tokens] and len(sc["image"]["positions"]) == 3
    prompt = sc["steps"][0]["token_ids"][0]
    assert prompt.count(TOKENS["image_token_id"]) == tokens
    assert prompt.count(TOKENS["vision_start_token_id"]) == prompt.count(TOKENS["vision_end_token_id"]) == 2
    patches = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["input"]
    ids = torch.tensor([prompt + [st["token_ids"][0][0] for st in sc["steps"][1:]]])
    with torch.no_grad():
        hf = model(input_ids=ids, pixel_values=torch.from_numpy(patches).float(),
                   image_grid_thw=torch.tensor(q2.GOLDEN_GRIDS),
                   mm_token_type_ids=(ids == TOKENS["image_token_id"]).int()).logits[0].numpy()
    want = [hf[len(prompt) - 1 + k] for k in range(len(sc["steps"]))]
    cos = [float(row_cosines(e[:1], g[None])[0]) for e, g in zip(expected, want)]
    record_property("golden_image_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(e[0].argmax()) for e in expected] == [int(g.argmax()) for g in want]
    with torch.no_grad():  # the image matters: without it (the image tokens' own embeddings) HF is far away
        plain = model(input_ids=ids).logits[0].numpy()[len(prompt) - 1]
    assert float(row_cosines(expected[0][:1], plain[None])[0]) < 0.99
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    vis = res["components"]["visual"]["outputs"]["output"]
    assert vis["passed"] and vis["tokens"] == tokens
    steps = [s for s in res["steps"] if s["scenario"] == "image_prefill_decode"]
    assert len(steps) == len(sc["steps"]) and min(s["min_cosine"] for s in steps) >= 0.999
    record_property("validate_image_min_cosine", min(s["min_cosine"] for s in steps))


@pytest.mark.parametrize("vision, words", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' (supported: quick_gelu)"),
    ({"hidden_size": 128}, "hidden_size 128 (the tower's output) differs from the language model's hidden size 256"),
    ({"spatial_merge_size": 4}, "spatial_merge_size 4"),
    ({"embed_dim": 60}, "embed_dim 60 / num_heads 2"),
    ({"rope_parameters": {"rope_type": "axial", "rope_theta": 20000.0}}, "rope_theta 20000: Edge-LLM 0.7.1's Qwen "
     "runner computes the vision rotary angles with 10000"),
])
def test_towers_that_cannot_be_exported_are_refused(exported, tmp_path, capsys, vision, words):
    """Exit 2 naming config.json, nothing written (the checkpoint's weights are not even read)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(exported[0], ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vision_config"].update(vision)
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and "config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_preprocessing_refuses_grids_off_the_merge_size(exported):
    with pytest.raises(ValueError, match="not a multiple of the merge size 2"):
        q2.preprocess(((1, 5, 8),), spec_of(exported[0]))


def test_the_hubs_config_layout_exports_the_same_tower(exported, tmp_path):
    """Released Qwen2-VL checkpoints' config.json: the text model's fields at the root, and a vision_config
    without model_type or hidden_act (QuickGELU by default) that says `in_chans`. Same tower, same golden rows,
    visual/config.json still names `qwen2_vl`, and the export validates."""
    import shutil

    ckpt, _, out = exported
    legacy = tmp_path / "ckpt"
    shutil.copytree(ckpt, legacy)
    raw = json.loads((ckpt / "config.json").read_text())
    text, vision = raw.pop("text_config"), raw.pop("vision_config")
    rope = text.pop("rope_parameters")
    flat = {**{k: v for k, v in text.items() if k not in ("model_type", "layer_types")}, **raw,
            "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
            "vision_config": {"in_chans": vision["in_channels"], "spatial_patch_size": vision["patch_size"],
                              **{k: vision[k] for k in ("depth", "embed_dim", "mlp_ratio", "num_heads", "hidden_size",
                                                        "patch_size", "spatial_merge_size", "temporal_patch_size")}}}
    (legacy / "config.json").write_text(json.dumps(flat))
    assert main(["-q", "export", str(legacy), str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "visual" / "config.json").read_text())
    assert cfg["model_type"] == cfg["vision_config"]["model_type"] == "qwen2_vl"
    assert cfg["text_config"]["rope_scaling"]["mrope_section"] == MROPE
    golden = [load_file(str(o / "visual" / "golden" / "tensors.safetensors")) for o in (out, tmp_path / "out")]
    assert np.array_equal(golden[0]["expected_output"], golden[1]["expected_output"])
    res = validate_export(tmp_path / "out", result_path=tmp_path / "v.json")
    assert res["passed"], res["failures"]
