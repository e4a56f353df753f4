"""The Qwen3-ASR / Qwen3-Omni audio encoder as an ONNX graph (edgellm_export/audio/qwen3_asr.py), checked on its own.

References: transformers' audio encoders (Qwen3-Omni-MoE's `Qwen3OmniMoeAudioEncoder`, whose layout the hub's own
Qwen3-ASR shares, and transformers' `Qwen3ASRForConditionalGeneration` with its separate projector) on the same
mel features, against onnxruntime on the graph as written (weights in an external data file, as an export
writes them). The preprocessing twin (`mel_features`, `chunk_inputs`) is checked against transformers' feature
extractors and the encoders' own chunk / index / window bookkeeping. Tiny random towers saved in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_export import audio
from edgellm_export.audio import qwen3_asr as asr
from edgellm_export.checkpoint.reader import Checkpoint
from edgellm_export.models.weights import WeightSource

TEXT_HIDDEN = 48
# n_window 50: every released checkpoint's, and the only chunk size the runtime's 13 frames per chunk fits;
# n_window_infer 200 (two chunks per attention window) so that the golden clip spans several windows.
TINY = dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, num_mel_bins=128,
            downsample_hidden_size=16, output_dim=TEXT_HIDDEN, n_window=50, n_window_infer=200,
            initializer_range=0.05)
IDS = {"audio_token_id": 503, "audio_start_token_id": 501, "audio_end_token_id": 502}
USER_ID = 77
ROPE_THETA = 1000000.0


def _signal(model) -> None:
    """Weights that make every path count: matrices at 1/sqrt(fan_in) (activations of order one, attention
    logits of order several units, so a wrong mask or gather shows), random biases and norms."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                gain = 2.5 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.normal_(0.0, gain / p[0].numel() ** 0.5)
            elif name.endswith(".bias") or "norm" in name or "ln_post" in name:
                p.add_(torch.randn_like(p) * 0.1)


def make_thinker_layout(path: Path, root_type: str = "qwen3_omni_moe", seed: int = 0, **audio_cfg):
    """(checkpoint dir, fp32 HF encoder): a tower under `thinker.audio_tower.` (projection included) and its
    config under `thinker_config`, as Qwen3-Omni and the hub's own Qwen3-ASR ship them; only the audio part
    (these tests do not read a language model)."""
    import torch
    from safetensors.torch import save_file as save_torch
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    torch.manual_seed(seed)
    cfg = Qwen3OmniMoeAudioEncoderConfig(**{**TINY, **audio_cfg})
    tower = Qwen3OmniMoeAudioEncoder(cfg).eval()
    _signal(tower)
    tower.to(torch.bfloat16)
    path.mkdir(parents=True)
    save_torch({f"thinker.audio_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()},
               str(path / "model.safetensors"), metadata={"format": "pt"})
    thinker = {"model_type": f"{root_type}_thinker", "audio_config": cfg.to_dict(),
               "text_config": {"hidden_size": TEXT_HIDDEN, "rope_theta": ROPE_THETA}, **IDS, "user_token_id": USER_ID}
    (path / "config.json").write_text(json.dumps({"model_type": root_type, "thinker_config": thinker}))
    return path, tower.float()


def make_hf_asr(path: Path, seed: int = 0):
    """(checkpoint dir, fp32 HF model): transformers' own Qwen3-ASR (root audio_config, `model.audio_tower.`,
    `model.multi_modal_projector.`), with a tiny language model; the audio start / end and `user` ids only in
    the tokenizer files, as that layout ships them."""
    import torch
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3ASRConfig(
        audio_config={k: v for k, v in TINY.items() if k != "initializer_range"},
        text_config={"hidden_size": TEXT_HIDDEN, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24, "vocab_size": 600,
                     "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}},
        audio_token_id=IDS["audio_token_id"], initializer_range=0.05)
    model = Qwen3ASRForConditionalGeneration(cfg).eval()
    _signal(model.model.audio_tower)
    _signal(model.model.multi_modal_projector)
    model.to(torch.bfloat16).save_pretrained(path)
    decoder = {str(IDS[k]): {"content": name, "special": True} for k, name in asr._TOKEN_NAMES.items()
               if k != "audio_token_id"}
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    (path / "vocab.json").write_text(json.dumps({"user": USER_ID, "hello": 5}))
    return path, model.float()


def build(ckpt_dir: Path, out: Path, text_hidden: int = TEXT_HIDDEN):
    """Plan and write the encoder as an export would: (spec, runtime config, graph path, initializers by name,
    checkpoint tensors under PREFIXES the graph did not read)."""
    ckpt = Checkpoint(ckpt_dir)
    try:
        module = audio.FAMILIES[ckpt.config["model_type"]]
        spec = module.parse(ckpt.config, text_hidden, ckpt.config_path)
        module.prepare(ckpt, spec)
        runtime = module.runtime_config(ckpt.config, spec, ckpt.path)
        g = GraphBuilder("edgellm_audio")
        w = WeightSource(ckpt, g)
        module.emit_graph(g, w, spec)
        stray = sorted(n for n in ckpt.names() if n.startswith(module.PREFIXES) and n not in w.used)
        size = g.layout_weights()
        model = g.to_model("model.onnx.data", {"": 24}, 10)
        out.mkdir(parents=True)
        tensors = {}
        with open(out / "model.onnx.data", "wb") as fh:
            fh.truncate(size)
            for wt in g.weights:
                t = wt.produce()
                tensors[wt.name] = t
                fh.seek(wt.offset)
                fh.write(t.contiguous().numpy().tobytes())
        (out / "model.onnx").write_bytes(model.SerializeToString())
        (out / "config.json").write_text(json.dumps(runtime, indent=2))
    finally:
        ckpt.close()
    return spec, runtime, out / "model.onnx", tensors, stray


def run_ort(model_path: Path, inputs: dict) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0].astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def overall_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(cosines(a.reshape(1, -1), b.reshape(1, -1))[0])


def hf_reference(layout: str, model, mel: np.ndarray) -> np.ndarray:
    """HF's encoder (and projector) on mel `[mel_bins, frames]`, as each class takes it."""
    import torch

    frames = mel.shape[1]
    with torch.no_grad():
        if layout == "qwen3_asr_hf":  # padded to whole chunks, with a mask of the real frames
            chunk = 2 * TINY["n_window"]
            width = -(-frames // chunk) * chunk
            feats = torch.zeros(1, mel.shape[0], width)
            feats[0, :, :frames] = torch.from_numpy(mel)
            mask = torch.zeros(1, width, dtype=torch.long)
            mask[0, :frames] = 1
            out = model.model.get_audio_features(input_features=feats, input_features_mask=mask).pooler_output
        else:  # concatenated features and their lengths
            out = model(input_features=torch.from_numpy(mel), feature_lens=torch.tensor([frames])).last_hidden_state
    return out.float().numpy()


LAYOUTS = ("qwen3_omni_moe", "qwen3_asr_thinker", "qwen3_asr_hf")


@pytest.fixture(scope="module", params=LAYOUTS)
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen3_asr_hf":
        ckpt, model = make_hf_asr(root / "ckpt")
    else:
        ckpt, model = make_thinker_layout(root / "ckpt", root_type=request.param.split("_thinker")[0])
    return (request.param, ckpt, model, *build(ckpt, root / "audio"))


def test_mel_features_match_transformers():
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen3_asr.feature_extraction_qwen3_asr import Qwen3ASRFeatureExtractor

    spec = asr.parse({"model_type": "qwen3_asr", "audio_config": TINY}, TEXT_HIDDEN, "config.json")
    wave = asr.golden_wave(spec)
    mine = asr.mel_features(wave, 128)
    assert mine.shape == (128, len(wave) // 160) == (128, asr.golden_frames(spec))
    # 0.7.1's preprocess_audio.py: WhisperFeatureExtractor with these settings, no padding
    whisper = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)
    np.testing.assert_allclose(asr.mel_filters(128), whisper.mel_filters, rtol=0, atol=1e-12)
    ref = whisper(wave, sampling_rate=16000, return_tensors="np", padding=False, truncation=False)["input_features"][0]
    assert ref.shape == mine.shape
    assert np.abs(ref - mine).max() < 1e-4
    # transformers' Qwen3-ASR extractor (pads the mel axis to whole chunks; the real frames agree)
    q = Qwen3ASRFeatureExtractor()(wave, sampling_rate=16000, return_tensors="np", padding=False)["input_features"][0]
    assert q.shape[1] % 100 == 0 and np.abs(q[:, :mine.shape[1]] - mine).max() < 1e-4


@pytest.mark.parametrize("frames, infer", [(330, 200), (100, 200), (57, 200), (930, 800), (1201, 400)])
def test_chunk_inputs_match_the_encoders_bookkeeping(frames, infer):
    """Chunks, valid-frame indices and attention windows as transformers' Qwen3-Omni encoder derives them."""
    import torch
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

    spec = asr.parse({"model_type": "qwen3_omni_moe", "audio_config": {**TINY, "n_window_infer": infer}},
                     TEXT_HIDDEN, "config.json")
    mel = np.random.default_rng(frames).standard_normal((128, frames)).astype(np.float32)
    got = asr.chunk_inputs(mel, spec)
    lens = torch.tensor([frames])
    padded, chunk_lengths = hf.chunk_and_pad_features(torch.from_numpy(mel.astype(np.float16)), lens, 50)
    assert got["padded_feature"].shape == (len(chunk_lengths), 128, 100) and got["padded_feature"].dtype == np.float16
    np.testing.assert_array_equal(got["padded_feature"][:, :, :padded.shape[2]], padded.numpy())
    assert not got["padded_feature"][:, :, padded.shape[2]:].any()
    after = hf._get_feat_extract_output_lengths(chunk_lengths, 50)
    flat = hf.get_valid_indices(chunk_lengths, 50).numpy()
    width = int(after.max())
    np.testing.assert_array_equal(got["padded_mask_after_cnn_indices"], np.stack([flat // width, flat % width], 1))
    cu = hf.get_audio_cu_seqlens(chunk_lengths, lens, infer, 50).numpy()
    mask = got["attention_mask"]
    assert mask.dtype == np.float16 and mask.shape == (cu[-1], cu[-1])
    want = np.full(mask.shape, -65504.0, np.float16)
    for a, b in zip(cu[:-1], cu[1:]):
        want[a:b, a:b] = 0
    np.testing.assert_array_equal(mask, want)


def test_graph_matches_transformers_and_the_eager_face(built, record_property):
    import onnx

    layout, _, model, spec, _, graph_path, tensors, stray = built
    assert stray == []  # every tensor of the encoder is read
    inputs = asr.golden_inputs(spec)
    # the golden clip: 3.3 s -> chunks of 100, 100, 100, 30 mel frames -> 13 + 13 + 13 + 4 tokens; windows of 26
    assert inputs["padded_feature"].shape == (4, 128, 100)
    assert inputs["padded_mask_after_cnn_indices"].shape == (43, 2)
    got = run_ort(graph_path, inputs)
    assert got.shape == (43, TEXT_HIDDEN) and np.isfinite(got).all()
    mel = asr.mel_features(asr.golden_wave(spec), 128).astype(np.float16).astype(np.float32)  # as the runtime gets it
    want = hf_reference(layout, model, mel)
    assert want.shape == got.shape
    rows = cosines(got, want)
    record_property("worst_row_cosine_vs_hf", float(rows.min()))
    assert rows.mean() >= 0.999 and rows.min() >= 0.999 and overall_cosine(got, want) >= 0.999, rows.min()
    # the comparison discriminates: attention over the whole clip instead of the runtime's windows fails it
    whole = {**inputs, "attention_mask": np.zeros_like(inputs["attention_mask"])}
    assert cosines(run_ort(graph_path, whole), want).min() < 0.999
    import torch

    with torch.no_grad():
        twin = asr.eager(inputs, tensors, spec).numpy()
    assert twin.dtype == np.float32 and np.array_equal(twin, twin.astype(np.float16).astype(np.float32))
    assert cosines(twin, got).min() >= 0.9999 and overall_cosine(twin, got) >= 0.9999
    # the validation side's onnxruntime backend (fp16 arithmetic widened) runs it too
    from edgellm_validate.cpu_backend import CpuBackend

    be = CpuBackend(graph_path.parent)
    try:
        widened = be.run(inputs)["last_hidden_state"].astype(np.float32)
    finally:
        be.close()
    assert cosines(twin, widened).min() >= 0.9999
    # another clip (1.57 s, one window, a short tail chunk) through the same graph
    wave = np.random.default_rng(3).standard_normal(25_170).astype(np.float32) * 0.1
    mel2 = asr.mel_features(wave, 128)
    other = asr.chunk_inputs(mel2, spec)
    assert other["padded_mask_after_cnn_indices"].shape == (13 + 8, 2)
    rows2 = cosines(run_ort(graph_path, other), hf_reference(layout, model, mel2.astype(np.float16).astype(np.float32)))
    assert rows2.min() >= 0.999, rows2.min()
    # the graph's interface
    m = onnx.load(str(graph_path))
    onnx.checker.check_model(m, full_check=True)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input] == [
        ("padded_feature", onnx.TensorProto.FLOAT16, ["num_chunks", 128, 100]),
        ("padded_mask_after_cnn_indices", onnx.TensorProto.INT64, ["num_attention_elems", 2]),
        ("attention_mask", onnx.TensorProto.FLOAT16, ["num_attention_elems", "num_attention_elems"])]
    assert [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in m.graph.output] == [
        ("last_hidden_state", onnx.TensorProto.FLOAT16, ["num_attention_elems", TEXT_HIDDEN])]
    ops = {n.op_type for n in m.graph.node}
    assert not [n for n in m.graph.node if n.domain] and "NonZero" not in ops and {"Conv", "GatherND"} <= ops


def test_golden_clip_of_a_released_encoder():
    """Qwen3-Omni's / Qwen3-ASR's settings (n_window 50, n_window_infer 800): the golden clip spans a whole
    attention window of 104 tokens and 17 more, the last chunk partial."""
    released = {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                "num_mel_bins": 128, "downsample_hidden_size": 480, "output_dim": 2048, "n_window": 50,
                "n_window_infer": 800, "max_source_positions": 1500}
    spec = asr.parse({"model_type": "qwen3_omni_moe", "thinker_config": {"audio_config": released}}, 2048, "c")
    assert (spec.freq, spec.frames_per_chunk, spec.chunks_per_window) == (16, 13, 8)
    inputs = asr.golden_inputs(spec)
    assert inputs["padded_feature"].shape == (10, 128, 100)
    assert inputs["padded_mask_after_cnn_indices"].shape == (121, 2)
    assert asr.window_lengths([13] * 9 + [4], spec) == [104, 17]
    mask = inputs["attention_mask"]
    assert (mask[:104, :104] == 0).all() and (mask[104:, 104:] == 0).all() and (mask[:104, 104:] == -65504).all()


def test_runtime_config(built):
    layout, _, _, spec, runtime, *_ = built
    assert runtime["model_type"] == ("qwen3_omni_audio_encoder" if layout == "qwen3_omni_moe" else "qwen3_asr_thinker")
    a = runtime["audio_config"]  # what AudioBuilder / Qwen3OmniAudioRunner read, explicit
    assert (a["num_mel_bins"], a["n_window"], a["n_window_infer"], a["output_dim"]) == (128, 50, 200, TEXT_HIDDEN)
    assert {k: runtime[k] for k in IDS} == IDS and runtime["user_token_id"] == USER_ID
    assert runtime["text_config"] == {"rope_theta": ROPE_THETA}
    assert spec.tower == "audio_tower."  # canonical: the reader strips `thinker.` and `model.`
    assert spec.proj1 == ("multi_modal_projector.linear_1" if layout == "qwen3_asr_hf" else "audio_tower.proj1")


def test_a_missing_tower_tensor_is_named(tmp_path):
    ckpt, _ = make_thinker_layout(tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["thinker.audio_tower.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"audio_tower\.layers\.1\.self_attn\.k_proj\.bias.*missing"):
        build(ckpt, tmp_path / "audio")


def test_a_stray_tower_tensor_is_reported(tmp_path):
    ckpt, _ = make_thinker_layout(tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["thinker.audio_tower.layers.0.self_attn.q_norm.weight"] = np.ones(64, np.float32)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    assert build(ckpt, tmp_path / "audio")[-1] == ["audio_tower.layers.0.self_attn.q_norm.weight"]


@pytest.mark.parametrize("change, error, words", [
    ({"activation_function": "relu"}, UnsupportedError, "activation_function 'relu' (supported: gelu)"),
    ({"n_window": 8}, UnsupportedError, "n_window 8: a chunk of 16 mel frames gives 2 frames"),
    ({"n_window_infer": 250}, UnsupportedError, "n_window_infer 250 is not a multiple"),
    ({"encoder_attention_heads": 3}, UnsupportedError, "d_model 64 does not split into 3 heads"),
    ({"output_dim": 32}, ExportError, "output_dim is 32, but the language model's hidden size is 48"),
    ({"n_window_infer": None}, ExportError, "thinker_config.audio_config lacks 'n_window_infer'"),
])
def test_encoders_the_runtime_cannot_take_are_refused(change, error, words):
    audio_cfg = {**TINY, "activation_function": "gelu"}
    audio_cfg.update(change)
    raw = {"model_type": "qwen3_omni_moe", "thinker_config": {"audio_config": audio_cfg}}
    with pytest.raises(error) as e:
        asr.parse(raw, TEXT_HIDDEN, "ckpt/config.json")
    assert words in str(e.value) and "ckpt/config.json" in str(e.value)
    if error is ExportError:
        assert not isinstance(e.value, UnsupportedError)


def test_missing_token_ids_are_refused(tmp_path):
    raw = {"model_type": "qwen3_asr", "audio_config": TINY, "audio_token_id": 7}
    spec = asr.parse(raw, TEXT_HIDDEN, tmp_path / "config.json")
    with pytest.raises(ExportError, match="no audio_start_token_id in config.json"):
        asr.runtime_config(raw, spec, tmp_path)
