"""What the runtime's multimodal runner does between a vision encoder and the language model, in numpy (no
torch): the exporter uses it for the golden bundle's image scenario, the validation side to replay it.

Qwen VL rules (0.7.1 QwenViTRunner, as transformers' get_rope_index computes them):
- the prompt holds, per image, a run of `image_token_id` tokens, one per merged patch group
  (t * h * w / merge^2), usually between vision_start and vision_end tokens;
- their embeddings are replaced by the encoder's output rows, image after image (`scatter_features`);
- MRoPE positions `[3, S]` (temporal, height, width): text tokens count up by one on all three; an image's
  tokens take start + (frame, row, column) on its merged grid; the text after it resumes at start +
  max(rows, columns) (`qwen_positions`); decode continues from the last position + 1;
- the rope table is per sequence: row p holds the cos / sin of the angles of the token at sequence index p,
  rotary pair j taking its position from the section mrope_section assigns it to (in blocks, or cycling
  t, h, w with mrope_interleaved), `[cos(R/2) | sin(R/2)]` as the AttentionPlugin reads it (`mrope_table`).

Phi-4-MM (0.7.1 Phi4MMViTRunner, transformers' Phi4MultimodalImageEmbedding): an image's crops (its global
thumbnail, then an hb x wb grid of sub-crops, 16 x 16 tokens each) are laid out as the HD transform does:
the sub-crops as one (16 hb) x (16 wb) grid, each row followed by the `sub_GN` separator, then `glb_GN`, then
the thumbnail's 16 rows each followed by `sub_GN` (`phi4mm_hd_layout`).
"""

from __future__ import annotations

import numpy as np


def qwen_positions(token_ids, grids, image_token_id: int, merge: int) -> np.ndarray:
    """MRoPE positions `[3, S]` of one prompt whose images have patch grids `grids` ((t, h, w) each)."""
    ids = np.asarray(token_ids).reshape(-1)
    out, pos, i, images = [], 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            out.append(np.full((3, 1), pos))
            pos += 1
            i += 1
            continue
        t, h, w = next(images)
        gh, gw = h // merge, w // merge
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        block = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos
        n = block.shape[1]
        if not np.all(ids[i:i + n] == image_token_id):
            raise ValueError(f"image of grid {(t, h, w)} needs {n} image tokens from index {i}")
        out.append(block)
        pos += max(gh, gw)
        i += n
    if next(images, None) is not None:
        raise ValueError("more image grids than image-token runs in the prompt")
    return np.concatenate(out, axis=1)


def mrope_table(positions: np.ndarray, capacity: int, *, theta: float, rotary_dim: int, section, interleaved=False):
    """`[1, capacity, R]` fp32: rows 0..S-1 from `positions` `[3, S]`, later rows (decode) continuing from the
    largest position + 1 on all three axes."""
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)  # [R/2]
    half = rotary_dim // 2
    if sum(section) != half:
        raise ValueError(f"mrope_section {list(section)} does not cover {half} rotary pairs")
    if interleaved:  # Qwen3-VL: pairs 1, 4, 7, ... take h and 2, 5, 8, ... take w, up to their sections' counts
        axis = np.zeros(half, np.int64)
        axis[1:3 * section[1]:3], axis[2:3 * section[2]:3] = 1, 2
    else:
        axis = np.repeat(np.arange(3), section)  # which of t, h, w each rotary pair takes
    s = positions.shape[1]
    nxt = int(positions.max()) + 1
    full = np.concatenate([positions, np.tile(np.arange(nxt, nxt + capacity - s), (3, 1))], axis=1)
    angles = full[axis].T.astype(np.float64) * inv_freq  # [capacity, R/2]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)[None]


def scatter_features(embeds: np.ndarray, token_ids, image_token_id: int, features: np.ndarray) -> np.ndarray:
    """`embeds` `[1, S, H]` with the image tokens' rows replaced by `features` rows, in order."""
    ids = np.asarray(token_ids).reshape(-1)
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != features.shape[0]:
        raise ValueError(f"{len(where)} image tokens for {features.shape[0]} encoder output rows")
    out = embeds.copy()
    out[0, where] = features.astype(out.dtype)
    return out


def phi4mm_hd_layout(rows: np.ndarray, blocks, glb: np.ndarray, sub: np.ndarray, side: int = 16) -> np.ndarray:
    """The encoder's rows `[crops * side^2, H]` (per image: thumbnail, then its hb x wb sub-crops row-major) as the
    token rows the prompt's image tokens take, images after one another."""
    per, out, at = side * side, [], 0
    hidden = rows.shape[-1]
    glb, sub = np.asarray(glb).reshape(1, hidden), np.asarray(sub).reshape(1, 1, hidden)
    for hb, wb in blocks:
        thumb = rows[at:at + per].reshape(side, side, hidden)
        crops = rows[at + per:at + per * (1 + hb * wb)]
        if crops.shape[0] != per * hb * wb:
            raise ValueError(f"{rows.shape[0]} encoder rows are too few for images of {list(blocks)} sub-crops")
        grid = crops.reshape(hb, wb, side, side, hidden).transpose(0, 2, 1, 3, 4).reshape(hb * side, wb * side, hidden)
        with_sep = np.concatenate([grid, np.broadcast_to(sub, (hb * side, 1, hidden))], axis=1)
        thumb = np.concatenate([thumb, np.broadcast_to(sub, (side, 1, hidden))], axis=1)
        out += [with_sep.reshape(-1, hidden), glb.astype(rows.dtype), thumb.reshape(-1, hidden)]
        at += per * (1 + hb * wb)
    return np.concatenate(out).astype(rows.dtype)


PHI4MM_SIDECAR = "phi4mm_gn_proj.safetensors"  # glb_GN, sub_GN: fp16 [H] each, in the visual directory


def assemble(how: dict, rows: np.ndarray, sidecar: dict) -> np.ndarray:
    """The encoder's rows laid out as the runtime does before they are scattered (a golden image scenario's
    `assemble`: {kind, blocks, sidecar}); `sidecar`: the tensors of the file it names."""
    if how.get("kind") != "phi4mm_hd":
        raise ValueError(f"image layout {how.get('kind')!r} is not one this version knows (phi4mm_hd)")
    return phi4mm_hd_layout(np.asarray(rows), how["blocks"], sidecar["glb_GN"], sidecar["sub_GN"])
