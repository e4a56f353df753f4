"""The optimization profile Edge-LLM 0.7.1's `audio_build` gives a Qwen3-ASR / Qwen3-Omni audio encoder (one
profile), as `AudioBuilder::setupQwen3OmniAudioEncoderProfile` sets it from the builder limits
(`AudioBuilderConfig`: min_time_steps 100, max_time_steps 6000 mel frames by default) and the exported
`audio/config.json` (`audio_config.num_mel_bins`, `audio_config.n_window`):

    chunks   = ceil(time steps / (2 n_window)): min / (min + max) / 2 / max
    elements = min chunks (a tail chunk can hold a single post-CNN frame) / (min + max) / 2 / 13 max chunks
    padded_feature                 [chunks, mel, 2 n_window]
    padded_mask_after_cnn_indices  [elements, 2]
    attention_mask                 [elements, elements]

`(a + b) / 2` is C++ integer division, as in audio_build.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm_core.errors import UnsupportedError

from .profiles import ProfileError, ShapeRange

FRAMES_PER_CHUNK = 13  # audioBuilder.cpp kAttentionElementsPerChunk
AUDIO_TYPES = ("qwen3_asr_thinker", "qwen3_omni", "qwen3_omni_thinker", "qwen3_omni_text",
               "qwen3_omni_audio_encoder")  # modelTypes.h: QWEN3_OMNI_AUDIO_ENCODER


@dataclass(frozen=True)
class AudioLimits:
    min_time_steps: int = 100
    max_time_steps: int = 6000

    def as_dict(self) -> dict:
        return {"min_time_steps": self.min_time_steps, "max_time_steps": self.max_time_steps}


def default_limits(config: dict) -> AudioLimits:
    return AudioLimits()


def audio_profile(config: dict, input_dims: dict[str, list[int | str]], limits: AudioLimits | None = None,
                  where=None) -> dict[str, ShapeRange]:
    """{input name: ShapeRange} of the one audio profile."""
    limits = limits or AudioLimits()
    kind = str(config.get("model_type") or "")
    if kind not in AUDIO_TYPES:
        raise UnsupportedError(f"audio model_type {kind!r}: no audio_build profile is implemented for it here", where)
    audio = config.get("audio_config") if isinstance(config.get("audio_config"), dict) else {}
    mel, n_window = audio.get("num_mel_bins", audio.get("mel_bins")), audio.get("n_window")
    if not isinstance(mel, int) or not isinstance(n_window, int) or n_window <= 0:
        raise ProfileError(f"audio_config needs num_mel_bins and n_window (got {mel!r}, {n_window!r})")
    if not 0 < limits.min_time_steps <= limits.max_time_steps:
        raise ProfileError(f"audio limits {limits.as_dict()}: need 0 < min_time_steps <= max_time_steps")
    width = 2 * n_window
    feature = input_dims.get("padded_feature")
    if feature is not None and (feature[1], feature[2]) != (mel, width):
        raise ProfileError(f"padded_feature is {feature}, but the config says {mel} mel bins and chunks of {width}")
    lo, hi = -(-limits.min_time_steps // width), -(-limits.max_time_steps // width)
    elems = (lo, (lo + hi * FRAMES_PER_CHUNK) // 2, hi * FRAMES_PER_CHUNK)
    chunks = (lo, (lo + hi) // 2, hi)
    return {"padded_feature": ShapeRange(*[(c, mel, width) for c in chunks]),
            "padded_mask_after_cnn_indices": ShapeRange(*[(e, 2) for e in elems]),
            "attention_mask": ShapeRange(*[(e, e) for e in elems])}
