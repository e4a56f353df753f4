"""The language model of Qwen2.5-VL, exported on its own (`--components llm`): a Qwen2 decoder whose config
sits under the wrapper's `text_config` (or at the root, as the hub's Qwen2.5-VL releases ship it), with MRoPE
signalled the way the 0.7.1 runtime understands it and the multimodal token ids in its config.json.

Reference: transformers' Qwen2_5_VLForConditionalGeneration on text-only prompts (its MRoPE positions are
then (t, t, t), which is ordinary RoPE: what the runtime's per-sequence table holds until the multimodal
runner writes image rows). The vision tower is not exported yet (issue 11); the checkpoint carries one.

Qwen3-VL's language model also takes `deepstack_embeds_i`: the tower's deepstack features, added to the
hidden states after decoder layer i at the image positions (zeros elsewhere, and in decode). Those are checked
against the HF text model's own deepstack path (`visual_pos_masks`, `deepstack_visual_embeds`).
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


def _give_the_text_model_signal(model, tower: str) -> None:
    """Random biases and norm weights (every optional path carries signal) and a sharper lm_head (top-1 well
    clear of fp16 noise) for the language model; the tower (`tower` in the parameter name) is left as made."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if tower not in name and "projector" not in name and (name.endswith(".bias") or "norm" in name):
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(4.0)


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
    _give_the_text_model_signal(model, tower="visual")
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


def test_bad_mrope_is_refused(vl_checkpoint, tmp_path, capsys):
    ckpt, _ = vl_checkpoint
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
    _give_the_text_model_signal(model, tower="vision_tower")
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


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    """(checkpoint dir, fp32 HF model): tiny random Qwen3-VL (3 text layers, deepstack after layers 0 and 1)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k != "initializer_range"}
    rope = {"rope_type": "default", "mrope_section": MROPE, "mrope_interleaved": True}
    cfg = Qwen3VLConfig(
        text_config={**text, "num_hidden_layers": 3, "head_dim": 64, "rope_scaling": rope, "rope_theta": 10000.0},
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                       "out_hidden_size": BASE["hidden_size"], "deepstack_visual_indexes": [0, 1], "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64},
        initializer_range=0.05, **TOKENS)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" not in name and (name.endswith(".bias") or "norm" in name):
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("qwen3_vl") / "ckpt"
    model.to(torch.bfloat16).save_pretrained(path)
    model.float()
    return path, model


def test_qwen3_vl_language_model_matches_transformers(qwen3_vl, tmp_path):
    ckpt, model = qwen3_vl
    assert_parity(twin_vs_hf(ckpt, model, tmp_path / "out", components=("llm",)))
    assert validate_export(tmp_path / "out")["passed"]
    llm = tmp_path / "out" / "llm"
    cfg = json.loads((llm / "config.json").read_text())
    assert cfg["rope_scaling"] == {"type": "default", "rope_type": "default", "mrope_interleaved": True,
                                   "mrope_section": MROPE}  # the interleaved flag kept, as families.md §1.4 says
    assert cfg["num_deepstack_features"] == 2 and cfg["model"] == "qwen3_vl_text"
    import onnx

    graph = onnx.load(str(llm / "model.onnx"), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[names.index("last_token_ids") + 1:] == ["deepstack_embeds_0", "deepstack_embeds_1"]
    shape = graph.input[names.index("deepstack_embeds_1")].type.tensor_type.shape
    dims = [d.dim_param or d.dim_value for d in shape.dim]
    assert dims == ["batch", "seq_len", BASE["hidden_size"]]


def test_deepstack_features_match_transformers(qwen3_vl, tmp_path):
    """A prompt whose positions 3..6 stand for an image: the deepstack features go in at those rows on the
    prefill (zeros elsewhere) and are zeros on the decode step, as the runtime binds them; HF's text model gets
    the same features through visual_pos_masks / deepstack_visual_embeds on the whole sequence."""
    import numpy as np
    import torch

    from edgellm_validate.compare import cosine_rows
    from edgellm_validate.cpu_backend import CpuBackend
    from edgellm_validate.twin import Twin

    ckpt, model = qwen3_vl
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out"), "--components", "llm", "--no-golden"]) == 0
    llm = tmp_path / "out" / "llm"
    rng = np.random.default_rng(3)
    prompt, nxt, image = rng.integers(0, 500, 12).tolist(), 77, slice(3, 7)
    h = BASE["hidden_size"]
    feats = [rng.standard_normal((4, h)).astype(np.float16) for _ in range(2)]  # 4 image rows per layer
    dense = [np.zeros((1, len(prompt), h), np.float16) for _ in feats]
    for d, f in zip(dense, feats):
        d[0, image] = f
    twin = Twin(llm, CpuBackend(llm), 64)
    state = twin.new_state(1)
    got_prefill, state = twin.step(state, [prompt], [len(prompt)], [], [[len(prompt) - 1]], deepstack=dense)
    got_decode, _ = twin.step(state, [[nxt]], [len(prompt) + 1], [len(prompt)], [[0]])
    plain, _ = twin.step(twin.new_state(1), [prompt], [len(prompt)], [], [[len(prompt) - 1]])

    seq = torch.tensor([prompt + [nxt]])
    mask = torch.zeros(seq.shape, dtype=torch.bool)
    mask[0, image] = True
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=seq, visual_pos_masks=mask,
                                            deepstack_visual_embeds=[torch.from_numpy(f).float() for f in feats])
        want = model.lm_head(hidden.last_hidden_state)[0].float().numpy()
    for got, row in ((got_prefill, len(prompt) - 1), (got_decode, len(prompt))):
        assert float(cosine_rows(got, want[row:row + 1]).min()) >= 0.999
        assert int(got.argmax()) == int(want[row].argmax())
    # and the features matter: without them the prefill's logits are far from HF's
    assert float(cosine_rows(plain, want[len(prompt) - 1:len(prompt)]).min()) < 0.99


def test_deepstack_count_rules_and_refusals(qwen3_vl, tmp_path, capsys):
    """num_deepstack_features from the text config, else the root, else the tower's deepstack_visual_indexes,
    else 3 for a qwen3_vl model (families.md §1.3); more than the layers, or with --attention native: exit 2."""
    from edgellm_export.config import build_model_config

    ckpt, _ = qwen3_vl
    raw = json.loads((ckpt / "config.json").read_text())
    count = lambda r: build_model_config(r, lambda s: False, Path("config.json")).num_deepstack_features  # noqa: E731
    assert count(raw) == 2
    assert count({**raw, "num_deepstack_features": 1}) == 1
    assert count({**raw, "text_config": {**raw["text_config"], "num_deepstack_features": 0},
                  "num_deepstack_features": 1}) == 0
    assert count({**raw, "vision_config": {k: v for k, v in raw["vision_config"].items()
                                           if k != "deepstack_visual_indexes"}}) == 3
    bad = _copy(ckpt, tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps({**raw, "num_deepstack_features": 4}))
    assert main(["-q", "export", str(bad), str(tmp_path / "o1"), "--components", "llm"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "4 deepstack features for a language model of 3 layers" in err
    assert main(["-q", "export", str(ckpt), str(tmp_path / "o2"), "--components", "llm", "--attention", "native"]) == 2
    assert "deepstack" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_qwen3_vl_export_builds_and_validates_on_the_trt_backend(qwen3_vl, tmp_path, monkeypatch):
    """The TensorRT path with deepstack inputs: both profiles cover them (inputs_embeds' ranges, as
    setupDeepstackProfiles sets them), the runner binds the zeros the runtime binds for text, the golden
    bundle passes. TensorRT here is the stand-in (tests/fake_tensorrt.py: it runs the graph with onnxruntime
    and enforces the profiles)."""
    import _ctypes

    import fake_tensorrt as fake_trt

    from edgellm_validate.trt import plugin as plugin_mod

    ckpt, _ = qwen3_vl
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out"), "--components", "llm"]) == 0
    monkeypatch.setattr(plugin_mod, "_loaded", {})
    device = fake_trt.FakeDevice(sm=110, name="Fake Thor")
    fake_trt.reset(device)
    try:
        opts = {"trt": fake_trt, "device": device, "engine_dir": tmp_path / "engine",
                "plugin_path": str(Path(_ctypes.__file__).resolve())}
        res = validate_export(tmp_path / "out", backend="trt", result_path=tmp_path / "v.json", backend_options=opts)
        assert res["passed"], res["failures"]
        built = [c for c in fake_trt.CALLS if c[0] == "build"]
        assert len(built) == 1
        cfg = json.loads((tmp_path / "engine" / "config.json").read_text())
        assert cfg["num_deepstack_features"] == 2
    finally:
        fake_trt.reset()
