"""The optimization profile Edge-LLM 0.7.1's `visual_build` gives a vision encoder (one profile).

Pure: from the exported `visual/config.json`, the graph's input dims and the builder limits
(`VisualBuilderConfig`: min_image_tokens 4, max_image_tokens 1024, max_image_tokens_per_image 512 by
default), as `VisualBuilder::setupVisualOptimizationProfile` sets them (contract families.md §5.2, §5.4):

    Qwen (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5, qwen3_omni_vision_encoder): HW = tokens * 4 (merge unit),
    min / opt / max
        input, rotary_pos_emb      [4 min, dim] / [4 (min+max)/2, dim] / [4 max, dim]
        cu_seqlens                 [2] / [max(1, max/min) + 1] / [same]
        max_seqlen_carrier         [1] / [per_image * 4 / 2] / [per_image * 4]
        qwen2_5_vl: cu_window_seqlens [2] / [max] / [max]; window_index, reverse_window_index [HW / 4]
        qwen3_vl, qwen3_5, qwen3_omni_vision_encoder (Qwen3-VL's tower):
                                   fast_pos_embed_idx, fast_pos_embed_weight [4, HW]
    InternVL (and Phi-4-MM): tiles of 256 tokens, so both token limits must be multiples of 256
        input                      [min/256, C, H, W] / [(min/256 + max/256) / 2, ...] / [max/256, ...]

`(a + b) / 2` is C++ integer division, as in visual_build.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm_core.errors import UnsupportedError

from .profiles import ProfileError, ShapeRange

QWEN3_VL_TYPES = ("qwen3_vl", "qwen3_5", "qwen3_omni_vision_encoder")  # Qwen3-VL's tower: fast_pos_embed_* inputs
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", *QWEN3_VL_TYPES)
TILE_TYPES = ("internvl", "internvl_vision", "phi4mm")
TOKENS_PER_TILE = 256  # visualBuilder.cpp kBlockLength


@dataclass(frozen=True)
class VisualLimits:
    min_image_tokens: int = 4
    max_image_tokens: int = 1024
    max_image_tokens_per_image: int = 512

    def as_dict(self) -> dict:
        return {"min_image_tokens": self.min_image_tokens, "max_image_tokens": self.max_image_tokens,
                "max_image_tokens_per_image": self.max_image_tokens_per_image}


def default_limits(config: dict) -> VisualLimits:
    """visual_build's defaults, except for tiled towers: its own defaults (4 / 1024 tokens) are refused there,
    so a tiled tower gets the smallest valid minimum, one tile (256), and at most four tiles per batch."""
    if model_type(config) in TILE_TYPES:
        return VisualLimits(TOKENS_PER_TILE, 4 * TOKENS_PER_TILE, 4 * TOKENS_PER_TILE)
    return VisualLimits()


def model_type(config: dict) -> str:
    """vision_config.model_type first, then the top level's, as visual_build reads them."""
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    return str(vision.get("model_type") or config.get("model_type") or "")


def visual_profile(config: dict, input_dims: dict[str, list[int | str]], limits: VisualLimits | None = None,
                   where=None) -> dict[str, ShapeRange]:
    """{input name: ShapeRange} of the one visual profile; `input_dims` are the graph's (symbolic names for the
    dynamic dims), from which the fixed feature dims are read as the builder reads them from the network."""
    lim = limits or default_limits(config)
    lo, hi, per = lim.min_image_tokens, lim.max_image_tokens, lim.max_image_tokens_per_image
    if not 0 < lo <= hi or per < 1:
        raise ProfileError(f"visual limits {lim.as_dict()}: need 0 < min_image_tokens <= max_image_tokens and "
                           "max_image_tokens_per_image >= 1", where)
    kind = model_type(config)

    def rng(mn, opt, mx) -> ShapeRange:
        return ShapeRange(tuple(mn), tuple(opt), tuple(mx))

    if kind in QWEN_TYPES:
        feature = {name: dims[-1] for name, dims in input_dims.items() if len(dims) == 2}
        min_hw, max_hw, opt_hw = lo * 4, hi * 4, (lo + hi) // 2 * 4
        images = max(1, hi // lo)
        out = {"input": rng([min_hw, feature["input"]], [opt_hw, feature["input"]], [max_hw, feature["input"]]),
               "rotary_pos_emb": rng([min_hw, feature["rotary_pos_emb"]], [opt_hw, feature["rotary_pos_emb"]],
                                     [max_hw, feature["rotary_pos_emb"]]),
               "cu_seqlens": rng([2], [images + 1], [images + 1]),
               "max_seqlen_carrier": rng([1], [per * 4 // 2], [per * 4])}
        if kind == "qwen2_5_vl":
            out["cu_window_seqlens"] = rng([2], [hi], [hi])
            out["window_index"] = out["reverse_window_index"] = rng([min_hw // 4], [opt_hw // 4], [max_hw // 4])
        elif kind in QWEN3_VL_TYPES:
            out["fast_pos_embed_idx"] = out["fast_pos_embed_weight"] = rng([4, min_hw], [4, opt_hw], [4, max_hw])
        return out
    if kind in TILE_TYPES:
        if lo % TOKENS_PER_TILE or hi % TOKENS_PER_TILE:
            raise ProfileError(f"min_image_tokens {lo} and max_image_tokens {hi} must be multiples of "
                               f"{TOKENS_PER_TILE} for a tiled ViT (visual_build refuses them too)", where)
        vision = config.get("vision_config") or {}
        if kind == "phi4mm":  # visual_build: 3 channels, embd_layer.image_embd_layer.crop_size (else 448) square
            crop = ((config.get("embd_layer") or {}).get("image_embd_layer") or {}).get("crop_size", 448)
            c, (h, w) = 3, (crop, crop)
        else:  # InternVL: vision_config.num_channels and image_size [h, w]
            c, (h, w) = vision.get("num_channels", 3), vision.get("image_size", [0, 0])
        n_lo, n_hi = lo // TOKENS_PER_TILE, hi // TOKENS_PER_TILE
        return {"input": rng([n_lo, c, h, w], [(n_lo + n_hi) // 2, c, h, w], [n_hi, c, h, w])}
    raise UnsupportedError(f"visual model_type {kind!r}: no visual_build profile is implemented for it here", where)
