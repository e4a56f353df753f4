"""Qwen2-VL's vision tower (families.md §5.2, "and Qwen2-VL"), both faces, and the runtime's preprocessing for it.

Graph inputs (what 0.7.1's QwenViTRunner binds for model type `qwen2_vl`, in this order): `input` fp16
`[T, C*tps*p*p]` (the processor's flattened patches, T a multiple of the merge unit), `rotary_pos_emb` fp32
`[T, D/2]` (per patch: its row's then its column's rotary angles), `cu_seqlens` int32 `[frames + 1]` and
`max_seqlen_carrier` int32 `[longest frame]` (its length is what counts). No window inputs (every block attends
over whole frames) and no position table. Dataflow: patch embedding (Conv3d with stride = kernel and no bias,
one MatMul) -> blocks (LayerNorm `norm1`, fused qkv with bias, RoPE in fp32, ViTAttentionPlugin, `attn.proj`;
LayerNorm `norm2`, `mlp.fc1`, QuickGELU, `mlp.fc2`) -> merger (LayerNorm `ln_q`, groups of merge-unit patches
concatenated, `mlp.0`, GELU, `mlp.2`) -> `output` fp16 `[T / merge unit, hidden_size]`.

The config differs from Qwen2.5-VL's in its names: `embed_dim` is the tower's width, `hidden_size` its output
(the language model's width), and the MLP width is `embed_dim * mlp_ratio`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT16, GraphBuilder

from . import qwen_vit
from .qwen_vit import EagerOps, GraphOps, QwenTower, all_images, frame_seqlens, golden_patches, rotary_angles

TOWER = "visual."
PREFIXES = (TOWER,)
INPUT, OUTPUT = "input", "output"
INPUTS = ("input", "rotary_pos_emb", "cu_seqlens", "max_seqlen_carrier")
LN_EPS = 1e-6  # the blocks' and the merger's LayerNorms (fixed in the model code, not in the config)
QUICK_GELU = 1.702  # x * sigmoid(1.702 x)
# Two images of different sizes and aspect ratios in one call (ragged cu_seqlens), in patches (t, h, w).
GOLDEN_GRIDS = ((1, 12, 20), (1, 4, 8))


def parse(raw: dict, text_hidden: int, path: Path) -> QwenTower:
    v, need = qwen_vit.vision_fields(raw.get("vision_config"), path)
    values = {"embed_dim": need("embed_dim"), "num_heads": need("num_heads"), "depth": need("depth"),
              "hidden_size": need("hidden_size"), "patch_size": need("patch_size"),
              "temporal_patch_size": need("temporal_patch_size", default=2),
              "in_channels": need("in_channels", "in_chans", default=3),
              "spatial_merge_size": need("spatial_merge_size", default=2)}
    ratio = need("mlp_ratio", default=4, size=False)
    bad = [f"{k} {val!r}" for k, val in values.items() if isinstance(val, bool) or not isinstance(val, int) or val < 1]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        bad.append(f"mlp_ratio {ratio!r}")
    if bad:
        raise UnsupportedError("the Qwen2-VL vision tower cannot be exported: vision_config has "
                               + ", ".join(bad) + " (positive integers expected)", path)
    rope, theta = qwen_vit.vision_rope(v, path)
    spec = QwenTower(
        hidden=values["embed_dim"], heads=values["num_heads"], depth=values["depth"],
        intermediate=int(values["embed_dim"] * ratio), patch_size=values["patch_size"],
        temporal_patch_size=values["temporal_patch_size"], channels=values["in_channels"],
        merge=values["spatial_merge_size"], out_hidden=values["hidden_size"], rope_theta=theta)
    problems = qwen_vit.common_problems(spec, v, rope, "quick_gelu", text_hidden, "hidden_size", "embed_dim")
    if problems:
        raise UnsupportedError("the Qwen2-VL vision tower cannot be exported: " + "; ".join(problems), path)
    return spec


def runtime_config(raw: dict, spec: QwenTower, ckpt_dir: Path) -> dict:
    """As qwen2_5_vl.runtime_config (token ids, the text model's vocab size, rope_theta and mrope_section), with
    the name 0.7.1 knows for this tower: `qwen2_vl` (recent transformers write `qwen2_vl_vision` in
    vision_config, which visual_build reads first and its stringToModelType does not accept)."""
    from . import qwen2_5_vl

    out = qwen2_5_vl.runtime_config(raw, spec, ckpt_dir)
    out["model_type"] = out["vision_config"]["model_type"] = "qwen2_vl"
    return out


# -- the runtime's preprocessing ---------------------------------------------------------------------
def preprocess(grids, spec: QwenTower) -> dict[str, np.ndarray]:
    """Every graph input but `input`, for images of `grids` ((t, h, w) in patches, h and w multiples of the merge
    size), as the runtime computes them: rotary angles and one attention sequence per frame."""
    cu, carrier = frame_seqlens(grids)
    return {"rotary_pos_emb": rotary_angles(grids, spec.merge, spec.head_dim, spec.rope_theta), "cu_seqlens": cu,
            "max_seqlen_carrier": carrier}


prepare = qwen_vit.prepare  # the family interface: transformers' own names, nothing to map
preprocessor_problems = qwen_vit.preprocessor_problems


def golden_inputs(spec: QwenTower) -> dict[str, np.ndarray]:
    """GOLDEN_GRIDS' patches and their preprocessing."""
    return {INPUT: golden_patches(spec, GOLDEN_GRIDS), **preprocess(GOLDEN_GRIDS, spec)}


# -- graph face ---------------------------------------------------------------------------------------
def linear_names(s: QwenTower) -> list[str]:
    """The tower's linears (their names in the checkpoint), for quantization metadata (encoders._quantized_linears)."""
    blocks = [f"{TOWER}blocks.{i}.{m}" for i in range(s.depth) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    return blocks + [TOWER + "merger.mlp.0", TOWER + "merger.mlp.2"]


def _quick_gelu_graph(ops: GraphOps, y):
    """x * sigmoid(1.702 x) in fp32, rounded once to fp16."""
    n, y32 = ops.n, ops.fp32(y)
    scaled = n("Mul", [y32, ops.g.const(np.array(QUICK_GELU, np.float32))])
    return ops.fp16(n("Mul", [y32, n("Sigmoid", [scaled])]))


def emit_graph(g: GraphBuilder, w, s: QwenTower) -> None:
    n, i64, ops = g.node, g.i64, GraphOps(g, w)
    h = s.hidden
    x, rot, cu, carrier = qwen_vit.base_inputs(g, s)

    shape = (h, s.channels, s.temporal_patch_size, s.patch_size, s.patch_size)
    hs = ops.patch_embed(x, TOWER + "patch_embed.proj", shape, bias=False)
    cos, sin = ops.cos_sin(rot)
    for i in range(s.depth):
        g.scope = f"visual.block.{i}"
        pre = f"{TOWER}blocks.{i}."
        y = ops.layer_norm(hs, pre + "norm1", h, LN_EPS)
        hs = n("Add", [hs, ops.attention(y, pre + "attn", h, s.heads, cos, sin, cu, carrier)])
        y = _quick_gelu_graph(ops, ops.linear(ops.layer_norm(hs, pre + "norm2", h, LN_EPS), pre + "mlp.fc1",
                                              s.intermediate, h))
        hs = n("Add", [hs, ops.linear(y, pre + "mlp.fc2", h, s.intermediate)])
    g.scope = "visual.merger"
    width = h * s.merge_unit
    merged = n("Reshape", [ops.layer_norm(hs, TOWER + "merger.ln_q", h, LN_EPS), i64(-1, width)])
    y = ops.gelu(ops.linear(merged, TOWER + "merger.mlp.0", width, width))
    y = ops.linear(y, TOWER + "merger.mlp.2", s.out_hidden, width)
    g.scope = ""
    g.output(y, OUTPUT, FLOAT16, ["num_groups", s.out_hidden])


# -- eager face -------------------------------------------------------------------------------------
def eager(inputs: dict, t: dict, s: QwenTower):
    """What the graph computes, in torch, over the graph's initializers `t` (fp16 tensors by name)."""
    import torch

    ops, h = EagerOps(t), s.hidden
    hs = ops.patch_embed(torch.from_numpy(inputs[INPUT]).float(), TOWER + "patch_embed.proj", bias=False)
    cos, sin = ops.cos_sin(torch.from_numpy(inputs["rotary_pos_emb"]))
    cu, carrier = torch.from_numpy(inputs["cu_seqlens"]), torch.from_numpy(inputs["max_seqlen_carrier"])
    for i in range(s.depth):
        pre = f"{TOWER}blocks.{i}."
        hs = ops.r16(hs + ops.attention(ops.layer_norm(hs, pre + "norm1", LN_EPS), pre + "attn", h, s.heads, cos,
                                        sin, cu, carrier))
        y = ops.linear(ops.layer_norm(hs, pre + "norm2", LN_EPS), pre + "mlp.fc1")
        y = ops.r16(y * torch.sigmoid(y * QUICK_GELU))
        hs = ops.r16(hs + ops.linear(y, pre + "mlp.fc2"))
    merged = ops.layer_norm(hs, TOWER + "merger.ln_q", LN_EPS).reshape(-1, h * s.merge_unit)
    return ops.linear(ops.gelu(ops.linear(merged, TOWER + "merger.mlp.0")), TOWER + "merger.mlp.2")


def golden_image(s: QwenTower) -> dict:
    """Both golden images, two images in one prompt, as the LLM's image scenario uses them."""
    return all_images(s, GOLDEN_GRIDS)
