"""edgellm_core.image_preprocess (the numpy twins of Edge-LLM 0.7.1's image preprocessing) against
transformers' image processors: the geometry (Qwen target sizes, InternVL / Phi-4-MM tile grids) over sweeps of
image sizes, exactly; and the normalized patches / tiles of images already at a size the runtime does not
resize, to 1e-5.

transformers' image processors import PIL (or torchvision) at the top, which this project's test environment
does not install; `hf_namespace` runs the functions from transformers' own source files with the imports that
resolve. Where PIL is importable the processor classes themselves are called as well.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import math
import types
from pathlib import Path

import numpy as np
import pytest

from edgellm_core import image_preprocess as ip

HF_ROOT = Path(importlib.util.find_spec("transformers").submodule_search_locations[0])
QWEN_PIL = "models/qwen2_vl/image_processing_pil_qwen2_vl.py"
GOT_OCR_PIL = "models/got_ocr2/image_processing_pil_got_ocr2.py"
PHI4 = "models/phi4_multimodal/image_processing_phi4_multimodal.py"


def hf_namespace(relpath: str, cls: str | None = None, **extra) -> dict:
    """The names one of transformers' files defines, from its source: the imports that resolve here, its
    top-level functions (decorators dropped) and, with `cls`, that class's methods as plain functions
    (`self` passed explicitly); `extra` stands in for what does not import."""
    path = HF_ROOT / relpath
    tree = ast.parse(path.read_text())
    package = "transformers." + ".".join(Path(relpath).parts[:-1])
    ns: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            name = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            ns.update({a.asname or a.name: getattr(module, a.name) for a in node.names if hasattr(module, a.name)})
        elif isinstance(node, ast.Import):
            for a in node.names:
                try:
                    module = importlib.import_module(a.name)
                except ImportError:
                    continue
                ns[a.asname or a.name.split(".")[0]] = module if a.asname else importlib.import_module(
                    a.name.split(".")[0])
    ns.update(extra)
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if cls is not None:
        defs += [n for n in next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
                 if isinstance(n, ast.FunctionDef)]
    for node in defs:
        node.decorator_list = []
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), ns)
    return ns


def have_pil() -> bool:
    try:
        import PIL  # noqa: F401
        from transformers.utils import is_vision_available
    except ImportError:
        return False
    return is_vision_available()


# -- Qwen: target size ----------------------------------------------------------------------------------
QWEN_BOUNDS = {  # (patch, min_pixels, max_pixels): the processors' defaults and runtime-derived bounds
    "qwen2 processor": (14, 56 * 56, 28 * 28 * 1280),
    "qwen2 runtime 4..512 tokens": (14, *ip.qwen_pixel_bounds(4, 512, 14, 2)),
    "qwen2 runtime 256..1024 tokens": (14, *ip.qwen_pixel_bounds(256, 1024, 14, 2)),
    "qwen3 processor": (16, 65536, 16777216),
    "qwen3 runtime 4..512 tokens": (16, *ip.qwen_pixel_bounds(4, 512, 16, 2)),
}
# How many of the 429 x 273 sweep's sizes transformers' smart_resize sizes differently, and why (every one
# of them is one of the runtime's documented corners; see qwen_target_size).
QWEN_DISAGREEMENTS = {
    "qwen2 processor": {"zero side": 478, "ratio": 3, "min truncation": 4},
    "qwen2 runtime 4..512 tokens": {"zero side": 478, "ratio": 3, "min truncation": 4},
    "qwen2 runtime 256..1024 tokens": {"zero side": 23, "ratio": 3, "min truncation": 781},
    "qwen3 processor": {"zero side": 173, "ratio": 3, "min truncation": 248},
    "qwen3 runtime 4..512 tokens": {"zero side": 725, "ratio": 3, "min truncation": 3},
}


def _why(h, w, f, lo, hi, ours):
    """Which documented corner separates the runtime's size from transformers'."""
    if 200 < max(h, w) / min(h, w) < 201:
        return "ratio"  # integer division lets it through
    if round(h / f) == 0 or round(w / f) == 0:
        return "zero side"  # transformers rounds a side to 0, then always takes the min_pixels branch
    if 0 in ours:
        return "zero floor"  # the runtime's max_pixels branch has no lower clamp
    if max(f, round(h / f) * f) * max(f, round(w / f) * f) < lo:
        beta = math.sqrt(lo / (h * w))
        if any(math.ceil(v * beta / f) != -(-int(v * beta) // f) for v in (h, w)):
            return "min truncation"
    return "unexplained"


@pytest.mark.parametrize("name", sorted(QWEN_BOUNDS))
def test_qwen_target_size_against_smart_resize(name):
    smart_resize = hf_namespace(QWEN_PIL)["smart_resize"]
    patch, lo, hi = QWEN_BOUNDS[name]
    f = 2 * patch
    why: dict[str, int] = {}
    agree = 0
    sizes = [(h, w) for h in range(1, 3000, 7) for w in range(1, 3000, 11)]
    for h, w in sizes:
        try:
            theirs = smart_resize(h, w, f, lo, hi)
        except ValueError:
            theirs = None
        try:
            ours = ip.qwen_target_size(h, w, patch, 2, lo, hi)
        except ValueError:
            ours = None
        if ours == theirs:
            agree += 1
        else:
            key = _why(h, w, f, lo, hi, ours)
            why[key] = why.get(key, 0) + 1
    assert len(sizes) == 117117
    assert why == QWEN_DISAGREEMENTS[name]
    assert agree == len(sizes) - sum(why.values())


def test_qwen_target_size_runtime_corners():
    smart_resize = hf_namespace(QWEN_PIL)["smart_resize"]
    lo, hi = 56 * 56, 28 * 28 * 1280
    # a side under half a factor: the runtime clamps it to one factor first
    assert ip.qwen_target_size(1, 100, 14, 2, lo, hi) == (28, 112)
    assert smart_resize(1, 100, 28, lo, hi) == (28, 560)
    # min_pixels branch: 53 * beta = 616.37..; the runtime truncates to 616 = 22 factors, transformers goes to 23
    lo256, hi1024 = ip.qwen_pixel_bounds(256, 1024, 14, 2)
    assert ip.qwen_target_size(28, 53, 14, 2, lo256, hi1024) == (336, 616)
    assert smart_resize(28, 53, 28, lo256, hi1024) == (336, 644)
    # max_pixels branch, tiny budget: the runtime floors a side to 0, transformers keeps one factor
    assert ip.qwen_target_size(40, 7960, 14, 2, 3136, 64 * 784) == (0, 3136)
    assert smart_resize(40, 7960, 28, 3136, 64 * 784) == (28, 3136)
    # aspect ratio 200.5: integer division passes it
    assert ip.qwen_target_size(2, 401, 14, 2, lo, hi) == (28, 392)
    with pytest.raises(ValueError):
        smart_resize(2, 401, 28, lo, hi)
    with pytest.raises(ValueError):
        ip.qwen_target_size(1, 201, 14, 2, lo, hi)
    # ordinary sizes agree, halves round to even
    for h, w in ((480, 640), (1080, 1920), (42, 70), (700, 30), (3000, 4000)):
        assert ip.qwen_target_size(h, w, 14, 2, lo, hi) == smart_resize(h, w, 28, lo, hi)


# -- Qwen: patches ---------------------------------------------------------------------------------------
QWEN_FAMILIES = {  # patch, (mean, std): Qwen2-VL's / Qwen2.5-VL's processor, and Qwen3-VL's settings
    "qwen2_5_vl": (14, ip.QWEN_NORMALIZATION["qwen2_5_vl"]),
    "qwen3_vl": (16, ip.QWEN_NORMALIZATION["qwen3_vl"]),
}


def _hf_qwen_patches(image, patch, mean, std):
    """Qwen2VLImageProcessorPil._preprocess with do_resize False: rescale, normalize, patchify (its code)."""
    from transformers.image_transforms import normalize, rescale
    from transformers.image_utils import ChannelDimension

    ns = hf_namespace(QWEN_PIL, cls="Qwen2VLImageProcessorPil")
    first = ChannelDimension.FIRST
    chw = image.transpose(2, 0, 1)
    x = rescale(chw, 1 / 255, data_format=first, input_data_format=first)
    x = normalize(x, mean, std, data_format=first, input_data_format=first)
    flat, gh, gw = ns["patchify"](None, x, patch_size=patch, merge_size=2, temporal_patch_size=2)
    return flat, (1, gh, gw)


@pytest.mark.parametrize("family", sorted(QWEN_FAMILIES))
def test_qwen_patches_against_processor(family):
    patch, (mean, std) = QWEN_FAMILIES[family]
    smart_resize = hf_namespace(QWEN_PIL)["smart_resize"]
    f = 2 * patch
    for i, (bh, bw) in enumerate(((6, 10), (2, 4), (1, 4), (7, 3))):
        image = ip.synthetic_image(bh * f, bw * f, seed=i)
        ours, grid = ip.qwen_patches(image, patch, 2, 2, mean, std)
        theirs, their_grid = _hf_qwen_patches(image, patch, mean, std)
        assert grid == their_grid == (1, 2 * bh, 2 * bw)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape == (4 * bh * bw, 3 * 2 * patch * patch)
        assert float(np.abs(ours - theirs).max()) <= 1e-5
        # the processor's own resize leaves these sizes alone, and so would the runtime's
        assert smart_resize(bh * f, bw * f, f, 56 * 56, 28 * 28 * 1280) == (bh * f, bw * f)
        assert ip.qwen_target_size(bh * f, bw * f, patch, 2, 56 * 56, 28 * 28 * 1280) == (bh * f, bw * f)
    with pytest.raises(ValueError):
        ip.qwen_patches(ip.synthetic_image(f, f + patch, 0), patch, 2, 2, mean, std)


def test_qwen_patch_layout_by_hand():
    """Row 1 is the second patch of the first merge block (row 0, column 1 in patches); each row is (channel,
    frame, pixel row, pixel column) with both frames equal."""
    image = ip.synthetic_image(56, 84, seed=5)
    rows, grid = ip.qwen_patches(image, 14, 2, 2, ip.HALF_MEAN, ip.HALF_STD)
    assert grid == (1, 4, 6)
    norm = ip.normalize(image, ip.HALF_MEAN, ip.HALF_STD)
    r = rows.reshape(24, 3, 2, 14, 14)
    np.testing.assert_array_equal(r[1, :, 0], norm[0:14, 14:28].transpose(2, 0, 1))
    np.testing.assert_array_equal(r[2, :, 1], norm[14:28, 0:14].transpose(2, 0, 1))
    np.testing.assert_array_equal(r[4, :, 0], norm[0:14, 28:42].transpose(2, 0, 1))  # next merge block
    np.testing.assert_array_equal(r[:, :, 0], r[:, :, 1])
    # the runtime's fp32 arithmetic: val / 255.0f, minus mean, over std
    v = np.float32(image[0, 14, 2])
    assert r[1, 2, 0, 0, 0] == (v / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


@pytest.mark.skipif(not have_pil(), reason="PIL is not installed: the processor classes cannot be built")
def test_qwen_processor_class_when_pil_is_there():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    for family, (patch, (mean, std)) in QWEN_FAMILIES.items():
        proc = Qwen2VLImageProcessorPil(patch_size=patch, image_mean=list(mean), image_std=list(std))
        images = [ip.synthetic_image(6 * 2 * patch, 10 * 2 * patch, 1), ip.synthetic_image(4 * patch, 8 * patch, 2)]
        for do_resize in (False, True):  # at these sizes the processor's resize is the identity
            out = proc(images=images, do_resize=do_resize, return_tensors="np")
            ours = [ip.qwen_patches(im, patch, 2, 2, mean, std) for im in images]
            assert [tuple(g) for g in out["image_grid_thw"]] == [g for _, g in ours], family
            assert float(np.abs(np.concatenate([p for p, _ in ours]) - out["pixel_values"]).max()) <= 1e-5


# -- InternVL: grid and tiles ----------------------------------------------------------------------------
@pytest.mark.parametrize("bounds", [(1, 12), (1, 6), (2, 8), (1, 36)])
def test_internvl_tile_grid_against_got_ocr2(bounds):
    canvas = hf_namespace(GOT_OCR_PIL)["get_optimal_tiled_canvas"]
    lo, hi = bounds
    sizes = [(h, w) for h in range(10, 4000, 23) for w in range(10, 4000, 29)]
    sizes += [(448 * r, 448 * c) for r in range(1, 7) for c in range(1, 7)] + [(448, 560), (896, 1120), (100, 125)]
    wrong = [(h, w) for h, w in sizes
             if ip.internvl_tile_grid(h, w, lo, hi, 448) != tuple(canvas((h, w), (448, 448), lo, hi))]
    assert len(sizes) == 24051 and wrong == []


def test_internvl_tile_grid_ties():
    # with 1..2 tiles, 3:2 lies halfway between 1x1 and 2x1: 2x1 wins once the image covers half of its tiles
    assert ip.internvl_tile_grid(448, 672, 1, 2, 448) == (2, 1)
    assert ip.internvl_tile_grid(100, 150, 1, 2, 448) == (1, 1)
    canvas = hf_namespace(GOT_OCR_PIL)["get_optimal_tiled_canvas"]
    assert canvas((448, 672), (448, 448), 1, 2) == (2, 1) and canvas((100, 150), (448, 448), 1, 2) == (1, 1)
    # square images: 2x2 ties with 1x1 and wins once the image covers more than half of its 4 tiles
    assert ip.internvl_tile_grid(896, 896, 1, 12, 448) == (2, 2)
    assert ip.internvl_tile_grid(633, 633, 1, 12, 448) == (1, 1)
    assert ip.internvl_tile_grid(634, 634, 1, 12, 448) == (2, 2)
    assert ip.tile_bounds(256, 512) == (1, 1) and ip.tile_bounds(256, 13 * 256) == (1, 12)
    assert ip.tile_bounds(1024, 3328) == (3, 12)


def _hf_crop_to_patches(image, lo, hi, tile, mean, std):
    """GotOcr2ImageProcessorPil's crop_to_patches path: crop_image_to_patches, then rescale and normalize
    each patch (its code). Without PIL its resize is stood in for: the identity at the same size (what PIL's
    resize is), `resize_bicubic` otherwise (the thumbnail; only its shape is compared)."""
    from transformers.image_transforms import normalize, rescale
    from transformers.image_utils import ChannelDimension, SizeDict

    def resize(img, size, resample=None, **_):
        if img.shape[-2:] == (size.height, size.width):
            return img
        return ip.resize_bicubic(img.transpose(1, 2, 0), size.height, size.width).transpose(2, 0, 1)

    # transformers' get_image_size tests for a PIL image first, which fails without PIL: (H, W) of a CHW array
    ns = hf_namespace(GOT_OCR_PIL, cls="GotOcr2ImageProcessorPil", get_image_size=lambda im, channel_dim: im.shape[-2:])
    crops = ns["crop_image_to_patches"](types.SimpleNamespace(resize=resize), image.transpose(2, 0, 1), lo, hi,
                                        patch_size=SizeDict(height=tile, width=tile))
    first = ChannelDimension.FIRST
    return [normalize(rescale(c, 1 / 255, data_format=first, input_data_format=first), mean, std,
                      data_format=first, input_data_format=first) for c in crops]


@pytest.mark.parametrize("rows_cols", [(2, 3), (1, 1), (3, 1), (2, 2)])
def test_internvl_tiles_against_crop_to_patches(rows_cols):
    rows, cols = rows_cols
    tile = 448
    image = ip.synthetic_image(rows * tile, cols * tile, seed=rows * 10 + cols)
    assert ip.internvl_tile_grid(*image.shape[:2], 1, 12, tile) == (cols, rows)
    ours = ip.internvl_tiles(image, tile, True, ip.IMAGENET_MEAN, ip.IMAGENET_STD)
    theirs = _hf_crop_to_patches(image, 1, 12, tile, ip.IMAGENET_MEAN, ip.IMAGENET_STD)
    n = rows * cols
    assert len(theirs) == len(ours) == (n + 1 if n > 1 else 1)
    assert ours.dtype == np.float32 and ours.shape[1:] == (3, tile, tile)
    for k in range(n):  # sub-tiles row-major: exact
        assert float(np.abs(ours[k] - theirs[k]).max()) <= 1e-5
    if n > 1:  # the thumbnail: a resize, only its shape
        assert theirs[-1].shape == ours[-1].shape == (3, tile, tile)
    assert len(ip.internvl_tiles(image, tile, False)) == n
    assert len(ip.internvl_tiles(ip.synthetic_image(tile, tile, 0), tile, True, force_thumbnail=True)) == 2


@pytest.mark.skipif(not have_pil(), reason="PIL is not installed: the processor classes cannot be built")
def test_internvl_processor_class_when_pil_is_there():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                    max_patches=12, image_mean=list(ip.IMAGENET_MEAN), image_std=list(ip.IMAGENET_STD))
    image = ip.synthetic_image(896, 1344, 3)
    out = proc(images=[image], return_tensors="np")
    ours = ip.internvl_tiles(image, 448)
    assert list(out["num_patches"]) == [7] and out["pixel_values"].shape == ours.shape
    assert float(np.abs(ours[:6] - out["pixel_values"][:6]).max()) <= 1e-5
    assert float(np.abs(ours[6].astype(np.float64) - out["pixel_values"][6]).mean()) < 0.05  # thumbnails: close


# -- Phi-4-MM ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _phi4_namespace() -> dict:
    tv = types.SimpleNamespace(resize=lambda image, size: image, pad=lambda image, padding, fill=None: image)
    return hf_namespace(PHI4, cls="Phi4MultimodalImageProcessor", tvF=tv)


def _hf_phi4_grid(h, w, max_crops=36, crop=448):
    """(cols, rows) Phi4MultimodalImageProcessor.dynamic_preprocess picks (its code; torchvision's resize
    and pad stood in for, their results unused), read off the attention mask it returns."""
    ns = _phi4_namespace()
    this = types.SimpleNamespace()
    this.find_closest_aspect_ratio = lambda *a: ns["find_closest_aspect_ratio"](this, *a)
    mask_size = crop // 14
    image = types.SimpleNamespace(shape=(3, h, w), device="cpu")
    _, mask = ns["dynamic_preprocess"](this, image, crop, 14, mask_size, max_num=max_crops)
    return mask.shape[1] // mask_size, mask.shape[0] // mask_size


def test_phi4mm_crop_grid_against_transformers():
    """The runtime picks the closest aspect ratio always; transformers only past 36 ceil-crops (else the
    ceil grid, aspect kept and padded). Both with 1..36 crops: equal where transformers takes the aspect-ratio
    branch, and mostly different where it takes the ceil grid."""
    lo, hi = ip.tile_bounds(256, 37 * 256)
    assert (lo, hi) == (1, 36)
    ratio_branch = ceil_branch = ceil_same = 0
    for h in range(16, 6000, 61):
        for w in range(16, 6000, 67):
            try:
                theirs = _hf_phi4_grid(h, w)
            except ValueError:  # transformers refuses very elongated images
                continue
            ours = ip.phi4mm_crop_grid(h, w, lo, hi, 448)
            if math.ceil(h / 448) * math.ceil(w / 448) > 36:
                ratio_branch += 1
                assert ours == theirs, (h, w)
            else:
                ceil_branch += 1
                ceil_same += ours == theirs
                assert theirs == (math.ceil(w / 448), math.ceil(h / 448))
    assert (ratio_branch, ceil_branch, ceil_same) == (4660, 4250, 753)
    # e.g. 500 x 500: transformers pads to 2 x 2 crops, the runtime stretches to 1 x 1
    assert _hf_phi4_grid(500, 500) == (2, 2) and ip.phi4mm_crop_grid(500, 500, 1, 36) == (1, 1)
    assert _hf_phi4_grid(896, 1344) == ip.phi4mm_crop_grid(896, 1344, 1, 36) == (3, 2)


def test_phi4mm_crops_layout():
    image = ip.synthetic_image(448 * 2, 448 * 3, seed=7)
    thumb = ip.synthetic_image(448, 448, seed=8)
    crops = ip.phi4mm_crops(image, 448, thumbnail=thumb)
    assert crops.shape == (7, 3, 448, 448) and crops.dtype == np.float32
    norm = ip.normalize(image, ip.HALF_MEAN, ip.HALF_STD)
    np.testing.assert_array_equal(crops[0], ip.normalize(thumb, ip.HALF_MEAN, ip.HALF_STD).transpose(2, 0, 1))
    for k in range(6):
        r, c = divmod(k, 3)
        block = norm[r * 448:(r + 1) * 448, c * 448:(c + 1) * 448]
        np.testing.assert_array_equal(crops[1 + k], block.transpose(2, 0, 1))
    assert float(crops.min()) >= -1.0 and float(crops.max()) <= 1.0


# -- synthetic images and the approximate resize --------------------------------------------------------
def test_synthetic_image():
    a = ip.synthetic_image(168, 280, seed=3)
    assert a.shape == (168, 280, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, ip.synthetic_image(168, 280, seed=3))
    assert not np.array_equal(a, ip.synthetic_image(168, 280, seed=4))
    assert all(float(a[..., c].std()) > 20 for c in range(3))
    assert len(np.unique(a)) > 150
    assert float(np.abs(np.diff(a.astype(np.int16), axis=1)).mean()) < 20  # smooth-ish, not white noise


def test_resize_bicubic():
    image = ip.synthetic_image(200, 300, seed=1)
    np.testing.assert_array_equal(ip.resize_bicubic(image, 200, 300), image)
    flat = np.full((90, 70, 3), 77, np.uint8)
    np.testing.assert_array_equal(ip.resize_bicubic(flat, 31, 120), np.full((31, 120, 3), 77, np.uint8))
    small = ip.resize_bicubic(image, 100, 448)
    assert small.shape == (100, 448, 3)
    if have_pil():  # PIL's bicubic is the same Catmull-Rom filter (edges handled a little differently)
        from PIL import Image

        for h, w in ((100, 448), (448, 448), (57, 91)):
            theirs = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
            assert float(np.abs(ip.resize_bicubic(image, h, w).astype(float) - theirs).mean()) < 1.0


# -- the Qwen golden inputs ------------------------------------------------------------------------------
def test_qwen_golden_patches_are_synthetic_images():
    from edgellm_export.visual import qwen2_5_vl, qwen2_vl, qwen3_vl
    from edgellm_export.visual.qwen_vit import QwenTower, golden_patches

    tower = dict(hidden=64, heads=4, depth=1, intermediate=128, temporal_patch_size=2, channels=3, merge=2,
                 out_hidden=32, rope_theta=10000.0)
    specs = {
        "qwen2_vl": (QwenTower(patch_size=14, **tower), qwen2_vl.GOLDEN_GRIDS),
        "qwen2_5_vl": (qwen2_5_vl.QwenVisionSpec(patch_size=14, window_size=112, full_blocks=(0,), **tower),
                       qwen2_5_vl.GOLDEN_GRIDS),
        "qwen3_vl": (qwen3_vl.Qwen3VisionSpec(patch_size=16, num_positions=64, deepstack=(), **tower),
                     qwen3_vl.GOLDEN_GRIDS),
    }
    for family, (spec, grids) in specs.items():
        mean, std = ip.QWEN_NORMALIZATION[family]
        p = spec.patch_size
        want = np.concatenate([ip.qwen_patches(ip.synthetic_image(h * p, w * p, 20261202 + i), p, 2, 2, mean, std)[0]
                               for i, (_, h, w) in enumerate(grids)]).astype(np.float16)
        got = golden_patches(spec, grids)
        assert got.dtype == np.float16 and got.shape == (sum(t * h * w for t, h, w in grids), spec.patch_dim)
        np.testing.assert_array_equal(got, want, err_msg=family)
        assert all(t == 1 for t, _, _ in grids)
