"""InternVL3.5's vision tower and projector exported as `OUT/visual/` next to the language model, validated.

Reference: transformers' InternVLModel.get_image_features on the same tiles (the tower, CLS dropped, pixel
shuffle, projector), against onnxruntime on the exported graph as it is. Tiny towers made by transformers
with 128 px tiles and 4 px patches, so that each tile gives the 256 tokens the 0.7.1 runtime sizes tiles at.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE
from fixtures.tower_checks import rel_err, row_cosines, skip_block
from safetensors.numpy import load_file, save_file

from edgellm_export.cli import main
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.validate import validate_export

VARIANTS = {
    # InternVL3.5-1B/2B/4B-like: LayerNorm, biased q/k/v, mean pooling (no final norm)
    "layer_norm": {"norm_type": "layer_norm", "attention_bias": True},
    # the 6B tower's options: RMSNorm, q/k RMSNorm, no q/k/v bias, a final LayerNorm
    "rms_norm": {"norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": False, "use_mean_pooling": False},
}
# The towers the comparisons with HF run on (the `exported` fixture): vision initializer_range 0.15 with the
# patch embedding scaled down, layer scales around 1 (transformers' 0.1 shrinks every block), and random position
# embeddings and CLS token (transformers initializes both to zeros, so a tower that dropped them was not told
# apart). With transformers' init the patch embedding dominates: a tower attending across tiles or with QuickGELU
# for GELU still matched HF at a cosine of 0.999999, and QuickGELU in the projector passed the cosine bound at
# 0.99991 (test_the_comparison_catches_a_broken_tower pins that each of those now fails). make_internvl's default
# stays transformers' init, which other modules' bounds are set on.
SENSITIVE = {"initializer_range": 0.15, "layer_scale_init_value": 1.0, "patch_scale": 0.2, "position_std": 0.2}
MIN_COSINE = 0.999  # per row, graph vs HF
MAX_REL_ERR = 0.003  # |graph - HF| / |HF| over all rows; measured <= 0.0012 (fp16); QuickGELU gives ~0.01


def make_internvl(path: Path, variant: dict, seed: int = 0, patch_scale: float = 1.0, position_std: float = 0.0,
                  **vision):
    """(checkpoint dir, fp32 HF model), saved in bf16 as the hub ships it."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    cfg = InternVLConfig(
        text_config={"model_type": "qwen2", **text, "rope_theta": 10000.0},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": [128, 128], "patch_size": [4, 4], **variant, **vision},
        image_token_id=500, downsample_ratio=0.5, initializer_range=0.05)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # every optional path carries signal: random biases, norms and layer scales
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or "lambda" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("embeddings.position_embeddings", "embeddings.cls_token")):
                p.add_(torch.randn_like(p) * position_std)
        model.model.vision_tower.embeddings.patch_embeddings.projection.weight.mul_(patch_scale)
        model.lm_head.weight.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(path)
    return path, model.float()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"internvl_{request.param}")
    ckpt, model = make_internvl(root / "ckpt", VARIANTS[request.param], **SENSITIVE)
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0  # every component, by default
    return ckpt, model, root / "out"


def hf_features(model, tiles: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=torch.from_numpy(tiles).float()).pooler_output
    return out.reshape(-1, out.shape[-1]).numpy()


def run_visual(out: Path, tiles: np.ndarray) -> np.ndarray:
    be = CpuBackend(out / "visual")
    try:
        return be.run({"input": tiles})["output"].astype(np.float32)
    finally:
        be.close()


def other_tiles() -> np.ndarray:
    return (np.random.default_rng(7).standard_normal((3, 3, 128, 128)) * 1.5).astype(np.float16)


def test_visual_graph_matches_transformers(exported, record_property):
    """The golden tiles and three other tiles (one call, batch 3), onnxruntime on the graph vs HF."""
    _, model, out = exported
    golden = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))
    worst, worst_err = 1.0, 0.0
    for tiles in (golden["input"], other_tiles()):
        got, want = run_visual(out, tiles), hf_features(model, tiles)
        assert got.shape == want.shape == (tiles.shape[0] * 256, BASE["hidden_size"])
        cos, err = row_cosines(got, want), rel_err(got, want)
        worst, worst_err = min(worst, float(cos.min())), max(worst_err, err)
        assert cos.min() >= MIN_COSINE, cos.min()
        assert err <= MAX_REL_ERR, err
    record_property("worst_cosine_vs_hf", worst)
    record_property("rel_err_vs_hf", worst_err)
    # the golden bundle's expected rows (the exporter's eager face) agree with HF too
    want = hf_features(model, golden["input"])
    assert row_cosines(golden["expected_output"], want).min() >= MIN_COSINE
    assert rel_err(golden["expected_output"], want) <= MAX_REL_ERR


def _across_tiles(tower):
    """Each layer's attention over all tiles of the call as one sequence (instead of each tile alone)."""

    def one_sequence(forward):
        def run(hidden_states, *args, **kwargs):
            b, n, d = hidden_states.shape
            out, weights = forward(hidden_states.reshape(1, b * n, d), *args, **kwargs)
            return out.reshape(b, n, d), weights
        return run

    return [(layer.attention, "forward", one_sequence(layer.attention.forward)) for layer in tower.encoder.layer]


def _no_position_table(tower):
    import torch

    pos = tower.embeddings.position_embeddings
    return [(tower.embeddings, "position_embeddings", torch.nn.Parameter(pos * 0))]


def _quick_gelu(model):
    from transformers.activations import ACT2FN

    return [(layer.mlp, "activation_fn", ACT2FN["quick_gelu"]) for layer in model.vision_tower.encoder.layer]


def _projector_quick_gelu(model):
    from transformers.activations import ACT2FN

    return [(model.multi_modal_projector, "act", ACT2FN["quick_gelu"])]


# Bugs put into HF's tower (the reference side), each as the attributes to patch; the graph must fail the
# comparison's bounds against every one of them. (GELU's tanh form for the exact one is not here: the two differ by
# at most 5e-4, under the fp16 graph's own error, so no comparison of this kind can tell them apart.)
MUTATIONS = {
    "no_position_table": lambda m: _no_position_table(m.vision_tower),
    "across_tiles": lambda m: _across_tiles(m.vision_tower),
    "quick_gelu": _quick_gelu,
    "projector_quick_gelu": _projector_quick_gelu,
    **{f"layer_{k}_skipped": (lambda m, k=k: skip_block(m.vision_tower.encoder.layer, k)) for k in range(2)},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_comparison_catches_a_broken_tower(exported, mutation, monkeypatch, record_property):
    """The graph against HF's tower with one deliberate bug (the position table left out, attention across the
    call's tiles, another activation in the tower or the projector, a layer left out), on the golden tiles: the
    bounds of test_visual_graph_matches_transformers fail, with a margin."""
    _, model, out = exported
    tiles = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["input"]
    got = run_visual(out, tiles)
    for obj, name, value in MUTATIONS[mutation](model.model):
        monkeypatch.setattr(obj, name, value)
    want = hf_features(model, tiles)
    cos, err = float(row_cosines(got, want).min()), rel_err(got, want)
    record_property("worst_cosine_vs_broken_hf", cos)
    record_property("rel_err_vs_broken_hf", err)
    assert err > 2 * MAX_REL_ERR, (cos, err)


def test_layout_config_manifest_and_validation(exported):
    import onnx

    _, _, out = exported
    cfg = json.loads((out / "visual" / "config.json").read_text())
    # what 0.7.1's InternViTRunner reads
    assert cfg["model_type"] == "internvl" and cfg["vision_config"]["model_type"] == "internvl"
    assert cfg["vision_config"]["patch_size"] == [4, 4] and cfg["vision_config"]["image_size"] == [128, 128]
    assert cfg["vision_config"]["num_channels"] == 3 and cfg["image_token_id"] == 500
    assert cfg["text_config"]["vocab_size"] == BASE["vocab_size"]
    graph = onnx.load(str(out / "visual" / "model.onnx"), load_external_data=False).graph
    onnx.checker.check_model(onnx.load(str(out / "visual" / "model.onnx")), full_check=True)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, dims(i)) for i in graph.input] == [("input", ["num_tiles", 3, 128, 128])]
    assert [(o.name, dims(o)) for o in graph.output] == [("output", ["num_image_tokens", BASE["hidden_size"]])]
    assert not [n for n in graph.node if n.domain]  # standard ops only: no plugin for this tower
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"visual/model.onnx", "visual/model.onnx.data", "visual/config.json",
            "visual/golden/tensors.safetensors"} <= set(files)
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    vis = res["components"]["visual"]["outputs"]["output"]
    assert vis["passed"] and vis["tokens"] == 768 and vis["worst_cosine"] >= 0.999  # two tiles and the thumbnail


def test_a_changed_encoder_fails_validation(exported, tmp_path):
    """The golden catches a wrong tower: one weight byte flipped after export (manifest check off, as a
    pipeline that trusts OUT would run it)."""
    import shutil

    _, _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bad / "visual" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x40  # the top exponent bit of the last fp16 weight (little-endian: its high byte)
    data.write_bytes(bytes(raw))
    res = validate_export(bad, result_path=tmp_path / "v.json", verify=False)
    assert not res["passed"] and any(f.startswith("visual:") for f in res["failures"])
    assert res["components"]["visual"]["outputs"]["output"]["worst_cosine"] < 0.999


def test_components_choice(exported, tmp_path, capsys):
    ckpt, _, _ = exported
    assert main(["-q", "export", str(ckpt), str(tmp_path / "llm_only"), "--components", "llm"]) == 0
    assert not (tmp_path / "llm_only" / "visual").exists()
    assert main(["-q", "export", str(ckpt), str(tmp_path / "a"), "--components", "llm,audio"]) == 2
    assert "has no audio encoder" in capsys.readouterr().err
    assert main(["-q", "export", str(ckpt), str(tmp_path / "b"), "--components", "visual"]) == 2
    assert "always holds the language model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("vision, words", [
    ({"image_size": [64, 64]}, "each tile gives 64 tokens (64 px, patch 4, downsample 0.5), but Edge-LLM 0.7.1"),
    ({"image_size": [128, 96]}, "image_size [128, 96]: the runtime's InternVL tiles are square"),
    ({"norm_type": "batch_norm"}, "norm_type 'batch_norm'"),
])
def test_towers_the_runtime_cannot_take_are_refused(tmp_path, capsys, vision, words):
    ckpt, _ = make_internvl(tmp_path / "ckpt", VARIANTS["layer_norm"])
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vision_config"].update(vision)
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and "config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_tower_tensor_the_graph_does_not_read_is_refused(tmp_path, capsys):
    ckpt, _ = make_internvl(tmp_path / "ckpt", VARIANTS["layer_norm"])
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["vision_tower.encoder.layer.0.attention.q_norm.weight"] = np.ones(64, np.float32)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vision tower has tensors this export does not read" in err and "q_norm" in err
    assert not (tmp_path / "out").exists()


def to_chat_layout(hf: Path, dst: Path, image_token: int = 500) -> Path:
    """The same model in InternVL3's own layout (`internvl_chat`, remote code on the hub, so no transformers
    class to make it with): llm_config, vision_model.* with a fused attn.qkv, mlp1.*, and the image token
    only in the tokenizer (`<IMG_CONTEXT>`)."""
    raw = json.loads((hf / "config.json").read_text())
    v = raw["vision_config"]
    vision = {"hidden_size": v["hidden_size"], "num_attention_heads": v["num_attention_heads"],
              "num_hidden_layers": v["num_hidden_layers"], "intermediate_size": v["intermediate_size"],
              "image_size": v["image_size"][0], "patch_size": v["patch_size"][0], "num_channels": 3,
              "norm_type": v["norm_type"], "layer_norm_eps": v["layer_norm_eps"], "qkv_bias": v["attention_bias"],
              "qk_normalization": v["use_qk_norm"], "hidden_act": "gelu", "model_type": "intern_vit_6b"}
    config = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "llm_config": raw["text_config"],
              "vision_config": vision, "downsample_ratio": raw["downsample_ratio"], "select_layer": -1,
              "ps_version": "v2", "tie_word_embeddings": raw.get("tie_word_embeddings", False)}
    t = load_file(str(hf / "model.safetensors"))
    emb, proj = "vision_tower.embeddings.", "multi_modal_projector."
    names = {emb + "cls_token": "vision_model.embeddings.class_embedding",
             emb + "position_embeddings": "vision_model.embeddings.position_embedding",
             **{f"{emb}patch_embeddings.projection.{x}": f"vision_model.embeddings.patch_embedding.{x}"
                for x in ("weight", "bias")},
             **{f"{proj}{m}.{x}": f"mlp1.{k}.{x}" for m, k in (("layer_norm", 0), ("linear_1", 1), ("linear_2", 3))
                for x in ("weight", "bias")}}
    layer = {"attention.projection_layer": "attn.proj", "attention.q_norm": "attn.q_norm",
             "attention.k_norm": "attn.k_norm", "layernorm_before": "norm1", "layernorm_after": "norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "lambda_1": "ls1", "lambda_2": "ls2"}
    out = {}
    for key, value in t.items():
        if key in names:
            out[names[key]] = value
        elif key.startswith("vision_tower.encoder.layer."):
            i, rest = key[len("vision_tower.encoder.layer."):].split(".", 1)
            pre = f"vision_model.encoder.layers.{i}."
            if rest.split(".")[:2] in (["attention", "q_proj"], ["attention", "k_proj"], ["attention", "v_proj"]):
                continue  # fused below
            base, _, suffix = rest.rpartition(".") if not rest.startswith("lambda") else (rest, "", "")
            out[pre + layer[base] + ("." + suffix if suffix else "")] = value
        else:
            out[key] = value
    for i in range(v["num_hidden_layers"]):
        for suffix in ("weight", "bias"):
            parts = [t.get(f"vision_tower.encoder.layer.{i}.attention.{m}_proj.{suffix}") for m in "qkv"]
            if parts[0] is not None:
                out[f"vision_model.encoder.layers.{i}.attn.qkv.{suffix}"] = np.concatenate(parts, axis=0)
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(image_token): {"content": "<IMG_CONTEXT>", "special": True}}}))
    return dst


@pytest.mark.parametrize("variant", [VARIANTS["layer_norm"], {**VARIANTS["rms_norm"], "use_mean_pooling": True}])
def test_internvl3_chat_layout_exports_the_same_tower(variant, tmp_path):
    """InternVL3 (`internvl_chat`; its tower has no final norm): the fused qkv split, every name mapped, the
    image token from the tokenizer; byte-identical graph and weights to the transformers layout's export."""
    ckpt, _ = make_internvl(tmp_path / "hf", variant)
    out = tmp_path / "hf_out"
    assert main(["-q", "export", str(ckpt), str(out)]) == 0
    chat = to_chat_layout(ckpt, tmp_path / "chat")
    assert main(["-q", "export", str(chat), str(tmp_path / "out")]) == 0
    got, want = tmp_path / "out" / "visual", out / "visual"
    assert (got / "model.onnx").read_bytes() == (want / "model.onnx").read_bytes()
    assert (got / "model.onnx.data").read_bytes() == (want / "model.onnx.data").read_bytes()
    cfg = json.loads((got / "config.json").read_text())
    assert cfg["image_token_id"] == 500 and cfg["model_type"] == "internvl"
    assert cfg["text_config"] == json.loads((chat / "config.json").read_text())["llm_config"]
    assert cfg["vision_config"]["patch_size"] == [4, 4] and cfg["vision_config"]["image_size"] == [128, 128]
    assert validate_export(tmp_path / "out", result_path=tmp_path / "v.json")["passed"]


def test_make_reports_the_visual_component(tmp_path):
    """`edgellm make` (on the host, CPU target): the case lists its visual component, summary.md shows it."""
    ckpt, _ = make_internvl(tmp_path / "ckpt", VARIANTS["layer_norm"])
    out = tmp_path / "DIR"
    assert main(["-q", "make", str(ckpt), "--target", "x86-cpu", "--out", str(out), "--no-container"]) == 0
    case = json.loads((out / "report" / "qualification.json").read_text())["cases"][0]
    visual = case["components"]["visual"]
    assert case["verdict"] == "pass" and visual["passed"] and visual["outputs"]["output"]["tokens"] == 768
    summary = (out / "report" / "summary.md").read_text()
    assert "## Components" in summary and f"| {case['name']} | visual | pass | 768 |" in summary


def test_an_encoder_failure_survives_a_threshold_override(exported, tmp_path):
    """A suite's looser LLM thresholds judge the language model's steps only: a failing encoder still fails
    the case."""
    import shutil

    from edgellm_validate.report import case_from_validation

    _, _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bad / "visual" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x40
    data.write_bytes(bytes(raw))
    res = validate_export(bad, result_path=tmp_path / "v.json", verify=False)
    case = case_from_validation("c", res, target="x86-cpu", export_dir=out, thresholds={"min_cosine": 0.5})
    assert case["verdict"] == "fail" and any(f.startswith("visual:") for f in case["failures"])
    assert case["components"]["visual"]["passed"] is False


def test_a_preprocessor_with_other_tiles_is_refused(tmp_path, capsys):
    ckpt, _ = make_internvl(tmp_path / "ckpt", VARIANTS["layer_norm"])
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 448, "width": 448}}))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "preprocessor_config.json" in err and "size is 448x448, but the tower's tiles are 128x128" in err
    assert not (tmp_path / "out").exists()
