"""Phi-4-multimodal: its vision tower exported as `OUT/visual/` (with `phi4mm_gn_proj.safetensors`) next to its
language model, in transformers' layout (`phi4_multimodal`) and the original release's (`phi4mm`).

References: transformers' Phi4MultimodalImageEmbedding for the tower's features (pooled, projected) and
Phi4MultimodalForCausalLM's full forward for the golden image scenario's logits (the crops laid out by the HD
transform with the separators, scattered at the image tokens). Tiny towers (hidden 32) on the runtime's real
crop geometry: 448 px, patch 14, 16 x 16 tokens per crop; the vocabulary holds the runtime's placeholder 200010.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.tower_checks import rel_err, row_cosines, skip_block
from safetensors.numpy import load_file, save_file

from edgellm_export.cli import main
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.trt import visual_profiles
from edgellm_validate.validate import validate_export

TEXT = dict(vocab_size=200064, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4096, pad_token_id=199999)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=448,
              patch_size=14, crop_size=448)
AUDIO = dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=32,
             depthwise_separable_out_channel=32, nemo_conv_channels=32)
IMAGE_TOKEN = 200010
MIN_COSINE = 0.999  # per row, graph vs HF
# |graph - HF| / |HF| over all rows; measured ~0.0012 (fp16). QuickGELU for the tower's tanh-GELU gives ~0.008 at a
# cosine of 0.99988, which the cosine bound alone would pass (test_the_comparison_catches_a_broken_tower).
MAX_REL_ERR = 0.003


def make_phi4mm(path: Path, seed: int = 0, rope: dict | None = None):
    """(checkpoint dir, fp32 HF model) in transformers' layout, saved in bf16 as the hub ships it."""
    import torch
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    torch.manual_seed(seed)
    cfg = Phi4MultimodalConfig(**TEXT, vision_config=VISION, audio_config=AUDIO, initializer_range=0.05,
                               rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 1.0})
    model = Phi4MultimodalForCausalLM(cfg).eval()
    # transformers' SDPA path runs this tower causally (its attention is flagged is_causal and an all-ones mask
    # is dropped); SigLIP, the original release and the runtime attend both ways, as its eager path does.
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    with torch.no_grad():  # every path carries signal: the separators, biases and norms are not left at init
        for name, p in model.named_parameters():
            if "extensor" in name or name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "img_processor" in name and name.endswith(".weight") and p.dim() == 2:
                p.mul_(0.3)  # SigLIP's init (normal, std 1) saturates a 32-wide tower
        model.lm_head.weight.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(path)
    return path, model.float()


def to_original_layout(hf: Path, dst: Path) -> Path:
    """The same model as the original release lays it out (`phi4mm`, remote code on the hub): img_projection.0/2,
    glb_GN / sub_GN, embd_layer; the tower's sizes kept in a vision_config (a small tower needs one)."""
    raw = json.loads((hf / "config.json").read_text())
    config = {k: v for k, v in raw.items() if k not in ("audio_config",)}
    config.update(model_type="phi4mm", architectures=["Phi4MMForCausalLM"],
                  embd_layer={"image_embd_layer": {"crop_size": 448, "hd_transform_order": "sub_glb",
                                                   "projection_cls": "mlp", "use_hd_transform": True}})
    names = {"img_projection_up": "img_projection.0", "img_projection_down": "img_projection.2",
             "global_img_feature_extensor": "glb_GN", "sub_img_feature_extensor": "sub_GN"}
    out = {}
    for key, value in load_file(str(hf / "model.safetensors")).items():
        if "audio_embed" in key:
            continue
        for a, b in names.items():
            key = key.replace(f"image_embed.{a}", f"image_embed.{b}")
        out[key] = value
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def crops_inputs(crops: np.ndarray, blocks=(1, 2)):
    import torch

    n = crops.shape[0]
    return {"image_pixel_values": torch.from_numpy(crops).float()[None],
            "image_sizes": torch.tensor([[448 * blocks[0], 448 * blocks[1]]]),
            "image_attention_mask": torch.ones((1, n, 32, 32), dtype=torch.bool)}


def hf_crop_features(model, crops: np.ndarray) -> np.ndarray:
    """transformers' per-crop features, pooled and projected (the graph's output rows)."""
    import torch

    emb = model.model.embed_tokens_extend.image_embed
    with torch.no_grad():
        x = torch.from_numpy(crops).float()
        feats = emb.get_img_features(x, attention_mask=torch.ones((x.shape[0], 32, 32), dtype=torch.bool))
        out = emb.img_projection_down(torch.nn.functional.gelu(emb.img_projection_up(feats)))
    return out.reshape(-1, out.shape[-1]).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi4mm")
    ckpt, model = make_phi4mm(root / "ckpt")
    assert main(["-q", "export", str(ckpt), str(root / "out"), "--components", "llm,visual"]) == 0
    return ckpt, model, root / "out"


def run_visual(out: Path, crops: np.ndarray) -> np.ndarray:
    be = CpuBackend(out / "visual")
    try:
        return be.run({"input": crops})["output"].astype(np.float32)
    finally:
        be.close()


def test_tower_matches_transformers(exported, record_property):
    _, model, out = exported
    golden = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))
    other = (np.random.default_rng(5).standard_normal((2, 3, 448, 448)) * 1.2).astype(np.float16)
    worst, worst_err = 1.0, 0.0
    for crops in (golden["input"], other):
        got, want = run_visual(out, crops), hf_crop_features(model, crops)
        assert got.shape == want.shape == (crops.shape[0] * 256, TEXT["hidden_size"])
        worst, worst_err = min(worst, float(row_cosines(got, want).min())), max(worst_err, rel_err(got, want))
    record_property("worst_cosine_vs_hf", worst)
    record_property("rel_err_vs_hf", worst_err)
    assert worst >= MIN_COSINE, worst
    assert worst_err <= MAX_REL_ERR, worst_err
    want = hf_crop_features(model, golden["input"])
    assert row_cosines(golden["expected_output"], want).min() >= MIN_COSINE
    assert rel_err(golden["expected_output"], want) <= MAX_REL_ERR


def _each_attention(tower, wrap):
    return [(layer.self_attn, "forward", wrap(layer.self_attn.forward)) for layer in tower.encoder.layers]


def _across_crops(forward):
    """Attention over all crops of the call as one sequence (instead of each crop alone)."""
    def run(hidden_states, attention_mask=None, **kwargs):
        b, n, d = hidden_states.shape
        out, weights = forward(hidden_states.reshape(1, b * n, d), None, **kwargs)
        return out.reshape(b, n, d), weights
    return run


def _causal(forward):
    """Causal attention within each crop (what transformers' SDPA path does with this tower; see make_phi4mm)."""
    import torch

    def run(hidden_states, attention_mask=None, **kwargs):
        n = hidden_states.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        return forward(hidden_states, mask, **kwargs)
    return run


def _no_position_table(tower):
    import torch

    table = tower.embeddings.position_embedding
    return [(table, "weight", torch.nn.Parameter(table.weight * 0))]


def _quick_gelu(tower):
    from transformers.activations import ACT2FN

    return [(layer.mlp, "activation_fn", ACT2FN["quick_gelu"]) for layer in tower.encoder.layers]


# Bugs put into HF's tower (the reference side), each as the attributes to patch; the graph must fail the
# comparison's bounds against every one of them. The features are the second-to-last layer's (feature_layer -2),
# so the last layer is never run and leaving it out changes nothing; exact GELU for the tower's tanh form is not
# here either: the two differ by at most 5e-4, under the fp16 graph's own error.
MUTATIONS = {
    "no_position_table": lambda e: _no_position_table(e.img_processor),
    "across_crops": lambda e: _each_attention(e.img_processor, _across_crops),
    "causal_attention": lambda e: _each_attention(e.img_processor, _causal),
    "quick_gelu": lambda e: _quick_gelu(e.img_processor),
    "last_layer_features": lambda e: [(e, "layer_idx", -1)],
    **{f"layer_{k}_skipped": (lambda e, k=k: skip_block(e.img_processor.encoder.layers, k))
       for k in range(VISION["num_hidden_layers"] - 1)},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_comparison_catches_a_broken_tower(exported, mutation, monkeypatch, record_property):
    """The graph against HF's tower with one deliberate bug (the position table left out, attention across the
    call's crops or causal, another activation, the last layer's features, a layer left out), on the golden crops:
    test_tower_matches_transformers' bounds fail, with a margin."""
    _, model, out = exported
    crops = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["input"]
    got = run_visual(out, crops)
    for obj, name, value in MUTATIONS[mutation](model.model.embed_tokens_extend.image_embed):
        monkeypatch.setattr(obj, name, value)
    want = hf_crop_features(model, crops)
    cos, err = float(row_cosines(got, want).min()), rel_err(got, want)
    record_property("worst_cosine_vs_broken_hf", cos)
    record_property("rel_err_vs_broken_hf", err)
    assert err > 2 * MAX_REL_ERR, (cos, err)


def test_separators_sidecar_and_config(exported):
    import torch

    _, model, out = exported
    side = load_file(str(out / "visual" / "phi4mm_gn_proj.safetensors"))
    assert set(side) == {"glb_GN", "sub_GN"}
    emb = model.model.embed_tokens_extend.image_embed
    with torch.no_grad():
        for key, param in (("glb_GN", emb.global_img_feature_extensor), ("sub_GN", emb.sub_img_feature_extensor)):
            want = emb.img_projection_down(torch.nn.functional.gelu(emb.img_projection_up(param.reshape(1, -1))))
            assert side[key].dtype == np.float16 and side[key].shape == (TEXT["hidden_size"],)
            assert row_cosines(side[key][None].astype(np.float32), want.numpy())[0] >= 0.999
    cfg = json.loads((out / "visual" / "config.json").read_text())
    # what 0.7.1's visual builder and Phi4MMViTRunner read
    assert cfg["model_type"] == "phi4mm" and cfg["vocab_size"] == TEXT["vocab_size"]
    assert visual_profiles.model_type(cfg) == "phi4mm"  # vision_config.model_type first, as visual_build reads
    assert cfg["embd_layer"]["image_embd_layer"]["crop_size"] == 448
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"visual/model.onnx", "visual/phi4mm_gn_proj.safetensors", "llm/model.onnx"} <= set(files)
    assert not (out / "audio").exists()


def test_image_scenario_matches_transformers_and_validates(exported, record_property):
    _, model, out = exported
    meta = json.loads((out / "llm" / "golden" / "bundle.json").read_text())
    (sc,) = [s for s in meta["scenarios"] if s["name"] == "image_prefill_decode"]
    expected = load_file(str(out / "llm" / "golden" / "logits.safetensors"))
    prompt = sc["steps"][0]["token_ids"][0]
    # 1 x 2 sub-crops: 512 rows + 16 separators, glb_GN, the thumbnail's 16 x 17
    assert prompt.count(IMAGE_TOKEN) == 512 + 16 + 1 + 272 and sc["image"]["assemble"]["blocks"] == [[1, 2]]
    import torch

    crops = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["input"]
    ids = torch.tensor([prompt + [st["token_ids"][0][0] for st in sc["steps"][1:]]])
    with torch.no_grad():
        logits = model(input_ids=ids, **crops_inputs(crops)).logits[0].numpy()
    want = [logits[len(prompt) - 1 + k] for k in range(len(sc["steps"]))]
    got = [expected[st["logits"]][0] for st in sc["steps"]]
    cos = [float(row_cosines(g[None], w[None])[0]) for g, w in zip(got, want)]
    record_property("golden_image_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(g.argmax()) for g in got] == [int(w.argmax()) for w in want]
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    steps = [s for s in res["steps"] if s["scenario"] == "image_prefill_decode"]
    assert len(steps) == len(sc["steps"]) and min(s["min_cosine"] for s in steps) >= 0.999


def test_original_layout_exports_the_same_tower(exported, tmp_path):
    ckpt, _, out = exported
    orig = to_original_layout(ckpt, tmp_path / "orig")
    assert main(["-q", "export", str(orig), str(tmp_path / "out")]) == 0  # no audio in this one
    a = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["expected_output"]
    b = load_file(str(tmp_path / "out" / "visual" / "golden" / "tensors.safetensors"))["expected_output"]
    assert np.array_equal(a, b)
    for name in ("phi4mm_gn_proj.safetensors", "model.onnx.data"):
        assert (out / "visual" / name).read_bytes() == (tmp_path / "out" / "visual" / name).read_bytes()


def test_audio_encoder_is_never_dropped_silently(exported, tmp_path, capsys):
    ckpt, _, _ = exported
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "audio encoder (audio_config)" in err and "--components llm,visual" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("adapter, named", [(".vision", "vision"), ("", "unnamed")])  # builtin / PEFT-style keys
def test_unmerged_builtin_lora_is_refused(exported, tmp_path, capsys, adapter, named):
    ckpt, _, _ = exported
    orig = to_original_layout(ckpt, tmp_path / "orig")
    t = load_file(str(orig / "model.safetensors"))
    w = t.pop("model.layers.0.self_attn.qkv_proj.weight")
    t["model.layers.0.self_attn.qkv_proj.base_layer.weight"] = w
    t[f"model.layers.0.self_attn.qkv_proj.lora_A{adapter}.weight"] = np.zeros((4, w.shape[1]), w.dtype)
    t[f"model.layers.0.self_attn.qkv_proj.lora_B{adapter}.weight"] = np.zeros((w.shape[0], 4), w.dtype)
    save_file(t, str(orig / "model.safetensors"), metadata={"format": "pt"})
    assert main(["-q", "export", str(orig), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"unmerged LoRA adapters ({named})" in err and "edgellm merge-lora" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vision, words", [
    ({"image_size": 224, "crop_size": 224}, "runner takes 448 px crops of 16 x 16 tokens"),
    ({"patch_size": 16}, "patch_size 16"),
    ({"image_token_id": 200001}, "image_token_id 200001: Edge-LLM 0.7.1's Phi-4-MM runner expands placeholder"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"feature_layer": 0}, "feature_layer 0"),
])
def test_towers_the_runtime_cannot_take_are_refused(exported, tmp_path, capsys, vision, words):
    import shutil

    ckpt, _, _ = exported
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["vision_config"].update(vision)
    (bad / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(bad), str(tmp_path / "out"), "--components", "llm,visual"]) == 2
    err = capsys.readouterr().err
    assert words in err and "config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
