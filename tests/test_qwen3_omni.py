"""Qwen3-Omni's thinker exported with its vision and audio encoders: `edgellm export CKPT OUT --components
llm,visual,audio` (the talker and code2wav, speech output, are not exported by this version).

- the language model (`thinker_config.text_config`, `qwen3_omni_moe_text`) is the Qwen3-MoE decoder with
  interleaved MRoPE and deepstack inputs; its text-only logits are checked through the CPU twin against
  transformers' Qwen3OmniMoeThinkerForConditionalGeneration (routing near ties set aside, as tests/test_qwen3_moe.py);
- the vision tower is Qwen3-VL's (OUT/visual/, `qwen3_omni_vision_encoder`), its mergers renamed from the
  release's `ln_q` / `mlp.0` / `mlp.2` / `merger_list.k`; the graph against HF's tower on the golden grids;
- the golden bundle's image scenario (MRoPE positions as HF's get_rope_index gives them for an image prompt, the
  deepstack features) and audio scenario (plain sequential positions: an audio clip's tokens count up by one on
  all three axes) against HF's full thinker forward on the same prompt and image / clip, and `edgellm validate`.

Tiny random model made by transformers (Qwen3OmniMoeForConditionalGeneration without its talker, so the saved
config still announces talker_config / code2wav_config as the hub's does) and saved in bf16.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.moe_reference import check_twin_against_hf, hf_logits_with_router_margins, softmax_margin
from fixtures.tower_checks import row_cosines
from safetensors.numpy import load_file
from test_qwen3_asr_audio import TINY, _signal

from edgellm_export.audio import qwen3_asr as asr
from edgellm_export.cli import main
from edgellm_export.visual import qwen3_vl as q3
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.validate import validate_export

HIDDEN = 256
MROPE = [8, 12, 12]  # 32 rotary pairs of head_dim 64
TOKENS = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503,
          "audio_token_id": 504, "audio_start_token_id": 505, "audio_end_token_id": 506}
USER_ID = 77
TEXT = dict(hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=600, max_position_embeddings=256, rms_norm_eps=1e-5,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, mlp_only_layers=[1],
            decoder_sparse_step=1, norm_topk_prob=True, initializer_range=0.05,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE,
                             "mrope_interleaved": True, "interleaved": True})
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=HIDDEN,
              deepstack_visual_indexes=[0, 1], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
              num_position_embeddings=64, initializer_range=0.05)
NEAR_TIE = 1e-2
COMPONENTS = ["--components", "llm,visual,audio"]


def make_omni(path, seed: int = 0):
    """(checkpoint dir, fp32 HF thinker)."""
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    audio = {**{k: v for k, v in TINY.items()}, "output_dim": HIDDEN}
    cfg = Qwen3OmniMoeConfig(thinker_config={"text_config": TEXT, "vision_config": VISION, "audio_config": audio,
                                             "user_token_id": USER_ID, "initializer_range": 0.05, **TOKENS},
                             enable_audio_output=False)
    model = Qwen3OmniMoeForConditionalGeneration(cfg).eval()
    thinker = model.thinker
    _signal(thinker.model.audio_tower)
    with torch.no_grad():
        for name, p in thinker.named_parameters():
            if "audio_tower" in name:
                continue
            if name.endswith(".bias") or "norm" in name or "ln_q" in name or "pos_embed" in name:
                p.add_(torch.randn_like(p) * 0.1)  # every optional path carries signal
        for layer in thinker.model.language_model.layers:
            if hasattr(layer.mlp, "gate"):  # a router with some conviction: top-k far from fp16 noise
                layer.mlp.gate.weight.mul_(8.0)
        thinker.lm_head.weight.mul_(4.0)  # top-1 well clear of fp16 noise
    model.to(torch.bfloat16).save_pretrained(path)
    # the hub's one preprocessor_config.json holds the image processor's and the feature extractor's settings
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "hop_length": 160, "n_fft": 400}))
    return path, thinker.float()


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_omni")
    ckpt, thinker = make_omni(root / "ckpt")
    assert main(["-q", "export", str(ckpt), str(root / "out"), *COMPONENTS]) == 0
    return ckpt, thinker, root / "out"


def scenario(out, name):
    meta = json.loads((out / "llm" / "golden" / "bundle.json").read_text())
    (sc,) = [s for s in meta["scenarios"] if s["name"] == name]
    expected = load_file(str(out / "llm" / "golden" / "logits.safetensors"))
    return sc, [expected[st["logits"]][0] for st in sc["steps"]]


def whole_sequence(sc):
    import torch

    prompt = sc["steps"][0]["token_ids"][0]
    return prompt, torch.tensor([prompt + [st["token_ids"][0][0] for st in sc["steps"][1:]]])


def compare(got, logits, prompt_len, record_property, key):
    want = [logits[prompt_len - 1 + k] for k in range(len(got))]
    cos = [float(row_cosines(g[None], w[None])[0]) for g, w in zip(got, want)]
    record_property(key, min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(g.argmax()) for g in got] == [int(w.argmax()) for w in want]


def test_text_model_matches_transformers(omni, tmp_path):
    """The thinker's decoder alone (`--components llm`): the MoE graph with interleaved MRoPE, through the CPU twin,
    against HF's thinker on the text scenarios (text-only positions are (t, t, t): plain RoPE)."""
    import onnx

    ckpt, thinker, _ = omni
    out = tmp_path / "out"
    assert main(["-q", "export", str(ckpt), str(out), "--components", "llm"]) == 0
    llm = out / "llm"
    routers = [layer.mlp.gate for layer in thinker.model.language_model.layers if hasattr(layer.mlp, "gate")]
    assert len(routers) == 2  # layer 1 is in mlp_only_layers
    ref, margins = hf_logits_with_router_margins(thinker, llm, routers, softmax_margin(TEXT["num_experts_per_tok"]))
    stats = check_twin_against_hf(llm, ref, margins, near_tie=NEAR_TIE, min_cosine=0.999)
    assert stats["rows"] >= 15 and stats["top1"] == stats["rows"]
    assert stats["phases"] == {"prefill", "chunked_prefill", "decode"}
    cfg = json.loads((llm / "config.json").read_text())
    assert cfg["model"] == "qwen3_omni_moe_text" and cfg["model_type"] == "llm"
    assert cfg["rope_scaling"]["mrope_section"] == MROPE and cfg["rope_scaling"]["mrope_interleaved"] is True
    assert cfg["num_deepstack_features"] == 2 and cfg["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    assert {k: cfg[k] for k in TOKENS} == TOKENS and cfg["user_token_id"] == USER_ID
    graph = onnx.load(str(llm / "model.onnx"), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[names.index("last_token_ids") + 1:] == ["deepstack_embeds_0", "deepstack_embeds_1"]
    assert [n.op_type for n in graph.node].count("TopK") == 2
    assert validate_export(out, result_path=tmp_path / "v.json")["passed"]
    assert not (out / "visual").exists() and not (out / "audio").exists()


def test_omni_rope_is_interleaved_mrope_whatever_the_flags(omni):
    """transformers' thinker rotates with interleaved MRoPE unconditionally (mrope_section [24, 20, 20] when the
    config names none): the runtime config says so even when the checkpoint's rope omits the flags."""
    from pathlib import Path

    from edgellm_export.config import build_model_config

    ckpt, _, _ = omni
    raw = json.loads((ckpt / "config.json").read_text())
    text = raw["thinker_config"]["text_config"]
    for rope, section in (({"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE}, MROPE),
                          ({"rope_type": "default", "rope_theta": 10000.0}, [24, 20, 20])):
        bare = {**raw, "thinker_config": {**raw["thinker_config"], "text_config": {
            **text, "head_dim": 2 * sum(section), "rope_parameters": rope}}}
        cfg = build_model_config(bare, lambda s: False, Path("config.json"))
        assert cfg.rope.params["mrope_interleaved"] is True and cfg.rope.params["mrope_section"] == section
        assert cfg.moe is not None and [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]


def test_layout_and_configs(omni):
    ckpt, _, out = omni
    files = set(json.loads((out / "manifest.json").read_text())["files"])
    assert {"llm/model.onnx", "visual/model.onnx", "visual/config.json", "visual/preprocessor_config.json",
            "audio/model.onnx", "audio/config.json", "audio/preprocessor_config.json"} <= files
    vis = json.loads((out / "visual" / "config.json").read_text())
    assert vis["model_type"] == vis["vision_config"]["model_type"] == "qwen3_omni_vision_encoder"
    assert {k: vis[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")} \
        == {k: TOKENS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    assert vis["text_config"]["rope_scaling"]["mrope_interleaved"] is True
    assert vis["text_config"]["rope_scaling"]["mrope_section"] == MROPE
    aud = json.loads((out / "audio" / "config.json").read_text())
    assert aud["model_type"] == "qwen3_omni_audio_encoder" and aud["audio_token_id"] == TOKENS["audio_token_id"]
    assert aud["user_token_id"] == USER_ID
    from edgellm_validate.trt import visual_profiles

    prof = visual_profiles.visual_profile(vis, {"input": ["num_patches", 1536], "rotary_pos_emb": ["num_patches", 16]})
    assert prof["fast_pos_embed_idx"].max == (4, 4096)


@pytest.mark.parametrize("grids", [q3.GOLDEN_GRIDS, ((2, 6, 4), (1, 16, 16))])
def test_vision_tower_matches_transformers(omni, grids, record_property):
    """The exported tower (output and both deepstack features) against HF's Qwen3OmniMoeVisionEncoder."""
    import torch

    ckpt, thinker, out = omni
    spec = q3.parse(json.loads((ckpt / "config.json").read_text()), HIDDEN, None)
    assert spec.deepstack == (0, 1)
    t = sum(a * b * c for a, b, c in grids)
    patches = (np.random.default_rng(3).standard_normal((t, spec.patch_dim)) * 1.2).astype(np.float16)
    be = CpuBackend(out / "visual")
    try:
        got = be.run({q3.INPUT: patches, **q3.preprocess(grids, spec)})
    finally:
        be.close()
    with torch.no_grad():
        hf = thinker.model.visual(torch.from_numpy(patches).float(), grid_thw=torch.tensor(grids))
    pairs = [(got["output"], hf.pooler_output)] + [(got[q3.deepstack_output(k)], f)
                                                   for k, f in enumerate(hf.deepstack_features)]
    assert len(pairs) == 3
    worst = min(float(row_cosines(a.astype(np.float32), b.numpy()).min()) for a, b in pairs)
    record_property("vision_worst_cosine_vs_hf", worst)
    assert worst >= 0.999


def test_image_scenario_matches_transformers(omni, record_property):
    """Two images in one prompt: the bundle's MRoPE positions are HF's get_rope_index's, and its expected logits
    (deepstack features included) agree with HF's full thinker forward on the golden patches."""
    import torch

    _, thinker, out = omni
    sc, got = scenario(out, "image_prefill_decode")
    assert sc["image"]["deepstack"] == ["deepstack_features_0", "deepstack_features_1"]
    prompt, ids = whole_sequence(sc)
    mask = torch.ones_like(ids)  # HF computes MRoPE positions only with an attention mask
    grids = torch.tensor(q3.GOLDEN_GRIDS)
    positions, _ = thinker.model.get_rope_index(ids, grids, None, mask)
    assert np.array_equal(np.asarray(sc["image"]["positions"]), positions[:, 0, :len(prompt)].long().numpy())
    patches = load_file(str(out / "visual" / "golden" / "tensors.safetensors"))["input"]
    with torch.no_grad():
        logits = thinker(input_ids=ids, attention_mask=mask, pixel_values=torch.from_numpy(patches).float(),
                         image_grid_thw=grids).logits[0].numpy()
    compare(got, logits, len(prompt), record_property, "golden_image_cosine_vs_hf")


def test_audio_scenario_matches_transformers(omni, record_property):
    """The golden clip's mel features through HF's thinker (audio tower, scatter, sequential positions) against the
    bundle's audio scenario."""
    import torch

    _, thinker, out = omni
    sc, got = scenario(out, "audio_prefill_decode")
    prompt, ids = whole_sequence(sc)
    assert prompt.count(TOKENS["audio_token_id"]) == sc["audio"]["rows"][1]
    assert sc["audio"]["positions"] is None  # plain positions: (t, t, t) on every axis
    mask = torch.ones_like(ids)
    positions, _ = thinker.model.get_rope_index(ids, None, None, mask)
    assert np.array_equal(positions[:, 0].long().numpy(), np.tile(np.arange(ids.shape[1]), (3, 1)))
    cfg = json.loads((out / "audio" / "config.json").read_text())
    spec = asr.parse({"model_type": "qwen3_omni_moe", "audio_config": cfg["audio_config"]}, HIDDEN, out)
    mel = asr.mel_features(asr.golden_wave(spec), spec.mel_bins).astype(np.float16).astype(np.float32)
    feats = torch.from_numpy(mel)[None]
    with torch.no_grad():
        logits = thinker(input_ids=ids, attention_mask=mask, input_features=feats,
                         feature_attention_mask=torch.ones((1, mel.shape[1]), dtype=torch.long)).logits[0].numpy()
    compare(got, logits, len(prompt), record_property, "golden_audio_cosine_vs_hf")


def test_export_validates(omni):
    _, _, out = omni
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    outputs = res["components"]["visual"]["outputs"]
    assert set(outputs) == {"output", "deepstack_features_0", "deepstack_features_1"}
    assert all(o["worst_cosine"] >= 0.999 for o in outputs.values())
    assert res["components"]["audio"]["outputs"]["last_hidden_state"]["worst_cosine"] >= 0.999
    by = {}
    for s in res["steps"]:
        by.setdefault(s["scenario"], []).append(s["min_cosine"])
    assert {"image_prefill_decode", "audio_prefill_decode"} <= set(by)
    assert min(min(v) for v in by.values()) >= 0.999


def test_speech_output_is_refused_unless_left_out(omni, tmp_path, capsys):
    """The checkpoint's config announces a talker and code2wav (speech output, not exported by this version):
    exit 2 naming them and the --components that exports the rest."""
    ckpt, _, _ = omni
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "a talker (speech output) (talker_config), a code2wav vocoder (code2wav_config)" in err, err
    assert "--components llm,visual,audio" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
