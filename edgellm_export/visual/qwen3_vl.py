"""Qwen3-VL's vision tower (families.md §5.3), both faces, and the runtime's preprocessing for it. Qwen3.5's
tower is the same without deepstack features (its config has no deepstack_visual_indexes).

Graph inputs (0.7.1's names): `input` fp16 `[T, C*tps*p*p]`, `rotary_pos_emb` fp32 `[T, D/2]`, `cu_seqlens`
int32, `max_seqlen_carrier` int32 (length only), `fast_pos_embed_idx` int64 `[4, T]` and
`fast_pos_embed_weight` fp16 `[4, T]`: the four bilinear corners (align_corners) into the learned square
`pos_embed` table and their weights, per patch in merge-block order. Dataflow: patch embedding (Conv3d with
bias, as one MatMul) + the weighted sum of the four table rows -> blocks (LayerNorm, fused qkv, RoPE, the
ViTAttentionPlugin over whole frames, tanh-GELU MLP `linear_fc1/fc2`) -> merger (LayerNorm, groups of merge-unit
patches concatenated, Linear, GELU, Linear) -> `output` fp16 `[T / merge unit, out_hidden]`; after each block in
`deepstack_visual_indexes` a merger with its LayerNorm after the concatenation gives `deepstack_features_{i}`
(same shape), which the runtime scatters into the language model's `deepstack_embeds_{i}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT16, INT64, GraphBuilder

from ..encoders import index_list
from . import qwen_vit
from .qwen_vit import (
    EagerOps,
    GraphOps,
    QwenTower,
    all_images,
    frame_seqlens,
    golden_patches,
    patch_positions,
    rotary_angles,
)

TOWER = "visual."
PREFIXES = (TOWER,)
INPUT, OUTPUT = "input", "output"
INPUTS = ("input", "rotary_pos_emb", "cu_seqlens", "max_seqlen_carrier", "fast_pos_embed_idx",
          "fast_pos_embed_weight")
LN_EPS = 1e-6  # the tower's and the mergers' LayerNorms (fixed in the model code)
GOLDEN_GRIDS = ((1, 12, 20), (1, 4, 8))  # two images of different sizes in one call, in patches (t, h, w)


def deepstack_output(i: int) -> str:
    return f"deepstack_features_{i}"


@dataclass(frozen=True)
class Qwen3VisionSpec(QwenTower):
    num_positions: int
    deepstack: tuple[int, ...]

    @property
    def side(self) -> int:
        return int(round(self.num_positions ** 0.5))


# Qwen3-Omni (root `qwen3_omni_moe`): the same tower under thinker_config (families.md §5.3), its mergers named
# as the original release does (`ln_q`, `mlp.0`, `mlp.2`; the deepstack ones `merger_list.k`), and the name 0.7.1's
# stringToModelType knows it by (families.md §7).
OMNI_ROOT_TYPES = ("qwen3_omni_moe",)
OMNI_RUNTIME_TYPE = "qwen3_omni_vision_encoder"
_OMNI_MERGER_PARTS = {"ln_q": "norm", "mlp.0": "linear_fc1", "mlp.2": "linear_fc2"}


def _scope(raw: dict) -> dict:
    """Where the tower's config and the multimodal token ids live: Qwen3-Omni's thinker_config (keeping the root's
    model_type), else the root."""
    thinker = raw.get("thinker_config")
    if raw.get("model_type") in OMNI_ROOT_TYPES and isinstance(thinker, dict):
        return {**thinker, "model_type": raw.get("model_type")}
    return raw


def parse(raw: dict, text_hidden: int, path: Path) -> Qwen3VisionSpec:
    v, need = qwen_vit.vision_fields(_scope(raw).get("vision_config"), path)
    rope, theta = qwen_vit.vision_rope(v, path)
    spec = Qwen3VisionSpec(
        hidden=need("hidden_size"), heads=need("num_heads"), depth=need("depth"),
        intermediate=need("intermediate_size"),
        patch_size=need("patch_size"), temporal_patch_size=need("temporal_patch_size", default=2),
        channels=need("in_channels", default=3), merge=need("spatial_merge_size", default=2),
        out_hidden=need("out_hidden_size"), num_positions=need("num_position_embeddings"),
        deepstack=index_list(need("deepstack_visual_indexes", default=[], size=False),
                             "vision_config.deepstack_visual_indexes", path), rope_theta=theta)
    problems = qwen_vit.common_problems(spec, v, rope, "gelu_pytorch_tanh", text_hidden, "out_hidden_size")
    if spec.side ** 2 != spec.num_positions:
        problems.append(f"num_position_embeddings {spec.num_positions} is not a square grid")
    if any(not 0 <= i < spec.depth for i in spec.deepstack):
        problems.append(f"deepstack_visual_indexes {list(spec.deepstack)} outside the {spec.depth} blocks")
    if problems:
        raise UnsupportedError("the Qwen3-VL vision tower cannot be exported: " + "; ".join(problems), path)
    return spec


def runtime_config(raw: dict, spec: Qwen3VisionSpec, ckpt_dir: Path) -> dict:
    """As qwen2_5_vl.runtime_config, with the names 0.7.1 knows for this tower: `qwen3_vl`, or `qwen3_5` for
    Qwen3.5's (the same tower without deepstack features; mrope_interleaved kept in the rope)."""
    from . import qwen2_5_vl

    out = qwen2_5_vl.runtime_config(_scope(raw), spec, ckpt_dir)
    root = str(raw.get("model_type", ""))
    kind = "qwen3_5" if root.startswith("qwen3_5") else OMNI_RUNTIME_TYPE if root in OMNI_ROOT_TYPES else "qwen3_vl"
    out["model_type"] = out["vision_config"]["model_type"] = kind
    if kind == OMNI_RUNTIME_TYPE:  # the thinker's MRoPE as the language model's config.json states it
        from ..config import parse_rope, qwen3_omni_rope

        rope = qwen3_omni_rope(parse_rope({"rope_scaling": out["text_config"]["rope_scaling"]}, ckpt_dir)[0])
        out["text_config"]["rope_scaling"] = {"type": "default", "rope_type": "default", **rope.params}
    return out


def prepare(ckpt, spec: Qwen3VisionSpec) -> None:
    """transformers' Qwen3-VL names are the graph's; Qwen3-Omni's mergers are renamed to them (`merger.ln_q` ->
    `merger.norm`, `mlp.0` / `mlp.2` -> `linear_fc1` / `linear_fc2`, `merger_list.k` -> `deepstack_merger_list.k`)."""
    mergers = {"merger": "merger",
               **{f"merger_list.{k}": f"deepstack_merger_list.{k}" for k in range(len(spec.deepstack))}}
    for old, new in mergers.items():
        for part, name in _OMNI_MERGER_PARTS.items():
            for leaf in ("weight", "bias"):
                ckpt.rename(f"{TOWER}{old}.{part}.{leaf}", f"{TOWER}{new}.{name}.{leaf}")


# -- the runtime's preprocessing ---------------------------------------------------------------------
def preprocess(grids, spec: Qwen3VisionSpec) -> dict[str, np.ndarray]:
    """Every graph input but `input`: rotary angles, per-frame sequences, and the bilinear (align_corners)
    corners and weights resampling the square position table to each image's grid."""
    rows, cols = patch_positions(grids, spec.merge)
    heights = np.concatenate([np.full(t * h * w, h) for t, h, w in grids])
    widths = np.concatenate([np.full(t * h * w, w) for t, h, w in grids])
    side = spec.side

    def taps(index, size):
        src = index.astype(np.float32) * (side - 1) / np.maximum(size - 1, 1)
        floor = np.floor(src)
        near = np.clip(floor.astype(np.int64), 0, side - 1)
        far = np.clip(floor.astype(np.int64) + 1, 0, side - 1)
        frac = src - floor
        return (near, far), (1 - frac, frac)

    (h0, h1), (hw0, hw1) = taps(rows, heights)
    (w0, w1), (ww0, ww1) = taps(cols, widths)
    idx = np.stack([h0 * side + w0, h0 * side + w1, h1 * side + w0, h1 * side + w1]).astype(np.int64)
    weight = np.stack([hw0 * ww0, hw0 * ww1, hw1 * ww0, hw1 * ww1]).astype(np.float16)
    cu, carrier = frame_seqlens(grids)
    return {"rotary_pos_emb": rotary_angles(grids, spec.merge, spec.head_dim, spec.rope_theta), "cu_seqlens": cu,
            "max_seqlen_carrier": carrier, "fast_pos_embed_idx": idx, "fast_pos_embed_weight": weight}


preprocessor_problems = qwen_vit.preprocessor_problems


def golden_inputs(spec: Qwen3VisionSpec) -> dict[str, np.ndarray]:
    """GOLDEN_GRIDS' patches and their preprocessing."""
    return {INPUT: golden_patches(spec, GOLDEN_GRIDS), **preprocess(GOLDEN_GRIDS, spec)}


# -- graph face ---------------------------------------------------------------------------------------
def linear_names(s: Qwen3VisionSpec) -> list[str]:
    """The tower's linears (their names in the checkpoint), for quantization metadata (visual._tower_quant)."""
    blocks = [f"{TOWER}blocks.{i}.{m}" for i in range(s.depth)
              for m in ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")]
    mergers = [TOWER + "merger"] + [f"{TOWER}deepstack_merger_list.{k}" for k in range(len(s.deepstack))]
    return blocks + [f"{m}.{fc}" for m in mergers for fc in ("linear_fc1", "linear_fc2")]


def emit_graph(g: GraphBuilder, w, s: Qwen3VisionSpec) -> None:
    n, i64, ops = g.node, g.i64, GraphOps(g, w)
    h, wide = s.hidden, s.hidden * s.merge_unit
    x, rot, cu, carrier = qwen_vit.base_inputs(g, s)
    idx = g.input("fast_pos_embed_idx", INT64, [4, "num_patches"])
    weight = g.input("fast_pos_embed_weight", FLOAT16, [4, "num_patches"])
    shape = (h, s.channels, s.temporal_patch_size, s.patch_size, s.patch_size)
    hs = ops.patch_embed(x, TOWER + "patch_embed.proj", shape, bias=True)
    table = w.tensor(TOWER + "pos_embed.weight", (s.num_positions, h))
    corners = ops.fp32(n("Gather", [table, idx], {"axis": 0}))  # [4, T, H]
    pos = n("ReduceSum", [n("Mul", [corners, n("Unsqueeze", [ops.fp32(weight), i64(2)])]), i64(0)], {"keepdims": 0})
    hs = n("Add", [hs, ops.fp16(pos)])
    cos, sin = ops.cos_sin(rot)

    def merger(y, name, postshuffle):
        y = (ops.layer_norm(n("Reshape", [y, i64(-1, wide)]), name + ".norm", wide, LN_EPS) if postshuffle
             else n("Reshape", [ops.layer_norm(y, name + ".norm", h, LN_EPS), i64(-1, wide)]))
        y = ops.gelu(ops.linear(y, name + ".linear_fc1", wide, wide))
        return ops.linear(y, name + ".linear_fc2", s.out_hidden, wide)

    deepstack = {}
    for i in range(s.depth):
        g.scope = f"visual.block.{i}"
        pre = f"{TOWER}blocks.{i}."
        hs = n("Add", [hs, ops.attention(ops.layer_norm(hs, pre + "norm1", h, LN_EPS), pre + "attn", h, s.heads, cos,
                                         sin, cu, carrier)])
        y = ops.gelu(ops.linear(ops.layer_norm(hs, pre + "norm2", h, LN_EPS), pre + "mlp.linear_fc1",
                                s.intermediate, h), tanh=True)
        hs = n("Add", [hs, ops.linear(y, pre + "mlp.linear_fc2", h, s.intermediate)])
        if i in s.deepstack:
            k = s.deepstack.index(i)
            deepstack[k] = merger(hs, f"{TOWER}deepstack_merger_list.{k}", postshuffle=True)
    g.scope = "visual.merger"
    out = merger(hs, TOWER + "merger", postshuffle=False)
    g.scope = ""
    g.output(out, OUTPUT, FLOAT16, ["num_groups", s.out_hidden])
    for k in range(len(s.deepstack)):
        g.output(deepstack[k], deepstack_output(k), FLOAT16, ["num_groups", s.out_hidden])


# -- eager face -------------------------------------------------------------------------------------
def eager(inputs: dict, t: dict, s: Qwen3VisionSpec) -> dict:
    """What the graph computes, in torch: {output name: rows} over the graph's initializers `t`."""
    import torch

    ops, h, wide = EagerOps(t), s.hidden, s.hidden * s.merge_unit
    x = torch.from_numpy(inputs[INPUT]).float()
    hs = ops.patch_embed(x, TOWER + "patch_embed.proj", bias=True)
    idx = torch.from_numpy(inputs["fast_pos_embed_idx"])
    weight = torch.from_numpy(inputs["fast_pos_embed_weight"]).float()
    pos = (ops.f(TOWER + "pos_embed.weight")[idx] * weight[:, :, None]).sum(0)
    hs = ops.r16(hs + ops.r16(pos))
    cos, sin = ops.cos_sin(torch.from_numpy(inputs["rotary_pos_emb"]))
    cu, carrier = torch.from_numpy(inputs["cu_seqlens"]), torch.from_numpy(inputs["max_seqlen_carrier"])

    def merger(y, name, postshuffle):
        y = (ops.layer_norm(y.reshape(-1, wide), name + ".norm", LN_EPS) if postshuffle
             else ops.layer_norm(y, name + ".norm", LN_EPS).reshape(-1, wide))
        return ops.linear(ops.gelu(ops.linear(y, name + ".linear_fc1")), name + ".linear_fc2")

    outs = {}
    for i in range(s.depth):
        pre = f"{TOWER}blocks.{i}."
        hs = ops.r16(hs + ops.attention(ops.layer_norm(hs, pre + "norm1", LN_EPS), pre + "attn", h, s.heads, cos, sin,
                                        cu, carrier))
        y = ops.gelu(ops.linear(ops.layer_norm(hs, pre + "norm2", LN_EPS), pre + "mlp.linear_fc1"), tanh=True)
        hs = ops.r16(hs + ops.linear(y, pre + "mlp.linear_fc2"))
        if i in s.deepstack:
            k = s.deepstack.index(i)
            outs[deepstack_output(k)] = merger(hs, f"{TOWER}deepstack_merger_list.{k}", postshuffle=True)
    return {OUTPUT: merger(hs, TOWER + "merger", postshuffle=False), **outs}


def golden_image(s) -> dict:
    """Both golden images, two images in one prompt, as the LLM's image scenario uses them."""
    return all_images(s, GOLDEN_GRIDS)
