"""What the Qwen vision towers (qwen2_5_vl.py, qwen3_vl.py) share: the runtime's per-patch preprocessing
(positions in merge-block order, 2-D rotary angles, per-frame sequence lengths); the pieces both faces are built
from (patch embedding, norms, GELUs, vision RoPE, ViT attention) are encoder_ops', imported from here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..encoder_ops import EagerOps, GraphOps  # noqa: F401  (the towers' pieces, imported from here)


@dataclass(frozen=True)
class QwenTower:
    """What both Qwen towers' specs have (each family adds its own fields)."""

    hidden: int
    heads: int
    depth: int
    intermediate: int
    patch_size: int
    temporal_patch_size: int
    channels: int
    merge: int  # spatial_merge_size
    out_hidden: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.merge * self.merge


def golden_patches(spec: QwenTower, grids, mean=None, std=None, seed: int = 20261202) -> np.ndarray:
    """The golden bundle's `input` `[T, patch_dim]` fp16 for `grids`: each frame a synthetic picture of exactly
    h x w patches (a size the runtime does not resize), through the runtime's preprocessing (normalize with
    `mean` / `std`, the frame repeated temporal_patch_size times, rows in merge-block order), frames of one
    image after one another, images in order. `mean` / `std` default to the family's processor defaults:
    0.5 / 0.5 for Qwen3-VL and Qwen3.5 (their specs carry the learned position table), OpenAI CLIP's for
    Qwen2-VL and Qwen2.5-VL. Frame k of all frames is `synthetic_image(..., seed + k)`."""
    from edgellm_core.image_preprocess import QWEN_NORMALIZATION, qwen_patches, synthetic_image

    family = "qwen3_vl" if hasattr(spec, "num_positions") else "qwen2_5_vl"
    mean = QWEN_NORMALIZATION[family][0] if mean is None else mean
    std = QWEN_NORMALIZATION[family][1] if std is None else std
    p, frames = spec.patch_size, []
    for t, h, w in grids:
        for _ in range(t):
            image = synthetic_image(h * p, w * p, seed + len(frames), spec.channels)
            frames.append(qwen_patches(image, p, spec.temporal_patch_size, spec.merge, mean, std)[0])
    return np.concatenate(frames).astype(np.float16)


def first_image(spec: QwenTower, grids) -> dict:
    """The first golden image (the first rows of the output) for the LLM's image scenario, with its grid for
    the MRoPE positions."""
    return all_images(spec, grids[:1])


def all_images(spec: QwenTower, grids) -> dict:
    """Every golden image, in order, for the LLM's image scenario (several images in one prompt), with their
    grids for the MRoPE positions."""
    return {"counts": [t * h * w // spec.merge_unit for t, h, w in grids], "grids": [tuple(g) for g in grids],
            "merge": spec.merge}


def base_inputs(g, spec: QwenTower) -> tuple[str, str, str, str]:
    """The inputs every Qwen tower's graph has, in 0.7.1's order: `input` patches, `rotary_pos_emb`,
    `cu_seqlens`, `max_seqlen_carrier` (each family adds its own after them)."""
    from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32

    return (g.input("input", FLOAT16, ["num_patches", spec.patch_dim]),
            g.input("rotary_pos_emb", FLOAT, ["num_patches", spec.head_dim // 2]),
            g.input("cu_seqlens", INT32, ["num_images_plus_1"]),
            g.input("max_seqlen_carrier", INT32, ["max_seqlen"]))


RUNTIME_ROPE_THETA = 10000.0  # qwenViTRunner computes every Qwen tower's vision rotary angles with it


def vision_fields(raw_vision, path):
    """(vision_config, need): encoders.config_fields over it (sizes are bounded positive integers)."""
    from ..encoders import config_fields

    return raw_vision, config_fields(raw_vision, "vision_config", path)


def vision_rope(v: dict, path) -> tuple[dict, float]:
    """The tower's rope parameters and theta (transformers 5 nests them in rope_parameters)."""
    from ..encoders import number

    rope = v.get("rope_parameters") if isinstance(v.get("rope_parameters"), dict) else {}
    return rope, number(rope.get("rope_theta", v.get("rope_theta", RUNTIME_ROPE_THETA)), "vision rope_theta", path)


def common_problems(spec: QwenTower, v: dict, rope: dict, act: str, text_hidden: int, out_key: str,
                    width_key: str = "hidden_size") -> list[str]:
    """What every Qwen tower's graph or the 0.7.1 runner cannot take: heads that do not split into rotary
    quarters, another activation, another rope type or theta (the runner's is fixed), a merge size other than 2,
    an output that is not the language model's width."""
    out = []
    if spec.hidden % spec.heads or spec.head_dim % 4:
        out.append(f"{width_key} {spec.hidden} / num_heads {spec.heads}: the head size must split into four "
                   "rotary quarters")
    if v.get("hidden_act", act) != act:
        out.append(f"hidden_act {v.get('hidden_act')!r} (supported: {act})")
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        out.append(f"rope_type {rope.get('rope_type')!r} (supported: axial)")
    if spec.rope_theta != RUNTIME_ROPE_THETA:
        out.append(f"rope_theta {spec.rope_theta:g}: Edge-LLM 0.7.1's Qwen runner computes the vision rotary "
                   f"angles with {RUNTIME_ROPE_THETA:g}")
    if spec.merge != 2:
        out.append(f"spatial_merge_size {spec.merge}: Edge-LLM 0.7.1's visual_build and Qwen runner count four "
                   "patches per image token")
    if spec.out_hidden != text_hidden:
        out.append(f"{out_key} {spec.out_hidden} (the tower's output) differs from the language model's hidden "
                   f"size {text_hidden}")
    return out


def preprocessor_problems(pre: dict, spec: QwenTower) -> list[str]:
    """The Qwen processors' patch settings against the tower's (patch_size, temporal_patch_size, merge_size)."""
    out = []
    for key, want in (("patch_size", spec.patch_size), ("temporal_patch_size", spec.temporal_patch_size),
                      ("merge_size", spec.merge)):
        if pre.get(key) is not None and pre[key] != want:
            out.append(f"{key} is {pre[key]!r}, but the tower's is {want}")
    return out


def prepare(ckpt, spec) -> None:
    """transformers' names (`visual.*`, or `model.visual.*`, a wrapper the reader strips): nothing to map."""


# -- the runtime's preprocessing ---------------------------------------------------------------------
def patch_positions(grids, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every patch, images after one another, frames repeated, in merge-block order (the
    order the processor flattens patches in)."""
    rows, cols = [], []
    for t, h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"image grid {h}x{w} patches is not a multiple of the merge size {merge}")
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows.append(np.tile(hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1), t))
        cols.append(np.tile(wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1), t))
    return np.concatenate(rows), np.concatenate(cols)


def rotary_angles(grids, merge: int, head_dim: int, theta: float) -> np.ndarray:
    """`rotary_pos_emb` `[T, D/2]` fp32: each patch's row angles then its column angles (D/4 frequencies)."""
    quarter = head_dim // 2
    inv_freq = 1.0 / theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter)
    rows, cols = patch_positions(grids, merge)
    return np.concatenate([np.outer(rows, inv_freq), np.outer(cols, inv_freq)], axis=1).astype(np.float32)


def frame_seqlens(grids) -> tuple[np.ndarray, np.ndarray]:
    """(`cu_seqlens` int32, `max_seqlen_carrier` int32 zeros of the longest frame's length): one attention
    sequence per frame of every image."""
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), np.zeros(max(lengths), np.int32)
