"""Audio encoders: `OUT/audio/` next to the language model (families.md §5.5, §7).

One module per encoder family, chosen by the checkpoint's root `model_type` (`FAMILIES`), with the interface every
encoder has (edgellm_export/encoders.py, which plans and writes the golden bundle).
"""

from __future__ import annotations

from .. import encoders
from . import qwen3_asr

SUBDIR = "audio"
# root model_type -> family, for the types whose transformers classes lay the encoder out as the module reads it:
# qwen3_asr (transformers' Qwen3ASR classes, and the hub's original layout of the qwen_asr package) and
# qwen3_omni_moe (Qwen3-Omni).
# 0.7.1's own exporter keys the Omni layout by "qwen3_omni" / "qwen3_omni_thinker", which no transformers config
# carries (the hub's Qwen3-Omni checkpoints say qwen3_omni_moe); add them here if such checkpoints turn up.
FAMILIES = {"qwen3_asr": qwen3_asr, "qwen3_omni_moe": qwen3_asr}


def exportable(raw: dict) -> bool:
    """This version can export the checkpoint's audio encoder."""
    return raw.get("model_type") in FAMILIES


PREPROCESSOR = encoders.Preprocessor(key="feature_extractor", what="audio_config", marker="feature_size")


def plan(ckpt, text_hidden: int, vocab_size: int, clamp: bool = False) -> encoders.PlannedEncoder:
    return encoders.plan(SUBDIR, FAMILIES[ckpt.config.get("model_type")], ckpt, text_hidden, vocab_size,
                         PREPROCESSOR, clamp)


def llm_config_fields(raw: dict, ckpt_dir) -> dict:
    """The language model's config.json additions for an audio checkpoint (see the family's function)."""
    module = FAMILIES.get(raw.get("model_type"))
    return module.llm_config_fields(raw, ckpt_dir) if module is not None else {}
