"""Qwen2.5-VL's vision tower (families.md §5.2), both faces, and the runtime's preprocessing for it.

Graph inputs (0.7.1's names and order): `input` fp16 `[T, C*tps*p*p]` (the processor's flattened patches, T a
multiple of the merge unit), `rotary_pos_emb` fp32 `[T, D/2]` (per patch: its row's then its column's rotary
angles), `cu_seqlens` int32 `[images + 1]`, `max_seqlen_carrier` int32 `[longest image]` (length only),
`cu_window_seqlens` int32 `[windows + 1]`, `window_index` / `reverse_window_index` int64 `[T / merge unit]`
(over merge groups, not patches). Dataflow: patch embedding (a Conv3d with stride = kernel and no bias,
written as one MatMul) -> patches and angles reordered window-first -> blocks (RMSNorm, fused qkv with bias,
RoPE in fp32, ViTAttentionPlugin over whole images in `fullatt_block_indexes` and over windows elsewhere,
whose carrier is a constant of the window's patch count, SwiGLU MLP with biases) -> merger (RMSNorm, groups of
merge-unit patches concatenated, Linear, GELU, Linear) -> groups put back in image order -> `output` fp16
`[T / merge unit, out_hidden_size]`.

`preprocess` computes what 0.7.1's QwenViTRunner feeds for given image grids (transformers' rules, which the
runner reproduces): the golden bundle carries its results, so the device side needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT16, INT32, INT64, GraphBuilder

from ..encoders import index_list
from . import qwen_vit
from .qwen_vit import EagerOps, GraphOps, QwenTower, all_images, frame_seqlens, golden_patches, rotary_angles

TOWER = "visual."
PREFIXES = (TOWER,)
INPUT, OUTPUT = "input", "output"
INPUTS = ("input", "rotary_pos_emb", "cu_seqlens", "max_seqlen_carrier", "cu_window_seqlens", "window_index",
          "reverse_window_index")
RMS_EPS = 1e-6  # the tower's and the merger's RMSNorm (fixed in the model code, not in the config)
# Two images in one call (ragged cu_seqlens; one smaller than a window, one spanning partial windows), in
# patches: (frames, rows, columns).
GOLDEN_GRIDS = ((1, 12, 20), (1, 4, 8))


@dataclass(frozen=True)
class QwenVisionSpec(QwenTower):
    window_size: int  # pixels
    full_blocks: tuple[int, ...]

    @property
    def window_patches(self) -> int:
        return (self.window_size // self.patch_size) ** 2


def parse(raw: dict, text_hidden: int, path: Path) -> QwenVisionSpec:
    v, need = qwen_vit.vision_fields(raw.get("vision_config"), path)
    rope, theta = qwen_vit.vision_rope(v, path)
    depth = need("depth")
    spec = QwenVisionSpec(
        hidden=need("hidden_size"), heads=need("num_heads"), depth=depth, intermediate=need("intermediate_size"),
        patch_size=need("patch_size"), temporal_patch_size=need("temporal_patch_size", default=2),
        channels=need("in_channels", "in_chans", default=3), merge=need("spatial_merge_size", default=2),
        window_size=need("window_size", default=0),
        full_blocks=index_list(need("fullatt_block_indexes", default=list(range(depth)), size=False),
                               "vision_config.fullatt_block_indexes", path),
        out_hidden=need("out_hidden_size"), rope_theta=theta)
    problems = qwen_vit.common_problems(spec, v, rope, "silu", text_hidden, "out_hidden_size")
    windowed = [i for i in range(depth) if i not in spec.full_blocks]
    if windowed and (spec.window_size <= 0 or spec.window_size % (spec.patch_size * spec.merge)):
        problems.append(f"window_size {spec.window_size} is not a positive multiple of patch_size x "
                        f"spatial_merge_size ({spec.patch_size * spec.merge})")
    if problems:
        raise UnsupportedError("the Qwen2.5-VL vision tower cannot be exported: " + "; ".join(problems), path)
    return spec


def runtime_config(raw: dict, spec: QwenVisionSpec, ckpt_dir: Path) -> dict:
    """visual/config.json as QwenViTRunner reads it: token ids, and the text model's vocab size, rope_theta and
    mrope_section (under text_config). vision_config.model_type is one 0.7.1 knows: recent transformers write
    `qwen2_5_vl_vision`, which its stringToModelType does not accept (the builder reads it first)."""
    from ..config import parse_rope, text_config_of

    text = text_config_of(raw)
    rope, _ = parse_rope(text, ckpt_dir / "config.json")
    needed = ("vision_start_token_id", "image_token_id", "video_token_id")
    missing = [k for k in needed if not isinstance(raw.get(k), int)]
    if missing:
        raise ExportError(f"config.json lacks {', '.join(missing)}, which the runtime's Qwen vision runner reads",
                          ckpt_dir / "config.json")
    if "mrope_section" not in rope.params:
        raise ExportError("the language model's rope has no mrope_section, which the runtime's Qwen vision runner "
                          "needs to place image tokens", ckpt_dir / "config.json")
    out = {"model_type": "qwen2_5_vl", "vision_config": {**raw["vision_config"], "model_type": "qwen2_5_vl"},
           "text_config": {"vocab_size": text["vocab_size"], "rope_theta": rope.theta,
                           "rope_scaling": {"type": "default", "rope_type": "default", **rope.params}}}
    for key in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"):
        if isinstance(raw.get(key), int):
            out[key] = raw[key]
    return out



# -- the runtime's preprocessing ---------------------------------------------------------------------
def preprocess(grids, spec: QwenVisionSpec) -> dict[str, np.ndarray]:
    """Every graph input but `input`, for images of `grids` ((t, h, w) in patches, h and w multiples of the merge
    size), as the runtime computes them."""
    m = spec.merge
    rot = rotary_angles(grids, m, spec.head_dim, spec.rope_theta)
    cu, carrier = frame_seqlens(grids)
    cu_win, window_index, groups_before = [0], [], 0
    per_window = spec.window_size // m // spec.patch_size if spec.window_size else 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        if per_window:  # merge groups by window, row-major windows; padding (-100) marks none
            ph, pw = per_window - gh % per_window, per_window - gw % per_window
            nh, nw = (gh + ph) // per_window, (gw + pw) // per_window
            padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
            padded = padded.reshape(t, nh, per_window, nw, per_window).transpose(0, 1, 3, 2, 4)
            padded = padded.reshape(t, nh * nw, per_window * per_window)
            sizes = (padded != -100).sum(-1).reshape(-1)
            window_index.append(padded.reshape(-1)[padded.reshape(-1) != -100] + groups_before)
            for end in np.cumsum(sizes) * spec.merge_unit + cu_win[-1]:
                if int(end) != cu_win[-1]:  # empty windows add no boundary
                    cu_win.append(int(end))
        else:
            window_index.append(index.reshape(-1) + groups_before)
        groups_before += t * gh * gw
    index = np.concatenate(window_index).astype(np.int64)
    return {"rotary_pos_emb": rot, "cu_seqlens": cu, "max_seqlen_carrier": carrier,
            "cu_window_seqlens": np.asarray(cu_win, np.int32) if per_window else cu, "window_index": index,
            "reverse_window_index": np.argsort(index).astype(np.int64)}


prepare = qwen_vit.prepare  # the family interface: transformers' own names, nothing to map
preprocessor_problems = qwen_vit.preprocessor_problems


def golden_inputs(spec: QwenVisionSpec) -> dict[str, np.ndarray]:
    """GOLDEN_GRIDS' patches and their preprocessing."""
    return {INPUT: golden_patches(spec, GOLDEN_GRIDS), **preprocess(GOLDEN_GRIDS, spec)}


# -- graph face ---------------------------------------------------------------------------------------
def linear_names(s: QwenVisionSpec) -> list[str]:
    """The tower's linears (their names in the checkpoint), for quantization metadata (visual._tower_quant)."""
    blocks = [f"{TOWER}blocks.{i}.{m}" for i in range(s.depth)
              for m in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return blocks + [TOWER + "merger.mlp.0", TOWER + "merger.mlp.2"]


def emit_graph(g: GraphBuilder, w, s: QwenVisionSpec) -> None:
    n, i64, ops = g.node, g.i64, GraphOps(g, w)
    h, d = s.hidden, s.head_dim
    x, rot, cu, carrier = qwen_vit.base_inputs(g, s)
    cu_win = g.input("cu_window_seqlens", INT32, ["num_windows_plus_1"])
    win = g.input("window_index", INT64, ["num_groups"])
    rev = g.input("reverse_window_index", INT64, ["num_groups"])

    def window_first(y, width):  # reorder at merge-group granularity
        return n("Reshape", [n("Gather", [n("Reshape", [y, i64(-1, s.merge_unit, width)]), win], {"axis": 0}),
                             i64(-1, width)])

    shape = (h, s.channels, s.temporal_patch_size, s.patch_size, s.patch_size)
    hs = window_first(ops.patch_embed(x, TOWER + "patch_embed.proj", shape, bias=False), h)
    cos, sin = ops.cos_sin(window_first(rot, d // 2))
    window_carrier = g.const(np.zeros(s.window_patches, np.int32), "window_seqlen_carrier")
    for i in range(s.depth):
        g.scope = f"visual.block.{i}"
        pre = f"{TOWER}blocks.{i}."
        full = i in s.full_blocks
        hs = n("Add", [hs, ops.attention(ops.rms(hs, pre + "norm1", h, RMS_EPS), pre + "attn", h, s.heads, cos, sin,
                                         cu if full else cu_win, carrier if full else window_carrier)])
        y = ops.rms(hs, pre + "norm2", h, RMS_EPS)
        gate = ops.linear(y, pre + "mlp.gate_proj", s.intermediate, h)
        silu = ops.fp16(n("Mul", [ops.fp32(gate), n("Sigmoid", [ops.fp32(gate)])]))
        up = ops.linear(y, pre + "mlp.up_proj", s.intermediate, h)
        hs = n("Add", [hs, ops.linear(n("Mul", [silu, up]), pre + "mlp.down_proj", h, s.intermediate)])
    g.scope = "visual.merger"
    merged = n("Reshape", [ops.rms(hs, TOWER + "merger.ln_q", h, RMS_EPS), i64(-1, h * s.merge_unit)])
    y = ops.gelu(ops.linear(merged, TOWER + "merger.mlp.0", h * s.merge_unit, h * s.merge_unit))
    y = ops.linear(y, TOWER + "merger.mlp.2", s.out_hidden, h * s.merge_unit)
    g.scope = ""
    g.output(n("Gather", [y, rev], {"axis": 0}), OUTPUT, FLOAT16, ["num_groups", s.out_hidden])


# -- eager face -------------------------------------------------------------------------------------
def eager(inputs: dict, t: dict, s: QwenVisionSpec):
    """What the graph computes, in torch, over the graph's initializers `t` (fp16 tensors by name)."""
    import torch

    ops, h = EagerOps(t), s.hidden
    win = torch.from_numpy(inputs["window_index"])

    def window_first(y):
        return y.reshape(-1, s.merge_unit, y.shape[-1])[win].reshape(-1, y.shape[-1])

    x = torch.from_numpy(inputs[INPUT]).float()
    hs = window_first(ops.patch_embed(x, TOWER + "patch_embed.proj", bias=False))
    cos, sin = ops.cos_sin(window_first(torch.from_numpy(inputs["rotary_pos_emb"])))
    cu, carrier = torch.from_numpy(inputs["cu_seqlens"]), torch.from_numpy(inputs["max_seqlen_carrier"])
    cu_win = torch.from_numpy(inputs["cu_window_seqlens"])
    win_carrier = torch.zeros(s.window_patches, dtype=torch.int32)
    for i in range(s.depth):
        pre = f"{TOWER}blocks.{i}."
        full = i in s.full_blocks
        hs = ops.r16(hs + ops.attention(ops.rms(hs, pre + "norm1", RMS_EPS), pre + "attn", h, s.heads, cos, sin,
                                        cu if full else cu_win, carrier if full else win_carrier))
        y = ops.rms(hs, pre + "norm2", RMS_EPS)
        gate = ops.linear(y, pre + "mlp.gate_proj")
        act = ops.r16(ops.r16(gate * torch.sigmoid(gate)) * ops.linear(y, pre + "mlp.up_proj"))
        hs = ops.r16(hs + ops.linear(act, pre + "mlp.down_proj"))
    merged = ops.rms(hs, TOWER + "merger.ln_q", RMS_EPS).reshape(-1, h * s.merge_unit)
    y = ops.linear(ops.gelu(ops.linear(merged, TOWER + "merger.mlp.0")), TOWER + "merger.mlp.2")
    return y[torch.from_numpy(inputs["reverse_window_index"])]


def golden_image(s) -> dict:
    """Both golden images, two images in one prompt, as the LLM's image scenario uses them."""
    return all_images(s, GOLDEN_GRIDS)
