"""Qwen3-ASR exported whole: `OUT/llm/` and `OUT/audio/` from one `edgellm export`, validated end to end.

The golden bundle's audio scenario (a synthetic clip's mel features through the runtime's chunking, the audio
encoder's rows scattered at the audio tokens between the start / end tokens) is checked against transformers'
Qwen3ASRForConditionalGeneration forward on the same features; `edgellm validate` replays it from the exported
encoder's own output. Tiny random model saved in bf16, transformers' layout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.tower_checks import row_cosines
from safetensors.numpy import load_file
from test_qwen3_asr_audio import IDS, TINY, USER_ID, _signal

from edgellm_export.audio import qwen3_asr as asr
from edgellm_export.cli import main
from edgellm_validate.trt import audio_profiles
from edgellm_validate.validate import validate_export

HIDDEN = 128


def make_asr(path, seed: int = 0):
    import torch
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3ASRConfig(
        audio_config={**{k: v for k, v in TINY.items() if k != "initializer_range"}, "output_dim": HIDDEN},
        text_config={"hidden_size": HIDDEN, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 600,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
        audio_token_id=IDS["audio_token_id"], initializer_range=0.05)
    model = Qwen3ASRForConditionalGeneration(cfg).eval()
    _signal(model.model.audio_tower)
    _signal(model.model.multi_modal_projector)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(path)
    decoder = {str(IDS[k]): {"content": name, "special": True} for k, name in asr._TOKEN_NAMES.items()}
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    (path / "vocab.json").write_text(json.dumps({"user": USER_ID, "hello": 5}))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "hop_length": 160, "n_fft": 400}))
    return path, model.float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_asr_export")
    ckpt, model = make_asr(root / "ckpt")
    assert main(["-q", "export", str(ckpt), str(root / "out")]) == 0  # llm and audio, by default
    return ckpt, model, root / "out"


def test_layout_and_configs(exported):
    _, _, out = exported
    files = set(json.loads((out / "manifest.json").read_text())["files"])
    assert {"llm/model.onnx", "audio/model.onnx", "audio/model.onnx.data", "audio/config.json",
            "audio/preprocessor_config.json", "audio/golden/tensors.safetensors"} <= files
    cfg = json.loads((out / "audio" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_asr_thinker" and cfg["audio_config"]["n_window"] == 50
    assert cfg["audio_token_id"] == IDS["audio_token_id"] and cfg["audio_start_token_id"] == IDS["audio_start_token_id"]
    llm = json.loads((out / "llm" / "config.json").read_text())
    assert llm["audio_token_id"] == IDS["audio_token_id"] and llm["user_token_id"] == USER_ID
    assert llm["model"] == "qwen3asrthinker"
    # audio_build's profile covers the golden clip
    dims = {"padded_feature": [None, 128, 100]}
    golden = load_file(str(out / "audio" / "golden" / "tensors.safetensors"))
    prof = audio_profiles.audio_profile(cfg, dims)
    assert prof["padded_feature"].min[0] <= golden["padded_feature"].shape[0] <= prof["padded_feature"].max[0]
    t = golden["padded_mask_after_cnn_indices"].shape[0]
    assert prof["attention_mask"].min[0] <= t <= prof["attention_mask"].max[0]
    assert prof["padded_feature"] == ((1, 128, 100), (30, 128, 100), (60, 128, 100))
    assert prof["attention_mask"].opt == (390, 390)


def test_audio_scenario_matches_transformers_and_validates(exported, record_property):
    import torch

    _, model, out = exported
    meta = json.loads((out / "llm" / "golden" / "bundle.json").read_text())
    (sc,) = [s for s in meta["scenarios"] if s["name"] == "audio_prefill_decode"]
    expected = load_file(str(out / "llm" / "golden" / "logits.safetensors"))
    prompt = sc["steps"][0]["token_ids"][0]
    spec_t = len(load_file(str(out / "audio" / "golden" / "tensors.safetensors"))["padded_mask_after_cnn_indices"])
    assert prompt.count(IDS["audio_token_id"]) == spec_t == sc["audio"]["rows"][1]
    start = prompt.index(IDS["audio_start_token_id"])
    assert prompt[start + 1 + spec_t] == IDS["audio_end_token_id"]
    ckpt_cfg = json.loads((out / "audio" / "config.json").read_text())
    spec = asr.parse({"model_type": "qwen3_asr", "audio_config": ckpt_cfg["audio_config"]}, HIDDEN, out)
    mel = asr.mel_features(asr.golden_wave(spec), spec.mel_bins)
    ids = torch.tensor([prompt + [st["token_ids"][0][0] for st in sc["steps"][1:]]])
    frames = mel.shape[1]  # the processor pads to whole chunks and masks the padding
    padded = np.zeros((spec.mel_bins, -(-frames // spec.chunk) * spec.chunk), np.float32)
    padded[:, :frames] = mel.astype(np.float16)
    mask = torch.zeros((1, padded.shape[1]), dtype=torch.long)
    mask[0, :frames] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, input_features=torch.from_numpy(padded)[None],
                       input_features_mask=mask).logits[0].numpy()
    want = [logits[len(prompt) - 1 + k] for k in range(len(sc["steps"]))]
    got = [expected[st["logits"]][0] for st in sc["steps"]]
    cos = [float(row_cosines(g[None], w[None])[0]) for g, w in zip(got, want)]
    record_property("golden_audio_cosine_vs_hf", min(cos))
    assert min(cos) >= 0.999, cos
    assert [int(g.argmax()) for g in got] == [int(w.argmax()) for w in want]
    res = validate_export(out, result_path=out.parent / "v.json")
    assert res["passed"], res["failures"]
    assert res["components"]["audio"]["outputs"]["last_hidden_state"]["worst_cosine"] >= 0.999
    steps = [s for s in res["steps"] if s["scenario"] == "audio_prefill_decode"]
    assert len(steps) == len(sc["steps"]) and min(s["min_cosine"] for s in steps) >= 0.999


def test_a_wrong_audio_encoder_fails_validation(exported, tmp_path):
    import shutil

    _, _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bad / "audio" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x40
    data.write_bytes(bytes(raw))
    res = validate_export(bad, result_path=tmp_path / "v.json", verify=False)
    assert not res["passed"] and any(f.startswith("audio:") for f in res["failures"])


def test_components_and_bad_preprocessor(exported, tmp_path, capsys):
    import shutil

    ckpt, _, _ = exported
    assert main(["-q", "export", str(ckpt), str(tmp_path / "llm_only"), "--components", "llm"]) == 0
    assert not (tmp_path / "llm_only" / "audio").exists()
    assert main(["-q", "export", str(ckpt), str(tmp_path / "v"), "--components", "llm,visual"]) == 2
    assert "has no visual encoder" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "preprocessor_config.json").write_text(json.dumps({"feature_size": 80, "sampling_rate": 16000}))
    assert main(["-q", "export", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "preprocessor_config.json" in err and "feature_size is 80" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_make_reports_the_audio_component(exported, tmp_path):
    """`edgellm make` (on the host, CPU target): the case lists its audio component, summary.md shows it."""
    ckpt, _, out0 = exported
    tokens = len(load_file(str(out0 / "audio" / "golden" / "tensors.safetensors"))["padded_mask_after_cnn_indices"])
    out = tmp_path / "DIR"
    assert main(["-q", "make", str(ckpt), "--target", "x86-cpu", "--out", str(out), "--no-container"]) == 0
    case = json.loads((out / "report" / "qualification.json").read_text())["cases"][0]
    audio = case["components"]["audio"]
    assert case["verdict"] == "pass" and audio["passed"] and audio["outputs"]["last_hidden_state"]["tokens"] == tokens
    summary = (out / "report" / "summary.md").read_text()
    assert "## Components" in summary and f"| {case['name']} | audio | pass | {tokens} |" in summary


def to_thinker_layout(hf, dst):
    """The same model as the hub's original Qwen3-ASR lays it out (the qwen_asr package's classes, no transformers
    class to make it with): `thinker_config` holding the audio and text configs and the token ids, tensors under
    `thinker.` with the projection inside the tower (`audio_tower.proj1` / `proj2`)."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    raw = json.loads((hf / "config.json").read_text())
    audio = {k: v for k, v in raw["audio_config"].items() if k != "model_type"}
    thinker = {"model_type": "qwen3_asr_thinker", "audio_config": audio, "text_config": raw["text_config"],
               "audio_token_id": raw["audio_token_id"]}
    config = {"model_type": "qwen3_asr", "architectures": ["Qwen3ASRForConditionalGeneration"],
              "thinker_config": thinker}
    names = (("model.language_model.", "thinker.model."), ("lm_head.", "thinker.lm_head."),
             ("model.audio_tower.", "thinker.audio_tower."),
             ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
             ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."))
    out = {}
    for key, value in load_torch(str(hf / "model.safetensors")).items():
        new = next((b + key[len(a):] for a, b in names if key.startswith(a)), None)
        assert new is not None, key
        out[new] = value
    dst.mkdir()
    save_torch(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer_config.json", "vocab.json", "preprocessor_config.json"):
        (dst / name).write_bytes((hf / name).read_bytes())
    return dst


def test_the_hubs_original_layout_exports_the_same(exported, tmp_path):
    """`thinker.model.*`, `thinker.lm_head`, `thinker.audio_tower.*` and `thinker_config`: the same graphs, bytes
    and golden logits as transformers' layout."""
    ckpt, _, out = exported
    orig = to_thinker_layout(ckpt, tmp_path / "orig")
    assert main(["-q", "export", str(orig), str(tmp_path / "out")]) == 0
    for name in ("llm/model.onnx.data", "audio/model.onnx.data", "llm/golden/logits.safetensors",
                 "audio/golden/tensors.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    cfg = json.loads((tmp_path / "out" / "audio" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_asr_thinker" and cfg["audio_start_token_id"] == IDS["audio_start_token_id"]


def test_speech_output_components_are_never_dropped_silently(exported, tmp_path, capsys):
    """A talker / code2wav (Qwen3-Omni's speech output, not exported by this version) next to an exportable
    language model and audio encoder: exit 2 naming them, unless --components leaves them out knowingly."""
    import shutil

    ckpt, _, _ = exported
    omni = tmp_path / "ckpt"
    shutil.copytree(ckpt, omni)
    raw = json.loads((omni / "config.json").read_text())
    raw.update(talker_config={"model_type": "qwen3_omni_moe_talker"}, code2wav_config={"num_quantizers": 16})
    (omni / "config.json").write_text(json.dumps(raw))
    assert main(["-q", "export", str(omni), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "a talker (speech output) (talker_config), a code2wav vocoder (code2wav_config)" in err, err
    assert "drop them without a word" in err and "--components llm,audio" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["-q", "export", str(omni), str(tmp_path / "out"), "--components", "llm,audio"]) == 0


def test_qwen3_omni_defaults_to_refusing_its_speech_output(tmp_path, capsys):
    """Qwen3-Omni's thinker, vision and audio towers are exported (tests/test_qwen3_omni.py); its talker and
    code2wav are not: a hub-shaped config (the 30B-A3B thinker's attention shape) is refused by them, before a
    tensor is read, with the --components that exports the rest."""
    from safetensors.numpy import save_file
    from transformers import Qwen3OmniMoeConfig

    ckpt = tmp_path / "omni"
    ckpt.mkdir()
    text = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128}
    (ckpt / "config.json").write_text(json.dumps(Qwen3OmniMoeConfig(thinker_config={"text_config": text}).to_dict()))
    save_file({"unused": np.zeros(1, np.float32)}, str(ckpt / "model.safetensors"))
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "a talker (speech output) (talker_config), a code2wav vocoder (code2wav_config)" in err, err
    assert "--components llm,visual,audio" in err and "config.json" in err and "not supported" not in err, err
    assert not (tmp_path / "out").exists()
