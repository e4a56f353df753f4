"""The Qwen3-ASR / Qwen3-Omni audio encoder (families.md §5.5), both faces, and the runtime's preprocessing for it.

Graph inputs (0.7.1's binding names): `padded_feature` fp16 `[num_chunks, num_mel_bins, 2 * n_window]` (the clip's
log-mel frames cut into chunks of 2 * n_window frames, the last one zero-padded), `padded_mask_after_cnn_indices`
int64 `[T, 2]` ((chunk, frame) of each post-CNN frame that came from real audio, chunk-major: the runtime's
replacement for NonZero) and `attention_mask` fp16 `[T, T]` (additive: 0 inside a window of
`n_window_infer / (2 * n_window)` chunks' frames, -65504 elsewhere). Dataflow: three stride-2 3x3 Conv2d, each
followed by GELU -> `conv_out` (Linear over channels x frequency, no bias) -> + the sinusoidal position table ->
GatherND of the valid frames -> pre-norm encoder layers (LayerNorm, q/k/v/out projections with bias, attention
as MatMul -> + mask -> Softmax in fp32 -> MatMul, GELU MLP, fp16 clamp) -> `ln_post` -> `proj1`, GELU, `proj2`
-> `last_hidden_state` fp16 `[T, output_dim]`.

Layouts: Qwen3-Omni-MoE and the hub's own Qwen3-ASR nest the config under `thinker_config` and keep the tower
(projection included) under `thinker.audio_tower.`; transformers' Qwen3-ASR (`audio_config` at the root, encoder
model_type `qwen3_asr_encoder`) keeps the tower under `model.audio_tower.` and the projection as
`model.multi_modal_projector.linear_1/2`. Both read as `audio_tower.*` once the reader strips the `thinker.` /
`model.` wrappers; only the projection's place differs.

Numerics: activations are stored in fp16 where the graph stores them; norms, softmax and GELU compute in fp32;
the eager face (`eager`) rounds at the same points. The 0.7.1 runtime counts 13 post-CNN frames per full chunk
(audioUtils.cpp, audioBuilder.cpp, as the model code does), which holds for chunks of 97..104 mel frames
(n_window 50 in every released checkpoint); other chunk sizes are refused.

Preprocessing (what the runtime is given and does): the mel spectrogram is computed outside the runtime
(0.7.1's preprocess_audio.py: Whisper-style log-mel, 16 kHz, n_fft 400, hop 160, no padding, saved as fp16
`[1, mel, frames]`); audioUtils.cpp then chunks it, computes each chunk's post-CNN length, the gather indices and
the block attention mask. `mel_features` and `chunk_inputs` reproduce both steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT16, INT64, GraphBuilder

from ..encoder_ops import EagerOps, GraphOps

# canonical names (checkpoint/reader.py strips the `thinker.` and `model.` wrappers): the tower under
# `audio_tower.` in both layouts, transformers' projection beside it
TOWER, HF_PROJECTOR = "audio_tower.", "multi_modal_projector."
PREFIXES = (TOWER, HF_PROJECTOR)  # every tensor under these must be read
FEATURES, INDICES, MASK = "padded_feature", "padded_mask_after_cnn_indices", "attention_mask"
INPUTS = (FEATURES, INDICES, MASK)  # binding names (bindingNames.h kAudioPaddedFeatures / ...MaskIndices / ...Mask)
OUTPUT = "last_hidden_state"  # kAudioOutput
# audio/config.json's model_type, which cpp/multimodal/modelTypes.h maps to QWEN3_OMNI_AUDIO_ENCODER
RUNTIME_MODEL_TYPE = {"qwen3_asr": "qwen3_asr_thinker", "qwen3_omni": "qwen3_omni_audio_encoder",
                      "qwen3_omni_moe": "qwen3_omni_audio_encoder"}
RUNTIME_FRAMES_PER_CHUNK = 13  # post-CNN frames of a full chunk, fixed in 0.7.1's audioUtils.cpp / audioBuilder.cpp
LN_EPS = 1e-5  # nn.LayerNorm's default: every LayerNorm of the encoder (fixed in the model code)
CLAMP = 65504.0 - 1000.0  # the encoder layer's fp16 clamp (finfo(fp16).max - 1000)
MASK_FILL = -65504.0  # what audioUtils.cpp writes outside a window
_GELU = ("gelu",)  # exact (erf) GELU; HF's "gelu"
# Whisper-style log-mel settings of 0.7.1's preprocess_audio.py (and the checkpoints' feature extractors)
SAMPLING_RATE, N_FFT, HOP_LENGTH, MEL_FMAX = 16000, 400, 160, 8000.0
# Audio special tokens' names in the Qwen tokenizers (fallback when config.json has no id)
_TOKEN_NAMES = {"audio_token_id": "<|audio_pad|>", "audio_start_token_id": "<|audio_start|>",
                "audio_end_token_id": "<|audio_end|>"}


def post_cnn_length(n: int) -> int:
    """Frames after the three (kernel 3, stride 2, padding 1) convolutions."""
    for _ in range(3):
        n = (n - 1) // 2 + 1 if n > 0 else 0
    return n


@dataclass(frozen=True)
class AudioSpec:
    root_type: str
    d_model: int
    heads: int
    layers: int
    ffn: int
    mel_bins: int
    conv_channels: int  # downsample_hidden_size
    output_dim: int
    n_window: int
    n_window_infer: int
    positions: int  # rows of the model's sinusoid table (max_source_positions / max_position_embeddings)
    tower: str  # tensor prefix of the encoder
    proj1: str  # the two output projections' names (in the tower, or transformers' multi_modal_projector)
    proj2: str
    config_key: str  # where the encoder's config is: "thinker_config.audio_config" or "audio_config"

    @property
    def chunk(self) -> int:
        return 2 * self.n_window

    @property
    def freq(self) -> int:
        return post_cnn_length(self.mel_bins)

    @property
    def frames_per_chunk(self) -> int:
        return post_cnn_length(self.chunk)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def chunks_per_window(self) -> int:
        return self.n_window_infer // self.chunk


def _audio_config(raw: dict) -> tuple[dict | None, str]:
    thinker = raw.get("thinker_config")
    if isinstance(thinker, dict) and isinstance(thinker.get("audio_config"), dict):
        return thinker["audio_config"], "thinker_config.audio_config"
    a = raw.get("audio_config")
    return (a, "audio_config") if isinstance(a, dict) else (None, "audio_config")


def parse(raw: dict, text_hidden: int, path: Path) -> AudioSpec:
    """The encoder's shape from config.json; refuses what the graph or the 0.7.1 runtime cannot run."""
    a, key = _audio_config(raw)
    if a is None:
        raise ExportError("has no audio_config object (nor thinker_config.audio_config)", path)

    def need(name, *alternatives, default=None):
        for k in (name, *alternatives):
            value = a.get(k)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ExportError(f"{key}.{k} is {value!r}; expected a positive integer", path)
                return value
        if default is None:
            raise ExportError(f"{key} lacks {name!r}", path)
        return default

    thinker = key.startswith("thinker_config")
    hf_asr = not thinker and a.get("model_type") == "qwen3_asr_encoder"  # transformers' own Qwen3-ASR layout
    tower = TOWER
    proj1, proj2 = (HF_PROJECTOR + "linear_1", HF_PROJECTOR + "linear_2") if hf_asr else (tower + "proj1",
                                                                                           tower + "proj2")
    spec = AudioSpec(
        root_type=str(raw.get("model_type")), d_model=need("d_model"), heads=need("encoder_attention_heads"),
        layers=need("encoder_layers"), ffn=need("encoder_ffn_dim"), mel_bins=need("num_mel_bins"),
        conv_channels=need("downsample_hidden_size"), output_dim=need("output_dim"), n_window=need("n_window"),
        n_window_infer=need("n_window_infer"),
        positions=need("max_source_positions", "max_position_embeddings", default=1500),
        tower=tower, proj1=proj1, proj2=proj2, config_key=key)
    problems = []
    act = a.get("activation_function", "gelu")
    if act not in _GELU:
        problems.append(f"activation_function {act!r} (supported: gelu)")
    if spec.d_model % spec.heads:
        problems.append(f"d_model {spec.d_model} does not split into {spec.heads} heads")
    if spec.d_model % 2 or spec.d_model < 4:
        problems.append(f"d_model {spec.d_model}: the sinusoid position table needs an even size of at least 4")
    if spec.frames_per_chunk != RUNTIME_FRAMES_PER_CHUNK:
        problems.append(f"n_window {spec.n_window}: a chunk of {spec.chunk} mel frames gives "
                        f"{spec.frames_per_chunk} frames after the convolutions, but the model code and Edge-LLM "
                        f"0.7.1's runtime count {RUNTIME_FRAMES_PER_CHUNK} per chunk (n_window 49..52)")
    if spec.n_window_infer % spec.chunk:
        problems.append(f"n_window_infer {spec.n_window_infer} is not a multiple of the chunk size "
                        f"2 * n_window = {spec.chunk} (attention windows must hold whole chunks)")
    if spec.positions < spec.frames_per_chunk:
        problems.append(f"the position table has {spec.positions} rows, fewer than the {spec.frames_per_chunk} "
                        "frames of a chunk")
    if problems:
        raise UnsupportedError("the audio encoder cannot be exported: " + "; ".join(problems), path)
    if spec.output_dim != text_hidden:
        raise ExportError(f"{key}.output_dim is {spec.output_dim}, but the language model's hidden size is "
                          f"{text_hidden}; the audio features replace token embeddings", path)
    return spec


def prepare(ckpt, s: AudioSpec) -> None:
    """Nothing to rename: the graph reads the tensors under the checkpoint's own names (see the module doc)."""


# -- runtime config ---------------------------------------------------------------------------------
def runtime_config(raw: dict, s: AudioSpec, ckpt_dir: Path) -> dict:
    """audio/config.json (families.md §7): what Qwen3OmniAudioRunner and AudioBuilder read. The settings the
    runtime would otherwise default (n_window 50, n_window_infer 200, output_dim 2560) are written explicitly."""
    a, _ = _audio_config(raw)
    audio = {**a, "num_mel_bins": s.mel_bins, "n_window": s.n_window, "n_window_infer": s.n_window_infer,
             "output_dim": s.output_dim, "d_model": s.d_model}
    out = {"model_type": RUNTIME_MODEL_TYPE.get(s.root_type, "qwen3_omni_audio_encoder"), "audio_config": audio}
    thinker = raw.get("thinker_config") if isinstance(raw.get("thinker_config"), dict) else {}
    for k, name in _TOKEN_NAMES.items():
        value = thinker.get(k, raw.get(k))
        if not isinstance(value, int) or isinstance(value, bool):
            value = token_id(ckpt_dir, name)
        if not isinstance(value, int):
            raise ExportError(f"no {k} in config.json (thinker_config or root) and no {name} token in the "
                              "tokenizer files; the runtime needs it to place the audio features",
                              ckpt_dir / "config.json")
        out[k] = value
    user = thinker.get("user_token_id", raw.get("user_token_id"))
    if not isinstance(user, int) or isinstance(user, bool):
        user = token_id(ckpt_dir, "user", plain=True)
    if isinstance(user, int):
        out["user_token_id"] = user
    theta = _rope_theta(raw)
    if theta is not None:
        out["text_config"] = {"rope_theta": theta}
    return out


def _rope_theta(raw: dict) -> float | None:
    """The language model's rope theta (the runner initialises its sequential MRoPE table with it)."""
    thinker = raw.get("thinker_config") if isinstance(raw.get("thinker_config"), dict) else {}
    for scope in (thinker.get("text_config"), raw.get("text_config"), raw):
        if not isinstance(scope, dict):
            continue
        for holder in (scope, scope.get("rope_parameters"), scope.get("rope_scaling")):
            if isinstance(holder, dict) and isinstance(holder.get("rope_theta"), (int, float)) \
                    and not isinstance(holder.get("rope_theta"), bool):
                return float(holder["rope_theta"])
    return None


def token_id(ckpt_dir: Path, content: str, plain: bool = False) -> int | None:
    """The id of added token `content` in the tokenizer files (tokenizer.json, tokenizer_config.json,
    added_tokens.json); `plain`: also a regular vocabulary entry (vocab.json, tokenizer.json's model.vocab)."""
    def load(name):
        try:
            data = json.loads((Path(ckpt_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    tok = load("tokenizer.json") or {}
    for e in tok.get("added_tokens") or []:
        if isinstance(e, dict) and e.get("content") == content and isinstance(e.get("id"), int):
            return e["id"]
    decoder = (load("tokenizer_config.json") or {}).get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for k, e in decoder.items():
            if isinstance(e, dict) and e.get("content") == content and str(k).isdigit():
                return int(k)
    added = load("added_tokens.json") or {}
    if isinstance(added.get(content), int):
        return added[content]
    if plain:
        model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
        for vocab in (load("vocab.json") or {}, model.get("vocab") if isinstance(model.get("vocab"), dict) else {}):
            if isinstance(vocab.get(content), int):
                return vocab[content]
    return None


def preprocessor_problems(pre: dict, s: AudioSpec) -> list[str]:
    """The feature extractor's mel bins against the encoder's (the runtime feeds whatever the extractor made)."""
    size = pre.get("feature_size")
    if isinstance(size, int) and size != s.mel_bins:
        return [f"feature_size is {size}, but the audio encoder takes {s.mel_bins} mel bins"]
    return []


# -- graph face -------------------------------------------------------------------------------------
def positions_table(s: AudioSpec) -> np.ndarray:
    """The first `frames_per_chunk` rows of the model's sinusoid table (sin half, then cos half), in fp16 as the
    graph adds them; computed in fp32 as the model code does."""
    import torch

    half = s.d_model // 2
    inv = torch.exp(-(math.log(10000.0) / (half - 1)) * torch.arange(half, dtype=torch.float32))
    t = torch.arange(s.frames_per_chunk, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1).half().numpy()


def emit_graph(g: GraphBuilder, w, s: AudioSpec) -> None:
    """The whole encoder into `g`, weights through `w` (models.weights.WeightSource)."""
    ops, n, i64 = GraphOps(g, w), g.node, g.i64
    fp32, fp16, gelu = ops.fp32, ops.fp16, ops.gelu
    c, d, hd, ch = s.d_model, s.heads, s.head_dim, s.conv_channels

    def linear(y, name, out_f, in_f, bias=True):
        return ops.linear(y, name, out_f, in_f, bias)

    def norm(y, name):
        return ops.layer_norm(y, name, c, LN_EPS)

    feats = g.input(FEATURES, FLOAT16, ["num_chunks", s.mel_bins, s.chunk])
    idx = g.input(INDICES, INT64, ["num_attention_elems", 2])
    mask = g.input(MASK, FLOAT16, ["num_attention_elems", "num_attention_elems"])

    g.scope = "audio.conv"
    x = n("Unsqueeze", [feats, i64(1)])  # [chunks, 1, mel, 2n]
    for i, cin in ((1, 1), (2, ch), (3, ch)):
        name = f"{s.tower}conv2d{i}"
        x = gelu(n("Conv", [x, w.tensor(name + ".weight", (ch, cin, 3, 3)), w.vector(name + ".bias", ch)],
                   {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}))
    # [chunks, ch, freq, frames] -> [chunks, frames, ch * freq] (channel-major, as conv_out's input)
    x = n("Reshape", [n("Transpose", [x], {"perm": [0, 3, 1, 2]}), i64(0, 0, ch * s.freq)])
    x = linear(x, s.tower + "conv_out", c, ch * s.freq, bias=False)
    x = n("Add", [x, g.const(positions_table(s), "audio_positions")])
    h = n("GatherND", [x, idx])  # [T, d_model]: the frames that came from audio, chunk-major
    mask32 = fp32(mask)
    scale = g.const(np.array(1 / math.sqrt(hd), np.float16))
    clamp_lo, clamp_hi = g.const(np.array(-CLAMP, np.float16)), g.const(np.array(CLAMP, np.float16))
    for i in range(s.layers):
        g.scope = f"audio.layer.{i}"
        pre = f"{s.tower}layers.{i}."
        y = norm(h, pre + "self_attn_layer_norm")
        q, k, v = (linear(y, f"{pre}self_attn.{m}_proj", c, c) for m in "qkv")
        qh = n("Mul", [n("Transpose", [n("Reshape", [q, i64(0, d, hd)])], {"perm": [1, 0, 2]}), scale])
        kt = n("Transpose", [n("Reshape", [k, i64(0, d, hd)])], {"perm": [1, 2, 0]})
        vh = n("Transpose", [n("Reshape", [v, i64(0, d, hd)])], {"perm": [1, 0, 2]})
        scores = n("Add", [fp32(n("MatMul", [qh, kt])), mask32])  # [heads, T, T] fp32
        probs = fp16(n("Softmax", [scores], {"axis": -1}))
        attn = n("Reshape", [n("Transpose", [n("MatMul", [probs, vh])], {"perm": [1, 0, 2]}), i64(0, c)])
        h = n("Add", [h, linear(attn, pre + "self_attn.out_proj", c, c)])
        y = norm(h, pre + "final_layer_norm")
        h = n("Add", [h, linear(gelu(linear(y, pre + "fc1", s.ffn, c)), pre + "fc2", c, s.ffn)])
        h = n("Clip", [h, clamp_lo, clamp_hi])
    g.scope = "audio.head"
    y = norm(h, s.tower + "ln_post")
    y = linear(gelu(linear(y, s.proj1, c, c)), s.proj2, s.output_dim, c)
    g.scope = ""
    g.output(y, OUTPUT, FLOAT16, ["num_attention_elems", s.output_dim])


# -- the runtime's preprocessing ----------------------------------------------------------------------
def mel_filters(n_mels: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLING_RATE,
                fmax: float = MEL_FMAX) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters `[1 + n_fft // 2, n_mels]` (float64), 0 Hz..fmax."""
    def to_mel(f):
        f = np.asarray(f, np.float64)
        log_part = 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * (27.0 / np.log(6.4))
        return np.where(f >= 1000.0, log_part, 3.0 * f / 200.0)

    def to_hz(m):
        m = np.asarray(m, np.float64)
        return np.where(m >= 15.0, 1000.0 * np.exp((m - 15.0) * (np.log(6.4) / 27.0)), 200.0 * m / 3.0)

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(fmax), n_mels + 2))  # [n_mels + 2] band edges in Hz
    bins = np.linspace(0.0, sampling_rate // 2, 1 + n_fft // 2)
    rising = (bins[:, None] - edges[None, :-2]) / np.diff(edges)[None, :-1]
    falling = (edges[None, 2:] - bins[:, None]) / np.diff(edges)[None, 1:]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def mel_features(wave: np.ndarray, n_mels: int = 128, *, sampling_rate: int = SAMPLING_RATE, n_fft: int = N_FFT,
                 hop_length: int = HOP_LENGTH) -> np.ndarray:
    """Whisper-style log-mel spectrogram of a mono clip as 0.7.1's preprocess_audio.py makes it (no padding):
    `[n_mels, len(wave) // hop_length]` float32. Periodic Hann window, centred frames (reflect padding), power
    spectrum, mel filters, log10 clamped at 1e-10 and at 8 below the clip's maximum, then (x + 4) / 4."""
    x = np.asarray(wave, np.float64).reshape(-1)
    pad = n_fft // 2
    if x.size <= pad:
        raise ValueError(f"a clip of {x.size} samples is too short for frames of {n_fft}")
    padded = np.pad(x, pad, mode="reflect")
    count = 1 + x.size // hop_length
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    frames = padded[np.arange(n_fft)[None, :] + hop_length * np.arange(count)[:, None]] * window
    power = np.abs(np.fft.rfft(frames, axis=-1)[:-1]) ** 2  # the last frame is dropped, as Whisper does
    log = np.log10(np.maximum(power @ mel_filters(n_mels, n_fft, sampling_rate), 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).T.astype(np.float32)


def chunk_lengths(frames: int, s: AudioSpec) -> list[int]:
    """audioUtils.cpp computeChunkInfo: chunks of 2 * n_window frames, the last one holding the rest."""
    full, rest = divmod(frames, s.chunk)
    return [s.chunk] * full + ([rest] if rest else [])


def runtime_post_cnn_length(length: int, s: AudioSpec) -> int:
    """audioUtils.cpp computeFeatExtractOutputLength (the model code's formula): the partial part through the
    three convolutions, plus 13 per full chunk (RUNTIME_FRAMES_PER_CHUNK; parse refuses chunks where that is
    wrong)."""
    rest = length % s.chunk
    a = (rest - 1) // 2 + 1
    b = (a - 1) // 2 + 1
    return (b - 1) // 2 + 1 + (length // s.chunk) * RUNTIME_FRAMES_PER_CHUNK


def window_lengths(after_cnn: list[int], s: AudioSpec) -> list[int]:
    """audioUtils.cpp createChunkwiseAttentionMask: the clip's post-CNN frames split into attention windows of
    (the longest chunk's post-CNN length) x (chunks per window) frames, the last one holding the rest."""
    size = max(after_cnn) * s.chunks_per_window
    full, rest = divmod(sum(after_cnn), size)
    return [size] * full + ([rest] if rest else [])


def chunk_inputs(features: np.ndarray, s: AudioSpec) -> dict[str, np.ndarray]:
    """The graph's inputs for one clip's log-mel `[mel, frames]`, as audioUtils.cpp builds them from the fp16
    spectrogram: zero-padded chunks, the (chunk, frame) indices of the valid post-CNN frames and the block
    attention mask (0 inside a window, -65504 elsewhere)."""
    mel = np.asarray(features).astype(np.float16)
    if mel.ndim != 2 or mel.shape[0] != s.mel_bins or mel.shape[1] < 1:
        raise ValueError(f"features of shape {mel.shape}; expected [{s.mel_bins}, frames >= 1]")
    lengths = chunk_lengths(mel.shape[1], s)
    padded = np.zeros((len(lengths), s.mel_bins, s.chunk), np.float16)
    for i, length in enumerate(lengths):
        padded[i, :, :length] = mel[:, i * s.chunk:i * s.chunk + length]
    after = [runtime_post_cnn_length(length, s) for length in lengths]
    indices = np.array([(c, f) for c, count in enumerate(after) for f in range(count)], np.int64).reshape(-1, 2)
    total = len(indices)
    mask = np.full((total, total), MASK_FILL, np.float16)
    start = 0
    for size in window_lengths(after, s):
        mask[start:start + size, start:start + size] = 0
        start += size
    return {FEATURES: padded, INDICES: indices, MASK: mask}


def golden_frames(s: AudioSpec) -> int:
    """Mel frames of the golden clip: one attention window, one more chunk and a partial chunk (so padding, a
    partial window and a short tail chunk are all exercised)."""
    return s.n_window_infer + s.chunk + s.chunk * 3 // 10


def golden_wave(s: AudioSpec) -> np.ndarray:
    """A deterministic clip at 16 kHz: a rising chirp with a slow tremolo over low noise, float32; its length is
    no multiple of the hop (the last partial hop is dropped, as the extractor does)."""
    count = golden_frames(s) * HOP_LENGTH + 77
    t = np.arange(count, dtype=np.float64) / SAMPLING_RATE
    span = count / SAMPLING_RATE
    f0, f1 = 180.0, 3800.0
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * span)))
    envelope = 0.25 * (1.2 + np.sin(2 * np.pi * 1.7 * t)) / 2.2
    noise = np.random.default_rng(20260514).standard_normal(count) * 0.01
    return (chirp * envelope + noise).astype(np.float32)


def golden_image(s: AudioSpec) -> dict:
    """The golden clip for the LLM's audio scenario: all of its rows, between the audio start / end tokens."""
    rows = sum(runtime_post_cnn_length(n, s) for n in chunk_lengths(golden_frames(s), s))  # no mel computed again
    return {"counts": [rows], "grids": None, "merge": None}


def llm_config_fields(raw: dict, ckpt_dir: Path) -> dict:
    """What 0.7.1's exporter adds to the language model's config.json for Qwen3-ASR / Omni (families.md §7):
    `user_token_id` where it can be found, and Qwen3-ASR's `model` tag (no C++ reader uses either; kept for
    tools that compare configs with the reference's)."""
    thinker = raw.get("thinker_config") if isinstance(raw.get("thinker_config"), dict) else {}
    out = {}
    user = thinker.get("user_token_id", raw.get("user_token_id"))
    if not isinstance(user, int) or isinstance(user, bool):
        user = token_id(ckpt_dir, "user", plain=True)
    if isinstance(user, int):
        out["user_token_id"] = user
    if raw.get("model_type") == "qwen3_asr":
        out["model"] = "qwen3asrthinker"
    return out


def golden_inputs(s: AudioSpec) -> dict[str, np.ndarray]:
    """The golden clip through the runtime's preprocessing: every graph input."""
    return chunk_inputs(mel_features(golden_wave(s), s.mel_bins), s)


# -- eager face -------------------------------------------------------------------------------------
def eager(inputs: dict, t, s: AudioSpec):
    """What the graph computes, in torch: the graph inputs and its initializers `t` by name (fp16 tensors) ->
    `[T, output_dim]` fp32 holding fp16 values."""
    import torch
    import torch.nn.functional as F

    ops = EagerOps(t)
    r16, f, linear, gelu = ops.r16, ops.f, ops.linear, ops.gelu

    def norm(y, name):
        return ops.layer_norm(y, name, LN_EPS)

    c, d, hd = s.d_model, s.heads, s.head_dim
    x = torch.from_numpy(np.asarray(inputs[FEATURES])).float()[:, None]
    for i in (1, 2, 3):
        name = f"{s.tower}conv2d{i}"
        x = gelu(r16(F.conv2d(x, f(name + ".weight"), f(name + ".bias"), stride=2, padding=1)))
    chunks, ch, freq, frames = x.shape
    x = x.permute(0, 3, 1, 2).reshape(chunks, frames, ch * freq)
    x = linear(x, s.tower + "conv_out", bias=False)
    x = r16(x + torch.from_numpy(positions_table(s)).float())
    idx = torch.from_numpy(np.asarray(inputs[INDICES])).long()
    h = x[idx[:, 0], idx[:, 1]]
    mask = torch.from_numpy(np.asarray(inputs[MASK])).float()
    scale = float(np.float16(1 / math.sqrt(hd)))
    for i in range(s.layers):
        pre = f"{s.tower}layers.{i}."
        y = norm(h, pre + "self_attn_layer_norm")
        q, k, v = (linear(y, f"{pre}self_attn.{m}_proj").reshape(-1, d, hd).transpose(0, 1) for m in "qkv")
        scores = r16(r16(q * scale) @ k.transpose(-1, -2)) + mask
        probs = r16(torch.softmax(scores, dim=-1))
        attn = r16(probs @ v).transpose(0, 1).reshape(-1, c)
        h = r16(h + linear(attn, pre + "self_attn.out_proj"))
        y = norm(h, pre + "final_layer_norm")
        h = r16(h + linear(gelu(linear(y, pre + "fc1")), pre + "fc2"))
        h = h.clamp(-CLAMP, CLAMP)
    y = norm(h, s.tower + "ln_post")
    return linear(gelu(linear(y, s.proj1)), s.proj2)
