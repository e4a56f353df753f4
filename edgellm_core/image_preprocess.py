"""The image preprocessing of Edge-LLM 0.7.1's C++ multimodal runners (QwenViTRunner, InternViTRunner,
Phi4MMViTRunner), in numpy, so that validation (and the golden bundle) can feed a tower exactly what the
runtime would, without torch.

What is exact and what is not: the runtime resizes with stb_image_resize (Catmull-Rom, clamped edges), which
is not reproduced bit for bit here. Everything around the resize is: the target sizes and tile/crop grids it
picks, and what it does to an image already at that size (`val / 255.0f` in fp32, minus the per-channel mean,
over the per-channel std, then fp16; the patch or tile layout). So the golden images are synthesized at sizes
the runtime does not resize, and `resize_bicubic` (an approximation of the same filter) only stands in for the
thumbnails, whose values are never compared exactly.

Conventions: images are `[H, W, C]` uint8 (RGB, as the runtime decodes them); grids are `(cols, rows)` for
tiles (as transformers' tile helpers return them) and `(t, h, w)` in patches for Qwen.
"""

from __future__ import annotations

import math

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's and Qwen2.5-VL's processors
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternViTRunner's fixed values
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = HALF_STD = (0.5, 0.5, 0.5)  # Qwen3-VL's / Qwen3.5's processors; Phi4MMViTRunner's fixed values
RESCALE = 1.0 / 255.0
TOKENS_PER_TILE = 256  # InternVL and Phi-4-MM: one 448x448 tile is 256 image tokens after the tower

QWEN_NORMALIZATION = {  # the processors' defaults per family (preprocessor_config.json overrides them)
    "qwen2_vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen2_5_vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen3_vl": (HALF_MEAN, HALF_STD),
    "qwen3_5": (HALF_MEAN, HALF_STD),
}


# -- common ---------------------------------------------------------------------------------------------
def _as_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an [H, W, C] uint8 image, got {image.dtype} {image.shape}")
    return image


def normalize(image, mean, std, rescale: float = RESCALE) -> np.ndarray:
    """`[H, W, C]` uint8 -> `[H, W, C]` float32 as the runtime's normalizeImage kernel computes it in fp32:
    `(val / 255.0f - mean[c]) / std[c]` (it divides by 255 whatever the preprocessor's rescale_factor; here
    the divisor is `1 / rescale` in fp32, 255 for the usual 1/255). The kernel then stores fp16: cast the
    result with `.astype(np.float16)` (round to nearest even, as __float2half) for the runtime's values."""
    image = _as_image(image)
    c = image.shape[2]
    mean = np.resize(np.asarray(mean, np.float32), c)
    std = np.resize(np.asarray(std, np.float32), c)
    return (image.astype(np.float32) / np.float32(1.0 / rescale) - mean) / std


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 ----------------------------------------------------------
def qwen_pixel_bounds(min_image_tokens: int, max_image_tokens_per_image: int, patch: int, merge: int):
    """(min_pixels, max_pixels) as QwenViTRunner derives them from the engine's builder_config: image tokens
    times (patch * merge)^2 (not the preprocessor's min_pixels / max_pixels)."""
    factor = patch * merge
    return min_image_tokens * factor * factor, max_image_tokens_per_image * factor * factor


def qwen_target_size(h: int, w: int, patch: int, merge: int, min_pixels: int, max_pixels: int,
                     max_ratio: int = 200) -> tuple[int, int]:
    """The (height, width) QwenViTRunner::getResizedImageSize resizes an `h` x `w` image to (the "smart
    resize" rule): multiples of factor = patch * merge, nearest by round-half-to-even, at least one factor;
    scaled down (floor) past max_pixels, up (ceil) under min_pixels, keeping the aspect ratio.

    The runtime's integer arithmetic differs from transformers' `smart_resize` in four corners (this
    follows the runtime):
    - the aspect-ratio limit is checked with integer division (`max // min > 200`), so 200 < ratio < 201 passes;
    - rounding is clamped to at least one factor *before* the pixel checks (transformers' can round a side to
      0, which then always takes the min_pixels branch);
    - the max_pixels branch has no lower clamp, so a very elongated image can get a side of 0 (transformers
      clamps it to one factor);
    - the min_pixels branch truncates `h * beta` to an integer before the ceiling, so when it lies just
      above a multiple of the factor the runtime keeps that multiple and transformers goes one factor up.
    """
    factor = patch * merge
    if h <= 0 or w <= 0:
        raise ValueError(f"image size {h}x{w}")
    if max(h, w) // min(h, w) > max_ratio:
        raise ValueError(f"absolute aspect ratio must be smaller than {max_ratio}, got {max(h, w) / min(h, w)}")

    def round_even(value: int) -> int:  # to a multiple of factor, halves to the even multiple
        q, r = divmod(value, factor)
        if 2 * r > factor or (2 * r == factor and q % 2):
            q += 1
        return q * factor

    hb, wb = max(factor, round_even(h)), max(factor, round_even(w))
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = int(h / beta) // factor * factor, int(w / beta) // factor * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = -(-int(h * beta) // factor) * factor, -(-int(w * beta) // factor) * factor
    return hb, wb


def qwen_patches(image, patch: int, temporal_patch: int, merge: int, mean, std, rescale: float = RESCALE):
    """One image already at a valid size (both sides multiples of patch * merge) -> (`[h*w, C*tps*p*p]`
    float32 patches, grid `(1, h, w)` in patches), as QwenViTRunner::formatPatch builds them: the frame
    repeated temporal_patch times, normalized, then the rows in merge-block order (block row, block column,
    row in block, column in block) and each row as (channel, frame, pixel row, pixel column): the layout the
    Qwen processors' `pixel_values` have."""
    image = _as_image(image)
    height, width, c = image.shape
    factor = patch * merge
    if height % factor or width % factor:
        raise ValueError(f"image {height}x{width} is not a multiple of patch * merge = {factor} on both sides")
    gh, gw = height // patch, width // patch
    x = normalize(image, mean, std, rescale)
    x = x.reshape(gh // merge, merge, patch, gw // merge, merge, patch, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # block row, block col, row in block, col in block, C, py, px
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch, patch, patch))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch * patch * patch), (1, gh, gw)


# -- InternVL / Phi-4-MM tiles ---------------------------------------------------------------------------
def tile_bounds(min_image_tokens: int, max_image_tokens_per_image: int) -> tuple[int, int]:
    """(min_tiles, max_tiles) as the runtime derives them from builder_config: 256 tokens a tile, one tile
    kept back for the thumbnail, at least one."""
    return (max(1, min_image_tokens // TOKENS_PER_TILE - 1), max(1, max_image_tokens_per_image // TOKENS_PER_TILE - 1))


def _tile_hw(tile) -> tuple[int, int]:
    return (int(tile), int(tile)) if np.ndim(tile) == 0 else (int(tile[0]), int(tile[1]))


def internvl_tile_grid(h: int, w: int, min_tiles: int, max_tiles: int, tile=448) -> tuple[int, int]:
    """(cols, rows) of the tile grid an `h` x `w` image is resized to (multimodal/imageUtils.cpp
    computeBestBlockGridForResize, the same rule as transformers' GotOcr2 `get_optimal_tiled_canvas`): of the
    grids with min_tiles..max_tiles tiles, in order of tile count, the one whose cols/rows is closest to w/h;
    on an exact tie a later (larger) grid wins while the image's area exceeds half the grid's pixels.

    The runtime sorts the candidates with std::sort, which is not stable; libstdc++ sorts lists of up to 16
    by insertion (stable), and ties between grids of the same tile count only arise there unless min_tiles
    >= 10. This keeps the generation order (cols outer, rows inner), as transformers does. The half-area
    threshold is the runtime's integer `(tile_h * tile_w / 2) * tiles` (the same for even tile areas)."""
    th, tw = _tile_hw(tile)
    cands = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = w / h, w * h
    best, best_diff = (1, 1), math.inf
    for c, r in cands:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > (th * tw // 2) * c * r:
            best = (c, r)
    return best


def _tiles(image, tile, mean, std, rescale) -> np.ndarray:
    """`[H, W, C]` uint8 at a whole number of tiles -> `[rows*cols, C, th, tw]` float32, tiles row-major
    (transposeToPatchInternVLPhi4MM's layout)."""
    image = _as_image(image)
    th, tw = _tile_hw(tile)
    height, width, c = image.shape
    if height % th or width % tw:
        raise ValueError(f"image {height}x{width} is not a whole number of {th}x{tw} tiles")
    x = normalize(image, mean, std, rescale).reshape(height // th, th, width // tw, tw, c)
    return np.ascontiguousarray(x.transpose(0, 2, 4, 1, 3)).reshape(-1, c, th, tw)


def internvl_tiles(image, tile=448, use_thumbnail: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   rescale: float = RESCALE, thumbnail=None, force_thumbnail: bool = False) -> np.ndarray:
    """An image already at its grid's size -> `[N, C, tile, tile]` float32, as InternViTRunner feeds the
    tower: the sub-tiles row-major, then the thumbnail (the whole image resized to one tile) when there is
    more than one sub-tile (or `force_thumbnail`: the runtime also adds one when the engine's minimum profile
    is more than one tile). `thumbnail`: the `[tile, tile, C]` uint8 thumbnail if the caller has it (the
    runtime resizes the original image); else `resize_bicubic` of `image`, an approximation."""
    sub = _tiles(image, tile, mean, std, rescale)
    if not (use_thumbnail and (len(sub) > 1 or force_thumbnail)):
        return sub
    th, tw = _tile_hw(tile)
    thumb = resize_bicubic(image, th, tw) if thumbnail is None else thumbnail
    return np.concatenate([sub, _tiles(thumb, tile, mean, std, rescale)])


def phi4mm_crop_grid(h: int, w: int, min_tiles: int, max_tiles: int, crop: int = 448) -> tuple[int, int]:
    """(cols, rows) of Phi4MMViTRunner's HD crop grid: the runtime uses the same rule as InternVL
    (`internvl_tile_grid`, tile bounds from builder_config via `tile_bounds`) and stretches the image to it.

    transformers' Phi4MultimodalImageProcessor.dynamic_preprocess differs (this follows the runtime): it
    takes ceil(w / crop) x ceil(h / crop) crops whenever that is at most its dynamic_hd (36), resizing
    with the aspect ratio kept and padding with white, and only past 36 crops picks the closest aspect ratio
    among 1..36 crops; its global crop is a resize of that padded canvas, the runtime's of the original
    image."""
    return internvl_tile_grid(h, w, min_tiles, max_tiles, crop)


def phi4mm_crops(image, crop: int = 448, mean=HALF_MEAN, std=HALF_STD, rescale: float = RESCALE,
                 thumbnail=None) -> np.ndarray:
    """An image already at its crop grid's size -> `[1 + rows*cols, C, crop, crop]` float32, as
    Phi4MMViTRunner feeds the tower: the global thumbnail FIRST (always), then the sub-crops row-major;
    normalized with 0.5 / 0.5 (the runtime's fixed values). `thumbnail` as in `internvl_tiles`."""
    sub = _tiles(image, crop, mean, std, rescale)
    thumb = resize_bicubic(image, crop, crop) if thumbnail is None else thumbnail
    return np.concatenate([_tiles(thumb, crop, mean, std, rescale), sub])


# -- resize (approximate) and synthetic images -----------------------------------------------------------
def _catmull_rom(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, 1.5 * x ** 3 - 2.5 * x ** 2 + 1,
                    np.where(x < 2, -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2, 0.0))


def _resample_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    scale = n / size
    stretch = max(scale, 1.0)  # widen the kernel when shrinking (antialiasing)
    centers = (np.arange(size) + 0.5) * scale - 0.5
    first = np.floor(centers - 2 * stretch).astype(np.int64) + 1
    taps = first[:, None] + np.arange(int(math.ceil(4 * stretch)) + 1)
    weights = _catmull_rom((taps - centers[:, None]) / stretch)
    weights /= weights.sum(axis=1, keepdims=True)
    taps = np.clip(taps, 0, n - 1)  # clamped edges
    shape = [1] * x.ndim
    shape[axis] = size
    out = np.zeros(x.shape[:axis] + (size,) + x.shape[axis + 1:])
    for k in range(taps.shape[1]):
        out += np.take(x, taps[:, k], axis=axis) * weights[:, k].reshape(shape)
    return out


def resize_bicubic(image, height: int, width: int) -> np.ndarray:
    """`[H, W, C]` uint8 -> `[height, width, C]` uint8 with a separable Catmull-Rom filter and clamped edges,
    the filter the runtime's stb_image_resize call uses. An approximation of its values (not bit-exact):
    used only where the golden data needs an image the runtime would resize (thumbnails)."""
    image = _as_image(image)
    x = image.astype(np.float64)
    if x.shape[0] != height:
        x = _resample_axis(x, height, 0)
    if x.shape[1] != width:
        x = _resample_axis(x, width, 1)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def synthetic_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A deterministic `[h, w, channels]` uint8 test picture: per-channel smooth gradients and a low
    frequency wave, a few filled rectangles and discs, and mild pixel noise; varied enough that a wrong
    patch order or channel order shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    img = np.empty((h, w, channels), np.float64)
    for c in range(channels):
        a, b = rng.uniform(-1.0, 1.0, 2)
        freq, phase = rng.uniform(1.0, 4.0), rng.uniform(0.0, 2 * math.pi)
        img[..., c] = 128 + 70 * (a * xx + b * yy) + 30 * np.sin(2 * math.pi * freq * (xx + 0.5 * yy) + phase)
    for _ in range(3):  # rectangles
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = y0 + rng.integers(1, max(2, h // 2)), x0 + rng.integers(1, max(2, w // 2))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, channels)
    for _ in range(3):  # discs
        cy, cx, rad = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        img[(yy * (h - 1) - cy) ** 2 + (xx * (w - 1) - cx) ** 2 < rad ** 2] = rng.uniform(0, 255, channels)
    img += rng.normal(0.0, 6.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
