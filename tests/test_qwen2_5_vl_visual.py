"""Qwen2.5-VL's vision tower exported as `OUT/visual/` (ViTAttentionPlugin, window attention), validated.

Reference: transformers' Qwen2_5_VisionTransformerPretrainedModel on the same patches and image grids. It
computes its rotary angles, cu_seqlens and window indices itself from grid_thw; our graph gets them from
`preprocess` (the runtime's rules, written here from reading them), so agreement checks both. onnxruntime runs
the exported graph with the plugin lowered (CPU backend).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import BASE
from fixtures.tower_checks import one_sequence, rel_err, row_cosines, skip_block
from safetensors.numpy import load_file

from edgellm_export.cli import main
from edgellm_export.visual import qwen2_5_vl as qvl
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.validate import validate_export

MROPE = [8, 12, 12]
TOKENS = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503}
VISION = {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
          "out_hidden_size": BASE["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1, 3]}
# The tower the comparisons with HF run on (the `exported` fixture): vision initializer_range 0.15 and the patch
# embedding scaled down, so that every block moves the output. With transformers' default init (std 0.02) the
# patch embedding dominates, and a tower without RoPE, attending across images or frames, without windows, or
# with GELU for SiLU still matched HF at a cosine of 0.99998 (test_the_comparison_catches_a_broken_tower pins
# that each of those now fails). make_qwen2_5_vl's default stays transformers' init: other modules'
# bounds (test_quantized_towers' quantization error) are set on it.
SENSITIVE = {"initializer_range": 0.15, "patch_scale": 0.2}
MIN_COSINE = 0.999  # per row, graph vs HF
MAX_REL_ERR = 0.005  # |graph - HF| / |HF| over all rows; measured ~0.002 (fp16); a broken tower gives >= 0.15


def make_qwen2_5_vl(path, dtype: str = "bfloat16", patch_scale: float = 1.0, **vision):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    cfg = Qwen2_5_VLConfig(
        text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": MROPE}, "rope_theta": 10000.0},
        vision_config={**VISION, **vision}, initializer_range=0.05, **TOKENS)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases and norms: every optional path carries signal
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.model.visual.patch_embed.proj.weight.mul_(patch_scale)
        model.lm_head.weight.mul_(4.0)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path, model.float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_5_vl_visual")
    ckpt, model = make_qwen2_5_vl(root / "ckpt", **SENSITIVE)
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0  # llm and visual, by default
    return ckpt, model, root / "out"


def hf_tower(model, patches: np.ndarray, grids) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(patches).float(), grid_thw=torch.tensor(grids)).pooler_output
    return out.numpy()


def graph_and_patches(exported, grids):
    """The exported graph's rows on seeded patches for `grids` (the runtime's preprocessing), and the patches."""
    ckpt, _, out = exported
    spec = qvl.parse(json.loads((ckpt / "config.json").read_text()), BASE["hidden_size"], None)
    t = sum(a * b * c for a, b, c in grids)
    patches = (np.random.default_rng(5).standard_normal((t, spec.patch_dim)) * 1.2).astype(np.float16)
    be = CpuBackend(out / "visual")
    try:
        got = be.run({qvl.INPUT: patches, **qvl.preprocess(grids, spec)})["output"].astype(np.float32)
    finally:
        be.close()
    return got, patches


GRIDS = {"golden": qvl.GOLDEN_GRIDS, "square": ((1, 8, 8),), "two_frames_and_large": ((2, 4, 12), (1, 16, 16))}


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
def test_visual_graph_matches_transformers(exported, grids, record_property):
    """Images smaller than a window, spanning partial windows, exact multiples of it (an empty padding row
    of windows), and a two-frame input (one sequence per frame)."""
    _, model, out = exported
    got, patches = graph_and_patches(exported, grids)
    want = hf_tower(model, patches, grids)
    t = sum(a * b * c for a, b, c in grids)
    assert got.shape == want.shape == (t // 4, BASE["hidden_size"])
    cos, err = row_cosines(got, want), rel_err(got, want)
    record_property("worst_cosine_vs_hf", float(cos.min()))
    record_property("rel_err_vs_hf", err)
    assert cos.min() >= MIN_COSINE, cos.min()
    assert err <= MAX_REL_ERR, err


def _gelu_for_silu(visual):
    import torch

    return [(b.mlp, "act_fn", torch.nn.GELU()) for b in visual.blocks]



def _modeling():
    """transformers' module whose attention bookkeeping the across-images / frames mutations patch."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    return modeling_qwen2_5_vl

# Bugs put into HF's tower (the reference side), each as the attributes to patch; the graph must fail the
# comparison's bounds against every one of them. (GELU's tanh form for the merger's exact one is not here: the
# two differ by at most 5e-4, under the fp16 graph's own error, so no comparison of this kind can tell them apart.)
MUTATIONS = {
    "no_rope": (GRIDS["golden"], lambda v: [(v.rotary_pos_emb, "inv_freq", v.rotary_pos_emb.inv_freq * 0)]),
    "across_images": (GRIDS["golden"], lambda v: one_sequence(_modeling(), False)),
    "across_frames": (GRIDS["two_frames_and_large"], lambda v: one_sequence(_modeling(), True)),
    "no_windows": (GRIDS["golden"], lambda v: [(v, "fullatt_block_indexes", list(range(len(v.blocks))))]),
    "gelu_for_silu": (GRIDS["golden"], _gelu_for_silu),
    **{f"block_{k}_skipped": (GRIDS["golden"], lambda v, k=k: skip_block(v.blocks, k)) for k in range(VISION["depth"])},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_comparison_catches_a_broken_tower(exported, mutation, monkeypatch, record_property):
    """The graph against HF's tower with one deliberate bug (RoPE off, attention across images or frames, no
    windows, another activation, a block left out): test_visual_graph_matches_transformers' bounds fail, with
    a margin. With transformers' default vision init (std 0.02) most of these passed at a cosine of 0.99998."""
    _, model, _ = exported
    grids, patch = MUTATIONS[mutation]
    got, patches = graph_and_patches(exported, grids)
    for obj, name, value in patch(model.model.visual):
        monkeypatch.setattr(obj, name, value)
    want = hf_tower(model, patches, grids)
    cos, err = float(row_cosines(got, want).min()), rel_err(got, want)
    record_property("worst_cosine_vs_broken_hf", cos)
    record_property("rel_err_vs_broken_hf", err)
    assert err > 2 * MAX_REL_ERR, (cos, err)


def test_layout_config_graph_and_validation(exported):
    ckpt, model, out = exported
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["vision_config"]["model_type"] == "qwen2_5_vl_vision"  # what recent transformers write
    cfg = json.loads((out / "visual" / "config.json").read_text())
    # ... mapped to a type 0.7.1's stringToModelType accepts; what QwenViTRunner reads is there
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["vision_config"]["model_type"] == "qwen2_5_vl"
    assert {k: cfg[k] for k in TOKENS} == TOKENS
    assert cfg["text_config"] == {"vocab_size": BASE["vocab_size"], "rope_theta": 10000.0,
                                  "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": MROPE}}
    model_proto = onnx.load(str(out / "visual" / "model.onnx"), load_external_data=False)
    graph = model_proto.graph
    assert [i.name for i in graph.input] == list(qvl.INPUTS) and [o.name for o in graph.output] == ["output"]
    plugins = [nd for nd in graph.node if nd.op_type == "ViTAttentionPlugin"]
    assert len(plugins) == VISION["depth"] and all(nd.domain == "trt_edgellm" for nd in plugins)
    attrs = {(a.name, a.i) for a in plugins[0].attribute}
    assert attrs == {("num_heads", 2), ("head_size", 32)}
    # full-attention blocks (1, 3) read cu_seqlens and the carrier input; the others the windows and a constant
    # carrier of the window's patch count, (112 / 14)^2
    assert [nd.input[3] for nd in plugins] == ["cu_window_seqlens", "cu_seqlens"] * 2
    consts = {init.name: init for init in graph.initializer}
    window_carrier = plugins[0].input[4]
    assert window_carrier in consts and list(consts[window_carrier].dims) == [64]
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    vis = res["components"]["visual"]["outputs"]["output"]
    assert vis["passed"] and vis["tokens"] == sum(a * b * c for a, b, c in qvl.GOLDEN_GRIDS) // 4
    golden = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))
    assert set(golden) == {*qvl.INPUTS, "expected_output"}  # the preprocessing travels with the bundle


@pytest.mark.parametrize("vision, words", [
    ({"window_size": 100}, "window_size 100 is not a positive multiple of patch_size x spatial_merge_size (28)"),
    ({"out_hidden_size": 128}, "out_hidden_size 128 (the tower's output) differs from the language model's"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' (supported: silu)"),
    ({"rope_parameters": {"rope_theta": 20000.0, "rope_type": "axial"}},
     "rope_theta 20000: Edge-LLM 0.7.1's Qwen runner computes the vision rotary angles"),
])
def test_towers_that_cannot_be_exported_are_refused(tmp_path, capsys, vision, words):
    ckpt, _ = make_qwen2_5_vl(tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vision_config"].update(vision)
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and "config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_preprocessing_refuses_grids_off_the_merge_size():
    spec = qvl.parse({"vision_config": VISION}, BASE["hidden_size"], None)
    with pytest.raises(ValueError, match="not a multiple of the merge size 2"):
        qvl.preprocess(((1, 5, 8),), spec)


def test_image_to_logits_matches_transformers(exported, record_property):
    """The whole path on the CPU, as the runtime runs it: patches -> the exported visual graph (with the runtime's
    preprocessing) -> its rows scattered into the prompt's image tokens -> the exported language model with a
    per-sequence MRoPE table -> logits, prefill then three decode steps; against HF's full forward on the same
    token ids, patches and grid (cosine >= 0.999 and the same top-1 at every step)."""
    import torch

    from edgellm_core.multimodal import mrope_table, qwen_positions, scatter_features
    from edgellm_validate.twin import Twin

    ckpt, model, out = exported
    spec = qvl.parse(json.loads((ckpt / "config.json").read_text()), BASE["hidden_size"], None)
    grids = ((1, 8, 12), (1, 4, 4))  # two images in one prompt
    rng = np.random.default_rng(11)
    patches = rng.standard_normal((sum(a * b * c for a, b, c in grids), spec.patch_dim)).astype(np.float16)
    be = CpuBackend(out / "visual")
    try:
        features = be.run({qvl.INPUT: patches, **qvl.preprocess(grids, spec)})["output"]
    finally:
        be.close()
    img = TOKENS["image_token_id"]
    start, end = TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
    prompt = [11, 12, 13, start, *[img] * 24, end, 14, 15, start, *[img] * 4, end, 16, 17, 18]
    decode = [21, 22, 23]
    llm = out / "llm"
    cfg = json.loads((llm / "config.json").read_text())
    capacity = 64
    positions = qwen_positions(prompt, grids, img, spec.merge)
    table = mrope_table(positions, capacity, theta=cfg["rope_theta"], rotary_dim=cfg["head_dim"],
                        section=cfg["rope_scaling"]["mrope_section"])
    be = CpuBackend(llm)
    try:
        twin = Twin(llm, be, capacity)
        embeds = scatter_features(twin.embedding.lookup(np.asarray([prompt])), prompt, img, features)
        got = []
        logits, state = twin.step(twin.new_state(1), [prompt], [len(prompt)], [], [[len(prompt) - 1]],
                                  inputs_embeds=embeds, rope=table)
        got.append(logits[0])
        for k, tok in enumerate(decode):
            done = len(prompt) + k
            logits, state = twin.step(state, [[tok]], [done + 1], [done], [[0]], rope=table)
            got.append(logits[0])
    finally:
        be.close()
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([prompt + decode]), pixel_values=torch.from_numpy(patches).float(),
                   image_grid_thw=torch.tensor(grids)).logits[0].numpy()
    want = [hf[len(prompt) - 1 + k] for k in range(len(decode) + 1)]
    cos = [float(row_cosines(a[None], b[None])[0]) for a, b in zip(got, want)]
    record_property("worst_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(a.argmax()) for a in got] == [int(b.argmax()) for b in want]
    # the image matters: the same prompt with plain token embeddings and positions is far from HF
    be = CpuBackend(llm)
    try:
        twin = Twin(llm, be, capacity)
        plain, _ = twin.step(twin.new_state(1), [prompt], [len(prompt)], [], [[len(prompt) - 1]])
    finally:
        be.close()
    assert float(row_cosines(plain, want[0][None])[0]) < 0.99


def test_preprocessor_config_is_checked_and_carried(tmp_path, capsys):
    """The runtime preprocesses by the checkpoint's processor settings: a contradicting preprocessor_config.json
    is exit 2 naming it; newer checkpoints' processor_config.json `image_processor` is extracted into
    visual/preprocessor_config.json."""
    ckpt, _ = make_qwen2_5_vl(tmp_path / "ckpt")
    pre = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
           "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    (ckpt / "processor_config.json").write_text(json.dumps({"image_processor": pre, "processor_class": "x"}))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "ok"), "--no-golden"]) == 0
    assert json.loads((tmp_path / "ok" / "visual" / "preprocessor_config.json").read_text()) == pre
    (ckpt / "preprocessor_config.json").write_text(json.dumps({**pre, "patch_size": 16}))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "bad"), "--no-golden"]) == 2
    err = capsys.readouterr().err
    assert "preprocessor_config.json" in err and "patch_size is 16, but the tower's is 14" in err
    assert not (tmp_path / "bad").exists()


def test_missing_or_renamed_tower_weights_are_refused(tmp_path, capsys):
    from safetensors.numpy import save_file

    ckpt, _ = make_qwen2_5_vl(tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    # the tower under a prefix nothing knows: its tensors are missing where the export looks
    save_file({("vision_tower." + k[len("visual."):] if k.startswith("visual.") else k): v for k, v in tensors.items()},
              str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "visual.patch_embed.proj.weight" in err and "missing" in err and not (tmp_path / "out").exists()


def test_a_merge_size_the_runtime_does_not_count_is_refused(tmp_path, capsys):
    ckpt, _ = make_qwen2_5_vl(tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vision_config"].update(spatial_merge_size=4, window_size=112)
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    assert "spatial_merge_size 4" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_fp32_checkpoint_exports_and_validates(tmp_path):
    """The hub ships bf16; an fp32 checkpoint (a fine-tune saved as trained) exports the same way."""
    from safetensors import safe_open

    ckpt, model = make_qwen2_5_vl(tmp_path / "ckpt", dtype="float32", **SENSITIVE)
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        assert f.get_slice("visual.blocks.0.attn.qkv.weight").get_dtype() == "F32"
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 0
    golden = load_file(str(tmp_path / "out" / "visual" / "golden" / "tensors.safetensors"))
    t = sum(a * b * c for a, b, c in qvl.GOLDEN_GRIDS)
    want = hf_tower(model, golden["input"][:t], [list(g) for g in qvl.GOLDEN_GRIDS])
    assert row_cosines(golden["expected_output"], want).min() >= MIN_COSINE
    assert rel_err(golden["expected_output"], want) <= MAX_REL_ERR
    res = validate_export(tmp_path / "out", result_path=tmp_path / "v.json")
    assert res["passed"], res["failures"]
