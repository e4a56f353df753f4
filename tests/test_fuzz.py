"""Property tests: the safetensors header parser and the config normaliser never crash.

Whatever bytes or JSON they are given, they either accept the input or raise
ExportError (which the CLI turns into a one-paragraph message); any other
exception would be a traceback for the user. Bounded example counts keep CI fast.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm_core.errors import ExportError
from edgellm_core.safetensors_file import SafetensorsFile
from edgellm_export.config import build_model_config

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F16", "BF16", "F32", "I8", "F8_E4M3", "Q4", "", "f16"]) | json_scalars,
    "shape": st.lists(st.integers(-3, 40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-10, 400), min_size=0, max_size=3) | json_values,
})


def _parse(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(raw)
        try:
            SafetensorsFile(p)
        except ExportError:
            pass


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(raw):
    _parse(raw)


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), entry | json_values, max_size=4), st.integers(0, 300),
       st.integers(-16, 16))
def test_structured_headers(header, data_len, length_skew):
    try:
        raw = json.dumps(header).encode()
    except (ValueError, TypeError):
        return
    _parse(struct.pack("<Q", max(0, len(raw) + length_skew)) + raw + bytes(data_len))


config_fields = st.fixed_dictionaries({}, optional={
    k: st.integers(-5, 2**40) | json_scalars for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "max_position_embeddings", "sliding_window")
} | {
    "model_type": st.sampled_from(["llama", "qwen3", ""]) | json_scalars,
    "rope_theta": json_scalars, "rms_norm_eps": json_scalars, "partial_rotary_factor": json_scalars,
    "rope_scaling": json_values, "rope_parameters": json_values, "text_config": json_values,
    "use_sliding_window": json_scalars, "tie_word_embeddings": json_scalars,
})


@SETTINGS
@given(config_fields)
def test_config_normaliser(cfg):
    try:
        build_model_config(cfg, lambda suffix: False, Path("config.json"))
    except ExportError:
        pass


# Encoder configs (visual/*.py, audio/*.py and the component rules): plausible keys with any JSON in them.
_VISION_KEYS = ("hidden_size", "num_heads", "num_attention_heads", "depth", "num_hidden_layers", "intermediate_size",
                "patch_size", "image_size", "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
                "window_size", "fullatt_block_indexes", "num_position_embeddings", "deepstack_visual_indexes",
                "embed_dim", "mlp_ratio", "hidden_act", "rope_parameters", "rope_theta", "feature_layer", "crop_size",
                "image_token_id", "norm_type", "layer_norm_eps", "num_channels", "in_channels", "model_type")
_AUDIO_KEYS = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
               "downsample_hidden_size", "output_dim", "n_window", "n_window_infer", "max_source_positions",
               "activation_function", "model_type")


def _sub(keys):
    small = st.integers(-3, 1100) | json_scalars | st.lists(st.integers(-2, 40), max_size=3)
    return json_values | st.fixed_dictionaries({}, optional={k: small for k in keys})


encoder_configs = st.fixed_dictionaries(
    {"model_type": st.sampled_from(["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "internvl", "internvl_chat",
                                    "phi4mm", "phi4_multimodal", "qwen3_asr", "qwen3_omni_moe"])},
    optional={"vision_config": _sub(_VISION_KEYS), "audio_config": _sub(_AUDIO_KEYS),
              "thinker_config": json_values | st.fixed_dictionaries({}, optional={
                  "vision_config": _sub(_VISION_KEYS), "audio_config": _sub(_AUDIO_KEYS), "text_config": json_values,
                  "audio_token_id": json_scalars, "image_token_id": json_scalars}),
              "embd_layer": json_values | st.fixed_dictionaries({}, optional={"image_embd_layer": json_values,
                                                                              "audio_embd_layer": json_values}),
              "text_config": json_values, "llm_config": json_values, "downsample_ratio": json_scalars,
              "image_token_id": json_scalars, "video_token_id": json_scalars, "vision_start_token_id": json_scalars,
              "audio_token_id": json_scalars, "audio_start_token_id": json_scalars,
              "audio_end_token_id": json_scalars, "vocab_size": json_scalars, "talker_config": json_values})


@SETTINGS
@given(encoder_configs, st.sampled_from([None, ("llm",), ("llm", "visual"), ("llm", "audio")]))
def test_encoder_configs(raw, components):
    """Parsing an encoder's config, its runtime config and the component rules: accepted or ExportError."""
    from edgellm_export import audio, visual
    from edgellm_export.config import check_components

    path = Path("config.json")
    with tempfile.TemporaryDirectory() as d:
        try:
            check_components(raw, components, path)
        except ExportError:
            pass
        for module in (visual.FAMILIES.get(raw["model_type"]), audio.FAMILIES.get(raw["model_type"])):
            if module is None:
                continue
            try:
                spec = module.parse(raw, 256, path)
                module.runtime_config(raw, spec, Path(d))
            except ExportError:
                pass
