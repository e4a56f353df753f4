"""Phi-4-multimodal's vision tower (families.md §5.4), both faces, in both checkpoint layouts: transformers'
(`phi4_multimodal`: `img_projection_up/down`, `global/sub_img_feature_extensor`, sizes in `vision_config`) and
the original release's (`phi4mm`: `img_projection.0/2`, `glb_GN`, `sub_GN`), whose names `prepare` maps to the
transformers ones. All under `model.embed_tokens_extend.image_embed.` (canonical `embed_tokens_extend.image_embed.`).

Graph: `input` fp16 `[N, C, S, S]` (N crops: per image its global thumbnail, then its sub-crops) -> SigLIP
patch embedding (a stride = kernel Conv, as patchify + MatMul) + position table -> the encoder layers up to
`feature_layer` (LayerNorm, biased q/k/v/out, attention decomposed as MatMul -> Softmax -> MatMul, tanh-GELU
MLP) -> 2x2 average pool -> projection (Linear, exact GELU, Linear) -> `output` fp16 `[N * 256, text_hidden]`.
The layers after the feature layer, `post_layernorm` and the pooling `head` do not reach the features: they are
checked and left out.

The runtime then lays each image's crops out as the HD transform does (multimodal.phi4mm_hd_layout) with two
separator rows it reads from `phi4mm_gn_proj.safetensors` (`glb_GN`, `sub_GN`: the checkpoint's separators
already through the projection, fp16 `[text_hidden]`). 0.7.1's runner fixes 448 px crops of 16 x 16 tokens and
expands placeholder id 200010: a checkpoint that differs is refused rather than exported to run wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.multimodal import PHI4MM_SIDECAR
from edgellm_core.onnx_graph.builder import FLOAT16, GraphBuilder

from ..encoder_ops import EagerOps, GraphOps
from ..encoders import config_fields, number

EMBED = "embed_tokens_extend.image_embed."
TOWER = EMBED + "img_processor."
UP, DOWN = EMBED + "img_projection_up", EMBED + "img_projection_down"
GLB, SUB = EMBED + "global_img_feature_extensor", EMBED + "sub_img_feature_extensor"
PREFIXES = (EMBED,)
INPUT, OUTPUT = "input", "output"
SIDECAR = PHI4MM_SIDECAR
RUNTIME_CROP, RUNTIME_TOKENS_PER_SIDE, RUNTIME_IMAGE_TOKEN = 448, 16, 200010  # phi4mmViTRunner's constants
_ORIGINAL_NAMES = {"img_projection.0": "img_projection_up", "img_projection.2": "img_projection_down",
                   "glb_GN": "global_img_feature_extensor", "sub_GN": "sub_img_feature_extensor"}
# The released tower (SigLIP-so400m), which the original layout's config.json does not describe: used only when
# the checkpoint's tensors have exactly these sizes (checked in `parse` against the headers).
_STOCK_SIGLIP = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 448, "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
GOLDEN_BLOCKS = (1, 2)  # the golden image: a global crop and a 1 x 2 grid of sub-crops


@dataclass(frozen=True)
class Phi4VisionSpec:
    hidden: int
    heads: int
    layers: int  # encoder layers the features go through (feature_layer applied)
    intermediate: int
    image_size: int
    patch_size: int
    channels: int
    eps: float
    text_hidden: int
    total_layers: int
    original_layout: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        return (self.grid // 2) ** 2


def _vision_config(raw: dict) -> dict:
    v = raw.get("vision_config")
    return v if isinstance(v, dict) else dict(_STOCK_SIGLIP)  # the original layout's: `prepare` checks it


def parse(raw: dict, text_hidden: int, path: Path) -> Phi4VisionSpec:
    """The tower's shape from config.json (`vision_config`; the original layout has none and means the released
    SigLIP, which `prepare` checks against the tensors); refuses what the 0.7.1 runner cannot run."""
    original = raw.get("model_type") == "phi4mm"
    v = _vision_config(raw)
    embd = _image_embd_layer(raw) if original else {}
    need = config_fields(v, "vision_config", path)
    total = need("num_hidden_layers")
    feature = embd.get("layer_idx", v.get("feature_layer", -2)) if original else v.get("feature_layer", -2)
    crop = embd.get("crop_size", RUNTIME_CROP) if original else v.get("crop_size", RUNTIME_CROP)
    image, patch = need("image_size", size=False), need("patch_size", size=False)  # checked below, with the crop
    problems = []
    if not isinstance(feature, int) or isinstance(feature, bool) or not -total <= feature < 0:
        problems.append(f"feature_layer {feature!r} (a negative layer index within the {total} layers)")
        feature = -1
    spec = Phi4VisionSpec(hidden=need("hidden_size"), heads=need("num_attention_heads"), layers=total + feature + 1,
                          intermediate=need("intermediate_size"), image_size=image, patch_size=patch,
                          channels=need("num_channels", default=3),
                          eps=number(need("layer_norm_eps", default=1e-6, size=False), "vision_config.layer_norm_eps",
                                     path),
                          text_hidden=text_hidden, total_layers=total, original_layout=original)
    if v.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new"):
        problems.append(f"hidden_act {v.get('hidden_act')!r} (supported: gelu_pytorch_tanh)")
    if spec.hidden % spec.heads:
        problems.append(f"hidden_size {spec.hidden} does not split into {spec.heads} heads")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (image, patch, crop)):
        problems.append(f"image_size {image!r} / patch_size {patch!r} / crop_size {crop!r} (square sizes as integers)")
    elif crop != RUNTIME_CROP or image != crop or image % patch or spec.grid != 2 * RUNTIME_TOKENS_PER_SIDE:
        problems.append(f"crop_size {crop} / image_size {image} / patch_size {patch}: Edge-LLM 0.7.1's Phi-4-MM "
                        f"runner takes {RUNTIME_CROP} px crops of {RUNTIME_TOKENS_PER_SIDE} x "
                        f"{RUNTIME_TOKENS_PER_SIDE} tokens (a {2 * RUNTIME_TOKENS_PER_SIDE}-patch grid pooled 2 x 2)")
    token = image_token_id(raw)
    if token != RUNTIME_IMAGE_TOKEN:
        problems.append(f"image_token_id {token!r}: Edge-LLM 0.7.1's Phi-4-MM runner expands placeholder id "
                        f"{RUNTIME_IMAGE_TOKEN} only")
    if problems:
        raise UnsupportedError("the Phi-4-MM vision tower cannot be exported: " + "; ".join(problems), path)
    return spec


def _image_embd_layer(raw: dict) -> dict:
    """The original layout's `embd_layer.image_embd_layer` (empty when absent or not an object)."""
    embd = raw.get("embd_layer") if isinstance(raw.get("embd_layer"), dict) else {}
    image = embd.get("image_embd_layer")
    return image if isinstance(image, dict) else {}


def image_token_id(raw: dict):
    v = raw.get("vision_config")
    return v.get("image_token_id", RUNTIME_IMAGE_TOKEN) if isinstance(v, dict) else RUNTIME_IMAGE_TOKEN


def runtime_config(raw: dict, spec: Phi4VisionSpec, ckpt_dir: Path) -> dict:
    """visual/config.json (families.md §7): what the 0.7.1 builder and Phi4MMViTRunner read: `model_type`
    phi4mm (the one they know, whichever layout), `vocab_size`, `embd_layer.image_embd_layer.crop_size`."""
    embd = dict(raw.get("embd_layer")) if isinstance(raw.get("embd_layer"), dict) else {}
    embd["image_embd_layer"] = {**_image_embd_layer(raw), "crop_size": spec.image_size}
    vision = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else _STOCK_SIGLIP
    # visual_build reads vision_config.model_type before the top level's; 0.7.1 knows neither
    # phi4_multimodal_vision nor phi4_multimodal, only phi4mm
    return {"model_type": "phi4mm", "vocab_size": raw.get("vocab_size"), "embd_layer": embd,
            "vision_config": {**vision, "model_type": "phi4mm", "num_channels": spec.channels},
            "image_token_id": RUNTIME_IMAGE_TOKEN, "tokens_per_tile": spec.tokens_per_crop}


def preprocessor_problems(pre: dict, s: Phi4VisionSpec) -> list[str]:
    """The processor's crop size against the tower's."""
    out = []
    for key in ("crop_size", "dynamic_hd_crop_size"):
        value = pre.get(key)
        if isinstance(value, dict):
            value = value.get("height")
        if isinstance(value, int) and value != s.image_size:
            out.append(f"{key} is {value}, but the tower's crops are {s.image_size}")
    return out


def prepare(ckpt, s: Phi4VisionSpec) -> None:
    """The original layout: its projection and separators under the transformers names; the stock tower its
    config.json does not describe is checked against the tensors (a smaller one needs a vision_config)."""
    if not s.original_layout:
        return
    for old, new in _ORIGINAL_NAMES.items():
        for suffix in ("", ".weight", ".bias"):
            ckpt.rename(EMBED + old + suffix, EMBED + new + suffix)
    name = TOWER + "embeddings.patch_embedding.weight"
    if ckpt.has(name) and ckpt.ref(name).shape[0] != s.hidden:
        raise ExportError(f"config.json has no vision_config, and the tower is not the released one (hidden "
                          f"{ckpt.ref(name).shape[0]}, not {s.hidden}); add the tower's vision_config",
                          ckpt.config_path)


# -- graph face ---------------------------------------------------------------------------------------
def linear_names(s: Phi4VisionSpec) -> list[str]:
    """The linears the features go through, for quantization metadata (visual._tower_quant)."""
    layers = [f"{TOWER}encoder.layers.{i}.{m}" for i in range(s.layers)
              for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                        "mlp.fc2")]
    return layers + [UP, DOWN]


def emit_graph(g: GraphBuilder, w, s: Phi4VisionSpec) -> None:
    """The tower into `g`, weights through `w` (models.weights.WeightSource)."""
    ops, n, i64 = GraphOps(g, w), g.node, g.i64
    c, p, grid, d = s.hidden, s.patch_size, s.grid, s.hidden // s.heads
    x = g.input(INPUT, FLOAT16, ["num_crops", s.channels, s.image_size, s.image_size])
    patches = n("Reshape", [x, i64(0, s.channels, grid, p, grid, p)])
    patches = n("Reshape", [n("Transpose", [patches], {"perm": [0, 2, 4, 1, 3, 5]}),
                            i64(0, grid * grid, s.channels * p * p)])
    h = ops.patch_embed(patches, TOWER + "embeddings.patch_embedding", (c, s.channels, p, p), bias=True)
    h = n("Add", [h, w.tensor(TOWER + "embeddings.position_embedding.weight", (grid * grid, c))])
    scale = g.const(np.array(1 / math.sqrt(d), np.float16))
    for i in range(s.layers):
        g.scope = f"vision.layer.{i}"
        pre = f"{TOWER}encoder.layers.{i}."
        y = ops.layer_norm(h, pre + "layer_norm1", c, s.eps)
        q, k, v = (ops.linear(y, f"{pre}self_attn.{m}_proj", c, c) for m in "qkv")

        def heads(t, perm=(0, 2, 1, 3)):
            return n("Transpose", [n("Reshape", [t, i64(0, 0, s.heads, d)])], {"perm": list(perm)})

        probs = ops.fp16(n("Softmax", [ops.fp32(n("MatMul", [n("Mul", [heads(q), scale]), heads(k, (0, 2, 3, 1))]))],
                           {"axis": -1}))
        attn = n("Reshape", [n("Transpose", [n("MatMul", [probs, heads(v)])], {"perm": [0, 2, 1, 3]}),
                             i64(0, 0, c)])
        h = n("Add", [h, ops.linear(attn, pre + "self_attn.out_proj", c, c)])
        y = ops.layer_norm(h, pre + "layer_norm2", c, s.eps)
        h = n("Add", [h, ops.linear(ops.gelu(ops.linear(y, pre + "mlp.fc1", s.intermediate, c), tanh=True),
                                    pre + "mlp.fc2", c, s.intermediate)])
    g.scope = "vision.head"
    half = grid // 2  # 2x2 average pool over the patch grid, in fp32, rounded once
    pooled = n("ReduceMean", [ops.fp32(n("Reshape", [h, i64(0, half, 2, half, 2, c)])), i64(2, 4)], {"keepdims": 0})
    y = n("Reshape", [ops.fp16(pooled), i64(0, half * half, c)])
    y = ops.linear(ops.gelu(ops.linear(y, UP, s.text_hidden, c)), DOWN, s.text_hidden, s.text_hidden)
    g.scope = ""
    for name, shape in ((GLB, (1, 1, c)), (SUB, (1, 1, 1, c))):
        w.ref(name, shape)  # the separators: read into the sidecar (write_sidecars), checked here
    _skip_unread(w, s)
    g.output(n("Reshape", [y, i64(-1, s.text_hidden)]), OUTPUT, FLOAT16, ["num_image_tokens", s.text_hidden])


def _skip_unread(w, s: Phi4VisionSpec) -> None:
    """The layers after the feature layer, post_layernorm and the pooling head never reach the features: marked
    as accounted for (they exist in every checkpoint; leaving them out changes nothing)."""
    ckpt = w.ckpt
    later = tuple(f"{TOWER}encoder.layers.{i}." for i in range(s.layers, s.total_layers))
    for name in ckpt.names():
        if name.startswith(later + (TOWER + "post_layernorm.", TOWER + "head.")):
            w.used.add(name)


def write_sidecars(out: Path, s: Phi4VisionSpec, ckpt, weights) -> None:
    """phi4mm_gn_proj.safetensors: the two separators through the projection as the graph computes it."""
    import torch
    from safetensors.torch import save_file

    ops = EagerOps(weights)
    rows = torch.stack([ckpt.ref(name).view().reshape(-1).half().float() for name in (GLB, SUB)])
    proj = ops.linear(ops.gelu(ops.linear(rows, UP)), DOWN).half()
    save_file({"glb_GN": proj[0].contiguous(), "sub_GN": proj[1].contiguous()}, str(out / SIDECAR))
    (out / SIDECAR).chmod(0o644)


def golden_inputs(s: Phi4VisionSpec) -> dict[str, np.ndarray]:
    """One synthetic image as Phi4MMViTRunner crops it (edgellm_core/image_preprocess.py): at its GOLDEN_BLOCKS
    grid's size (no resize), its global thumbnail (resized with an approximation of the runtime's filter), then
    the sub-crops row-major, normalized with the runtime's 0.5 / 0.5: `[3, C, S, S]` fp16."""
    from edgellm_core.image_preprocess import phi4mm_crops, synthetic_image

    hb, wb = GOLDEN_BLOCKS
    image = synthetic_image(hb * s.image_size, wb * s.image_size, seed=20261203, channels=s.channels)
    return {INPUT: phi4mm_crops(image, crop=s.image_size).astype(np.float16)}


def golden_image(s: Phi4VisionSpec) -> dict:
    """The golden image for the LLM's image scenario: its crops' rows laid out by the HD transform (with the
    sidecar's separators) before they are scattered; plain RoPE."""
    hb, wb = GOLDEN_BLOCKS
    count = s.tokens_per_crop * hb * wb + RUNTIME_TOKENS_PER_SIDE * hb + 1 + s.tokens_per_crop + RUNTIME_TOKENS_PER_SIDE
    return {"counts": [count], "grids": None, "merge": None,
            "assemble": {"kind": "phi4mm_hd", "blocks": [list(GOLDEN_BLOCKS)], "sidecar": SIDECAR}}


# -- eager face -------------------------------------------------------------------------------------
def eager(inputs: dict, t: dict, s: Phi4VisionSpec):
    """What the graph computes, in torch: `[N, C, S, S]` crops -> `[N * tokens, text_hidden]` fp32 holding fp16."""
    import torch

    ops, r16 = EagerOps(t), EagerOps.r16
    c, p, grid, d = s.hidden, s.patch_size, s.grid, s.hidden // s.heads
    x = torch.from_numpy(inputs[INPUT]).float()
    nc = x.shape[0]
    patches = x.reshape(nc, s.channels, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(nc, grid * grid, -1)
    h = ops.patch_embed(patches, TOWER + "embeddings.patch_embedding", bias=True)
    h = r16(h + ops.f(TOWER + "embeddings.position_embedding.weight"))
    scale = float(np.float16(1 / math.sqrt(d)))
    for i in range(s.layers):
        pre = f"{TOWER}encoder.layers.{i}."
        y = ops.layer_norm(h, pre + "layer_norm1", s.eps)
        q, k, v = (ops.linear(y, f"{pre}self_attn.{m}_proj").reshape(nc, -1, s.heads, d).transpose(1, 2)
                   for m in "qkv")
        probs = r16(torch.softmax(r16(r16(q * scale) @ k.transpose(-1, -2)), dim=-1))
        attn = r16(probs @ v).transpose(1, 2).reshape(nc, -1, c)
        h = r16(h + ops.linear(attn, pre + "self_attn.out_proj"))
        y = ops.layer_norm(h, pre + "layer_norm2", s.eps)
        h = r16(h + ops.linear(ops.gelu(ops.linear(y, pre + "mlp.fc1"), tanh=True), pre + "mlp.fc2"))
    half = grid // 2
    y = r16(h.reshape(nc, half, 2, half, 2, c).mean(dim=(2, 4))).reshape(nc, half * half, c)
    y = ops.linear(ops.gelu(ops.linear(y, UP)), DOWN)
    return y.reshape(-1, s.text_hidden)
