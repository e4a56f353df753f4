"""RoPE fields for the 0.7 runtime's config.json, rewritten or refused so none is ignored.

The 0.7 runtime builds the cos/sin table itself and implements only default,
dynamic (up to max_position_embeddings), longrope, mrope and no-rope; any other
type (llama3, linear, yarn) is silently treated as default, which would run
Llama 3.x with wrong positions. Per-frequency scalings are rewritten into
longrope with short == long factors and no attention scaling
(original_max_position_embeddings == max_position_embeddings), which the
runtime computes exactly; everything else is refused.
"""

from __future__ import annotations

import logging

from edgellm_core.errors import UnsupportedError

from ..config import ModelConfig
from ..rope import frequency_factors

log = logging.getLogger(__name__)
DEFAULT_TABLE_DIMS = (64, 128)  # the runtime's default-table kernel
LONGROPE_DIMS = (32, 64, 96, 128)


def _longrope(cfg: ModelConfig, factors, converted_from: dict | None) -> dict:
    values = [float(f) for f in factors]
    scaling = {"type": "longrope", "rope_type": "longrope", "short_factor": values,
               "long_factor": list(values),
               "original_max_position_embeddings": cfg.max_position_embeddings}
    if converted_from is not None:
        scaling["converted_from"] = converted_from
    return {
        "rope_theta": cfg.rope.theta,
        "rope_scaling": scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        # Equal to max_position_embeddings, so the runtime applies no attention scaling.
        "original_max_position_embeddings": cfg.max_position_embeddings,
    }


def runtime_rope_fields(cfg: ModelConfig, *, passthrough: bool = False) -> dict:
    spec, r = cfg.rope, cfg.rotary_dim
    original = {"rope_type": spec.rope_type, "rope_theta": spec.theta, **spec.params}
    if passthrough:
        # Reproduces the reference exporter (scaling dict verbatim) for tests that
        # show the runtime would mis-handle it. Never the default.
        return {"rope_theta": spec.theta, "rope_scaling": original,
                "max_position_embeddings": cfg.max_position_embeddings}
    if cfg.raw.get("use_rope") is False:
        raise UnsupportedError("use_rope: false (no positional embedding) is only exported for hybrid models")
    if spec.rope_type in ("default", "dynamic") and r in DEFAULT_TABLE_DIMS:
        fields = {"rope_theta": spec.theta,
                  "rope_scaling": {"type": spec.rope_type, "rope_type": spec.rope_type, **spec.params},
                  "max_position_embeddings": cfg.max_position_embeddings}
        if spec.rope_type == "dynamic":
            log.warning("dynamic RoPE: the runtime refuses a KV capacity above max_position_embeddings=%d",
                        cfg.max_position_embeddings)
        return fields
    if spec.rope_type == "longrope":
        orig = spec.params.get("original_max_position_embeddings") or cfg.raw.get(
            "original_max_position_embeddings")
        if not orig or "short_factor" not in spec.params or "long_factor" not in spec.params:
            raise UnsupportedError("longrope scaling needs short_factor, long_factor and "
                                   "original_max_position_embeddings")
        if r not in LONGROPE_DIMS:
            raise UnsupportedError(f"longrope with rotary dim {r} is not implemented by the 0.7 runtime")
        if spec.params.get("attention_factor") not in (None,):
            raise UnsupportedError("longrope with an explicit attention_factor cannot be expressed to "
                                   "the 0.7 runtime, which derives the factor itself")
        log.warning("longrope: the 0.7 runtime uses long_factor for every sequence whenever the "
                    "engine's KV capacity exceeds %d, where HF switches by sequence length", orig)
        scaling = {"type": "longrope", "rope_type": "longrope", **spec.params}
        return {"rope_theta": spec.theta, "rope_scaling": scaling,
                "max_position_embeddings": cfg.max_position_embeddings,
                "original_max_position_embeddings": int(orig)}
    factors = frequency_factors(spec, r)
    if factors is not None and r in LONGROPE_DIMS:
        converted = original if spec.rope_type != "default" else None
        if spec.rope_type != "default":
            log.info("RoPE %s rewritten as longrope with equal short/long factors (exact)", spec.rope_type)
        return _longrope(cfg, factors, converted)
    if factors is not None:
        raise UnsupportedError(
            f"rotary dim {r} (head_dim {cfg.head_dim} x partial_rotary_factor "
            f"{cfg.partial_rotary_factor}) is not supported by the 0.7 runtime's RoPE kernels "
            f"(default needs {DEFAULT_TABLE_DIMS}, longrope {LONGROPE_DIMS})")
    raise UnsupportedError(
        f"RoPE scaling type {spec.rope_type!r} is not implemented by the Edge-LLM 0.7 runtime "
        "(it would silently fall back to default RoPE and compute wrong positions) and has no "
        "exactly equivalent form it implements; refusing to export")
