"""What a checkpoint's rotary embedding means: per-frequency inverse frequencies.

These follow HuggingFace's definitions of each `rope_type` (their meaning is
the checkpoint's meaning). The runtime contract modules decide how to express
them to a given Edge-LLM release; the eager reference uses them directly.
"""

from __future__ import annotations

import math

import numpy as np

from edgellm_core.errors import UnsupportedError

from .config import ModelConfig, RopeSpec


def base_inv_freq(theta: float, rotary_dim: int) -> np.ndarray:
    """omega_i = theta^(-2i/R), computed in float32 as HF and the runtime do."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def frequency_factors(spec: RopeSpec, rotary_dim: int) -> np.ndarray | None:
    """Per-frequency divisors f_i with omega'_i = omega_i / f_i, or None if not of that form.

    linear and llama3 scaling are exactly such divisors; default is all ones.
    """
    inv = base_inv_freq(spec.theta, rotary_dim).astype(np.float64)
    p = spec.params
    if spec.rope_type == "default":
        return np.ones_like(inv)
    if spec.rope_type == "linear":
        return np.full_like(inv, float(p["factor"]))
    if spec.rope_type == "llama3":
        factor = float(p["factor"])
        low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
        old_ctx = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        scaled = np.where(medium, blended, scaled)
        return inv / scaled
    return None


def reference_inv_freq_and_scale(cfg: ModelConfig, capacity: int) -> tuple[np.ndarray, float]:
    """(inv_freq, cos/sin multiplier) the checkpoint means, for sequences up to `capacity`."""
    spec, r = cfg.rope, cfg.rotary_dim
    inv = base_inv_freq(spec.theta, r).astype(np.float64)
    factors = frequency_factors(spec, r)
    if factors is not None:
        return inv / factors, 1.0
    p = spec.params
    if spec.rope_type == "dynamic":
        if capacity > cfg.max_position_embeddings:
            raise UnsupportedError("dynamic RoPE beyond max_position_embeddings has no fixed table")
        return inv, 1.0
    if spec.rope_type == "longrope":
        orig = int(p.get("original_max_position_embeddings") or cfg.raw.get("original_max_position_embeddings"))
        ext = np.asarray(p["long_factor"] if capacity > orig else p["short_factor"], dtype=np.float64)
        factor = cfg.max_position_embeddings / orig
        scale = p.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return inv / ext, float(scale)
    raise UnsupportedError(f"RoPE type {spec.rope_type!r} has no reference implementation here")
