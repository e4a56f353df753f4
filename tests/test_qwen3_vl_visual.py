"""Qwen3-VL's vision tower exported as `OUT/visual/` (learned positions through fast_pos_embed, deepstack side
outputs), validated, and the whole image -> logits path with the deepstack features fed to the language model.

References: transformers' Qwen3VLVisionModel (which derives its own interpolation, rotary and sequence inputs
from grid_thw) and Qwen3VLForConditionalGeneration's full forward.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BASE
from fixtures.tower_checks import one_sequence, rel_err, row_cosines, skip_block

from edgellm_export.cli import main
from edgellm_export.visual import qwen3_vl as q3
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.validate import validate_export

MROPE = [8, 12, 12]
TOKENS = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503}
# The tower the comparisons with HF run on (the `exported` fixture): vision initializer_range 0.15 and the patch
# embedding scaled down, so that every block moves the output. With transformers' default init (std 0.02) the
# patch embedding dominates, and a tower without RoPE, attending across images or frames, or with QuickGELU for
# tanh-GELU still matched HF at a cosine of 0.99998 (test_the_comparison_catches_a_broken_tower pins that each
# of those now fails). make_qwen3_vl's default stays transformers' init, which other modules' bounds are set on.
SENSITIVE = {"initializer_range": 0.15, "patch_scale": 0.2}
MIN_COSINE = 0.999  # per row, graph vs HF, every output
MAX_REL_ERR = 0.003  # |graph - HF| / |HF| per output; measured <= 0.0012 (fp16); QuickGELU for GELU gives ~0.01


def make_qwen3_vl(path, patch_scale: float = 1.0, **vision):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    rope = {"rope_type": "default", "mrope_section": MROPE, "mrope_interleaved": True}
    cfg = Qwen3VLConfig(
        text_config={**text, "num_hidden_layers": 3, "head_dim": 64, "rope_scaling": rope, "rope_theta": 10000.0},
        vision_config={"depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                       "out_hidden_size": BASE["hidden_size"], "deepstack_visual_indexes": [0, 1], "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64, **vision},
        initializer_range=0.05, **TOKENS)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases and norms; a position table with signal
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or "pos_embed" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.model.visual.patch_embed.proj.weight.mul_(patch_scale)
        model.lm_head.weight.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(path)
    return path, model.float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_vl_visual")
    ckpt, model = make_qwen3_vl(root / "ckpt", **SENSITIVE)
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0
    return ckpt, model, root / "out"


def spec_of(ckpt):
    return q3.parse(json.loads((ckpt / "config.json").read_text()), BASE["hidden_size"], None)


def run_visual(out, patches, grids, spec):
    be = CpuBackend(out / "visual")
    try:
        return be.run({q3.INPUT: patches, **q3.preprocess(grids, spec)})
    finally:
        be.close()


def graph_and_hf(exported, grids):
    """[(graph rows, HF rows)] for the output and each deepstack feature, on seeded patches for `grids`."""
    import torch

    ckpt, model, out = exported
    spec = spec_of(ckpt)
    t = sum(a * b * c for a, b, c in grids)
    patches = (np.random.default_rng(3).standard_normal((t, spec.patch_dim)) * 1.2).astype(np.float16)
    got = run_visual(out, patches, grids, spec)
    with torch.no_grad():
        hf = model.model.visual(torch.from_numpy(patches).float(), grid_thw=torch.tensor(grids))
    return [(got["output"].astype(np.float32), hf.pooler_output.numpy())] + [
        (got[q3.deepstack_output(k)].astype(np.float32), f.numpy()) for k, f in enumerate(hf.deepstack_features)]


GRIDS = {"golden": q3.GOLDEN_GRIDS, "two_frames": ((2, 6, 4),), "large_and_tiny": ((1, 16, 16), (1, 2, 2))}


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
def test_visual_graph_and_deepstack_match_transformers(exported, grids, record_property):
    """Grids smaller and larger than the 8x8 position table (the bilinear resampling), two frames, ragged."""
    pairs = graph_and_hf(exported, grids)
    assert len(pairs) == 3
    worst = min(float(row_cosines(a, b).min()) for a, b in pairs)
    err = max(rel_err(a, b) for a, b in pairs)
    record_property("worst_cosine_vs_hf", worst)
    record_property("rel_err_vs_hf", err)
    assert worst >= MIN_COSINE, worst
    assert err <= MAX_REL_ERR, err


def _quick_gelu(visual):
    from transformers.activations import ACT2FN

    return [(b.mlp, "act_fn", ACT2FN["quick_gelu"]) for b in visual.blocks]


def _no_position_table(visual):
    import torch

    return [(visual.pos_embed, "weight", torch.nn.Parameter(visual.pos_embed.weight * 0))]



def _modeling():
    """transformers' module whose attention bookkeeping the across-images / frames mutations patch."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    return modeling_qwen3_vl

# Bugs put into HF's tower (the reference side), each as the attributes to patch; the graph must fail the
# comparison's bounds against every one of them. (Exact GELU for the tower's tanh form is not here: the two differ
# by at most 5e-4, under the fp16 graph's own error, so no comparison of this kind can tell them apart.)
MUTATIONS = {
    "no_rope": (GRIDS["golden"], lambda v: [(v.rotary_pos_emb, "inv_freq", v.rotary_pos_emb.inv_freq * 0)]),
    "no_position_table": (GRIDS["golden"], _no_position_table),
    "across_images": (GRIDS["golden"], lambda v: one_sequence(_modeling(), False)),
    "across_frames": (GRIDS["two_frames"], lambda v: one_sequence(_modeling(), True)),
    "quick_gelu": (GRIDS["golden"], _quick_gelu),
    **{f"block_{k}_skipped": (GRIDS["golden"], lambda v, k=k: skip_block(v.blocks, k)) for k in range(3)},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_comparison_catches_a_broken_tower(exported, mutation, monkeypatch, record_property):
    """The graph against HF's tower with one deliberate bug (RoPE off, the learned position table left out,
    attention across images or frames, another activation, a block left out): the bounds of
    test_visual_graph_and_deepstack_match_transformers fail, with a margin."""
    grids, patch = MUTATIONS[mutation]
    for obj, name, value in patch(exported[1].model.visual):
        monkeypatch.setattr(obj, name, value)
    pairs = graph_and_hf(exported, grids)
    worst = min(float(row_cosines(a, b).min()) for a, b in pairs)
    err = max(rel_err(a, b) for a, b in pairs)
    record_property("worst_cosine_vs_broken_hf", worst)
    record_property("rel_err_vs_broken_hf", err)
    assert err > 2 * MAX_REL_ERR, (worst, err)


def test_layout_config_and_validation(exported):
    ckpt, _, out = exported
    assert json.loads((ckpt / "config.json").read_text())["vision_config"]["model_type"] == "qwen3_vl_vision"
    cfg = json.loads((out / "visual" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["vision_config"]["model_type"] == "qwen3_vl"
    assert cfg["text_config"]["rope_scaling"]["mrope_interleaved"] is True
    assert {k: cfg[k] for k in TOKENS} == TOKENS
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    outputs = res["components"]["visual"]["outputs"]
    assert set(outputs) == {"output", "deepstack_features_0", "deepstack_features_1"}
    assert all(o["passed"] and o["worst_cosine"] >= 0.999 for o in outputs.values())
    assert json.loads((out / "llm" / "config.json").read_text())["num_deepstack_features"] == 2


def test_image_to_logits_with_deepstack_matches_transformers(exported, record_property):
    """Encoder rows into the image tokens, each deepstack feature into its `deepstack_embeds_i` at the same rows
    (zeros elsewhere and in decode), an interleaved MRoPE table; against HF's full forward."""
    import torch

    from edgellm_core.multimodal import mrope_table, qwen_positions, scatter_features
    from edgellm_validate.twin import Twin

    ckpt, model, out = exported
    spec = spec_of(ckpt)
    grids = ((1, 8, 12),)
    patches = np.random.default_rng(9).standard_normal((96, spec.patch_dim)).astype(np.float16)
    vis = run_visual(out, patches, grids, spec)
    img, start, end = TOKENS["image_token_id"], TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
    prompt = [11, 12, start, *[img] * 24, end, 14, 15, 16]
    decode = [21, 22]
    llm = out / "llm"
    cfg = json.loads((llm / "config.json").read_text())
    table = mrope_table(qwen_positions(prompt, grids, img, spec.merge), 64, theta=cfg["rope_theta"],
                        rotary_dim=cfg["head_dim"], section=MROPE, interleaved=True)
    h = BASE["hidden_size"]
    deepstack = [scatter_features(np.zeros((1, len(prompt), h), np.float16), prompt, img,
                                  vis[q3.deepstack_output(k)]) for k in range(2)]
    be = CpuBackend(llm)
    try:
        twin = Twin(llm, be, 64)
        embeds = scatter_features(twin.embedding.lookup(np.asarray([prompt])), prompt, img, vis["output"])
        logits, state = twin.step(twin.new_state(1), [prompt], [len(prompt)], [], [[len(prompt) - 1]], deepstack,
                                  inputs_embeds=embeds, rope=table)
        got = [logits[0]]
        for k, tok in enumerate(decode):
            done = len(prompt) + k
            logits, state = twin.step(state, [[tok]], [done + 1], [done], [[0]], rope=table)
            got.append(logits[0])
        no_deepstack, _ = twin.step(twin.new_state(1), [prompt], [len(prompt)], [], [[len(prompt) - 1]],
                                    inputs_embeds=embeds, rope=table)
    finally:
        be.close()
    with torch.no_grad():
        ids = torch.tensor([prompt + decode])
        hf = model(input_ids=ids, pixel_values=torch.from_numpy(patches).float(), image_grid_thw=torch.tensor(grids),
                   mm_token_type_ids=(ids == img).int()).logits[0].numpy()
    want = [hf[len(prompt) - 1 + k] for k in range(len(decode) + 1)]
    cos = [float(row_cosines(a[None], b[None])[0]) for a, b in zip(got, want)]
    record_property("worst_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(a.argmax()) for a in got] == [int(b.argmax()) for b in want]
    # the deepstack features matter: leaving them at zero moves the prefill away from HF
    assert float(row_cosines(no_deepstack, want[0][None])[0]) < 0.999
