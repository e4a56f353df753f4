"""Vision encoders: `OUT/visual/` next to the language model (families.md §5, §7).

One module per tower family, chosen by the checkpoint's root `model_type` (`FAMILIES`), with the interface every
encoder has (edgellm_export/encoders.py, which plans, writes the sidecars and the golden bundle). Here: the
families, and the image layout a runner applies before scattering a tower's rows (Phi-4-MM's HD transform).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import encoders
from . import internvl, phi4mm, qwen2_5_vl, qwen2_vl, qwen3_vl

SUBDIR = "visual"
FAMILIES = {"internvl": internvl, "internvl_chat": internvl, "qwen2_5_vl": qwen2_5_vl,  # root model_type
            "qwen2_vl": qwen2_vl, "qwen3_vl": qwen3_vl, "qwen3_5": qwen3_vl, "qwen3_omni_moe": qwen3_vl,
            "phi4mm": phi4mm, "phi4_multimodal": phi4mm}
PREPROCESSOR = encoders.Preprocessor(key="image_processor", what="vision_config")


def exportable(raw: dict) -> bool:
    """This version can export the checkpoint's vision tower."""
    return raw.get("model_type") in FAMILIES


def plan(ckpt, text_hidden: int, vocab_size: int, clamp: bool = False) -> encoders.PlannedEncoder:
    return encoders.plan(SUBDIR, FAMILIES[ckpt.config.get("model_type")], ckpt, text_hidden, vocab_size,
                         PREPROCESSOR, clamp)


def assemble(how: dict, rows: np.ndarray, vdir: Path) -> np.ndarray:
    """The encoder's rows laid out as the runtime does before they are scattered (the bundle's `assemble`)."""
    from safetensors.numpy import load_file

    from edgellm_core.multimodal import assemble as layout

    return layout(how, rows, load_file(str(vdir / how["sidecar"])))
