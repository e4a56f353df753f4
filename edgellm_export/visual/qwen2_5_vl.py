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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, INT64, GraphBuilder
from edgellm_core.ops import vit_attention_plugin

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
class QwenVisionSpec:
    hidden: int
    heads: int
    depth: int
    intermediate: int
    patch_size: int
    temporal_patch_size: int
    channels: int
    merge: int  # spatial_merge_size
    window_size: int  # pixels
    full_blocks: tuple[int, ...]
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

    @property
    def window_patches(self) -> int:
        return (self.window_size // self.patch_size) ** 2


def parse(raw: dict, text_hidden: int, path: Path) -> QwenVisionSpec:
    v = raw.get("vision_config")
    if not isinstance(v, dict):
        raise ExportError("has no vision_config object", path)

    def need(key, *alts, default=None):
        for k in (key, *alts):
            if v.get(k) is not None:
                return v[k]
        if default is None:
            raise ExportError(f"vision_config lacks {key!r}", path)
        return default

    rope = v.get("rope_parameters") if isinstance(v.get("rope_parameters"), dict) else {}
    depth = need("depth")
    spec = QwenVisionSpec(
        hidden=need("hidden_size"), heads=need("num_heads"), depth=depth, intermediate=need("intermediate_size"),
        patch_size=need("patch_size"), temporal_patch_size=need("temporal_patch_size", default=2),
        channels=need("in_channels", "in_chans", default=3), merge=need("spatial_merge_size", default=2),
        window_size=need("window_size", default=0),
        full_blocks=tuple(need("fullatt_block_indexes", default=list(range(depth)))),
        out_hidden=need("out_hidden_size"), rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))))
    problems = []
    if spec.hidden % spec.heads or spec.head_dim % 4:
        problems.append(f"hidden_size {spec.hidden} / num_heads {spec.heads}: the head size must split into "
                        "four rotary quarters")
    if v.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {v.get('hidden_act')!r} (supported: silu)")
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        problems.append(f"rope_type {rope.get('rope_type')!r} (supported: axial)")
    windowed = [i for i in range(depth) if i not in spec.full_blocks]
    if windowed and (spec.window_size <= 0 or spec.window_size % (spec.patch_size * spec.merge)):
        problems.append(f"window_size {spec.window_size} is not a positive multiple of patch_size x "
                        f"spatial_merge_size ({spec.patch_size * spec.merge})")
    if spec.out_hidden != text_hidden:
        problems.append(f"out_hidden_size {spec.out_hidden} differs from the language model's hidden size "
                        f"{text_hidden}")
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


def prepare(ckpt, spec) -> None:
    """The tower's names are transformers' own (`visual.*`, or `model.visual.*`, a wrapper the reader strips)."""


# -- the runtime's preprocessing ---------------------------------------------------------------------
def preprocess(grids, spec: QwenVisionSpec) -> dict[str, np.ndarray]:
    """Every graph input but `input`, for images of `grids` ((t, h, w) in patches, h and w multiples of the merge
    size), as the runtime computes them."""
    m, d = spec.merge, spec.head_dim
    quarter = d // 2
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter)
    angles, cu, cu_win, window_index, groups_before = [], [0], [0], [], 0
    per_window = spec.window_size // m // spec.patch_size if spec.window_size else 0
    for t, h, w in grids:
        if h % m or w % m:
            raise ValueError(f"image grid {h}x{w} patches is not a multiple of the merge size {m}")
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        freqs = np.concatenate([np.outer(hpos, inv_freq), np.outer(wpos, inv_freq)], axis=1).astype(np.float32)
        angles.append(np.tile(freqs, (t, 1)))
        cu.extend(cu[-1] + h * w * (k + 1) for k in range(t))
        gh, gw = h // m, w // m
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        if per_window:
            ph, pw = per_window - gh % per_window, per_window - gw % per_window
            nh, nw = (gh + ph) // per_window, (gw + pw) // per_window
            padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
            padded = padded.reshape(t, nh, per_window, nw, per_window).transpose(0, 1, 3, 2, 4)
            padded = padded.reshape(t, nh * nw, per_window * per_window)
            sizes = (padded != -100).sum(-1).reshape(-1)
            window_index.append(padded.reshape(-1)[padded.reshape(-1) != -100] + groups_before)
            for s in np.cumsum(sizes) * spec.merge_unit + cu_win[-1]:
                if int(s) != cu_win[-1]:  # empty windows add no boundary
                    cu_win.append(int(s))
        else:
            window_index.append(index.reshape(-1) + groups_before)
        groups_before += t * gh * gw
    index = np.concatenate(window_index).astype(np.int64)
    if not per_window:
        cu_win = list(cu)
    lengths = np.diff(cu)
    return {"rotary_pos_emb": np.concatenate(angles), "cu_seqlens": np.asarray(cu, np.int32),
            "max_seqlen_carrier": np.zeros(int(lengths.max()), np.int32),
            "cu_window_seqlens": np.asarray(cu_win, np.int32), "window_index": index,
            "reverse_window_index": np.argsort(index).astype(np.int64)}


def golden_inputs(spec: QwenVisionSpec) -> dict[str, np.ndarray]:
    """GOLDEN_GRIDS' patches (normalized-pixel-like values) and their preprocessing."""
    t = sum(a * b * c for a, b, c in GOLDEN_GRIDS)
    patches = np.random.default_rng(20261202).standard_normal((t, spec.patch_dim)).astype(np.float16)
    return {INPUT: patches, **preprocess(GOLDEN_GRIDS, spec)}


# -- graph face ---------------------------------------------------------------------------------------
def emit_graph(g: GraphBuilder, w, s: QwenVisionSpec) -> None:
    n, i64 = g.node, g.i64
    h, d, heads = s.hidden, s.head_dim, s.heads
    x = g.input(INPUT, FLOAT16, ["num_patches", s.patch_dim])
    rot = g.input("rotary_pos_emb", FLOAT, ["num_patches", d // 2])
    cu = g.input("cu_seqlens", INT32, ["num_images_plus_1"])
    carrier = g.input("max_seqlen_carrier", INT32, ["max_seqlen"])
    cu_win = g.input("cu_window_seqlens", INT32, ["num_windows_plus_1"])
    win = g.input("window_index", INT64, ["num_groups"])
    rev = g.input("reverse_window_index", INT64, ["num_groups"])

    def fp32(y):
        return n("Cast", [y], {"to": FLOAT})

    def fp16(y):
        return n("Cast", [y], {"to": FLOAT16})

    def linear(y, name, out_f, in_f):
        out = n("MatMul", [y, w.linear_weight(name + ".weight", out_f, in_f)])
        return n("Add", [out, w.vector(name + ".bias", out_f)])

    def rms(y, name, size):
        y32 = fp32(y)
        ms = n("ReduceMean", [n("Mul", [y32, y32]), i64(-1)], {"keepdims": 1})
        inv = n("Reciprocal", [n("Sqrt", [n("Add", [ms, g.const(np.array(RMS_EPS, np.float32))])])])
        return n("Mul", [fp16(n("Mul", [y32, inv])), w.vector(name + ".weight", size)])  # HF: w * x.to(fp16)

    def window_first(y, width):
        return n("Reshape", [n("Gather", [n("Reshape", [y, i64(-1, s.merge_unit, width)]), win], {"axis": 0}),
                             i64(-1, width)])

    conv = w.ref(TOWER + "patch_embed.proj.weight", (h, s.channels, s.temporal_patch_size, s.patch_size, s.patch_size))
    weight = g.weight(TOWER + "patch_embed.proj.weight.T", FLOAT16, (s.patch_dim, h),
                      lambda: _to_fp16(conv).reshape(h, -1).t().contiguous(), tag=conv.where())
    hs = window_first(n("MatMul", [x, weight]), h)
    emb = n("Unsqueeze", [n("Concat", [window_first(rot, d // 2)] * 2, {"axis": -1}), i64(1)])  # [T, 1, D]
    cos, sin = n("Cos", [emb]), n("Sin", [emb])
    window_carrier = g.const(np.zeros(s.window_patches, np.int32), "window_seqlen_carrier")

    def rope(t):  # [T, heads, D] fp16 -> rotated in fp32 -> fp16
        t32 = fp32(t)
        first = n("Slice", [t32, i64(0), i64(d // 2), i64(-1)])
        second = n("Slice", [t32, i64(d // 2), i64(d), i64(-1)])
        rotated = n("Concat", [n("Neg", [second]), first], {"axis": -1})
        return fp16(n("Add", [n("Mul", [t32, cos]), n("Mul", [rotated, sin])]))

    for i in range(s.depth):
        g.scope = f"visual.block.{i}"
        pre = f"{TOWER}blocks.{i}."
        qkv = n("Reshape", [linear(rms(hs, pre + "norm1", h), pre + "attn.qkv", 3 * h, h), i64(0, 3, heads, d)])
        q, k, v = (n("Gather", [qkv, g.const(np.array(j, np.int64))], {"axis": 1}) for j in range(3))
        full = i in s.full_blocks
        attn = vit_attention_plugin.emit(g, rope(q), rope(k), v, cu if full else cu_win,
                                         carrier if full else window_carrier, num_heads=heads, head_size=d)
        hs = n("Add", [hs, linear(n("Reshape", [attn, i64(0, h)]), pre + "attn.proj", h, h)])
        y = rms(hs, pre + "norm2", h)
        gate = linear(y, pre + "mlp.gate_proj", s.intermediate, h)
        silu = fp16(n("Mul", [fp32(gate), n("Sigmoid", [fp32(gate)])]))
        up = linear(y, pre + "mlp.up_proj", s.intermediate, h)
        hs = n("Add", [hs, linear(n("Mul", [silu, up]), pre + "mlp.down_proj", h, s.intermediate)])
    g.scope = "visual.merger"
    merged = n("Reshape", [rms(hs, TOWER + "merger.ln_q", h), i64(-1, h * s.merge_unit)])
    y = linear(merged, TOWER + "merger.mlp.0", h * s.merge_unit, h * s.merge_unit)
    y32 = fp32(y)
    erf = n("Erf", [n("Mul", [y32, g.const(np.array(1 / math.sqrt(2), np.float32))])])
    y = fp16(n("Mul", [n("Mul", [y32, g.const(np.array(0.5, np.float32))]),
                       n("Add", [erf, g.const(np.array(1.0, np.float32))])]))
    y = linear(y, TOWER + "merger.mlp.2", s.out_hidden, h * s.merge_unit)
    g.scope = ""
    g.output(n("Gather", [y, rev], {"axis": 0}), OUTPUT, FLOAT16, ["num_groups", s.out_hidden])


def _to_fp16(ref):
    from ..models.weights import to_fp16

    return to_fp16(ref)


# -- eager face -------------------------------------------------------------------------------------
def eager(inputs: dict, t: dict, s: QwenVisionSpec):
    """What the graph computes, in torch, over the graph's initializers `t` (fp16 tensors by name)."""
    import torch

    op = vit_attention_plugin.register_torch_op()
    h, d = s.hidden, s.head_dim

    def r16(x):
        return x.half().float()

    def f(name):
        return t[name].float()

    def linear(y, name):
        return r16(r16(y @ f(name + ".weight.T")) + f(name + ".bias"))

    def rms(y, name):
        return r16(r16(y * torch.rsqrt((y * y).mean(-1, keepdim=True) + RMS_EPS)) * f(name + ".weight"))

    win = torch.from_numpy(inputs["window_index"])

    def window_first(y):
        return y.reshape(-1, s.merge_unit, y.shape[-1])[win].reshape(-1, y.shape[-1])

    x = torch.from_numpy(inputs[INPUT]).float()
    hs = window_first(r16(x @ f(TOWER + "patch_embed.proj.weight.T")))
    rot = window_first(torch.from_numpy(inputs["rotary_pos_emb"]))
    emb = torch.cat([rot, rot], dim=-1)[:, None]
    cos, sin = emb.cos(), emb.sin()

    def rope(z):
        rotated = torch.cat([-z[..., d // 2:], z[..., : d // 2]], dim=-1)
        return (z * cos + rotated * sin).half()

    cu, carrier = torch.from_numpy(inputs["cu_seqlens"]), torch.from_numpy(inputs["max_seqlen_carrier"])
    cu_win = torch.from_numpy(inputs["cu_window_seqlens"])
    win_carrier = torch.zeros(s.window_patches, dtype=torch.int32)
    for i in range(s.depth):
        pre = f"{TOWER}blocks.{i}."
        qkv = linear(rms(hs, pre + "norm1"), pre + "attn.qkv").reshape(-1, 3, s.heads, d)
        full = i in s.full_blocks
        attn = op(rope(qkv[:, 0]), rope(qkv[:, 1]), qkv[:, 2].half(), cu if full else cu_win,
                  carrier if full else win_carrier, s.heads, d).float()
        hs = r16(hs + linear(attn.reshape(-1, h), pre + "attn.proj"))
        y = rms(hs, pre + "norm2")
        gate = linear(y, pre + "mlp.gate_proj")
        act = r16(r16(gate * torch.sigmoid(gate)) * linear(y, pre + "mlp.up_proj"))
        hs = r16(hs + linear(act, pre + "mlp.down_proj"))
    merged = rms(hs, TOWER + "merger.ln_q").reshape(-1, h * s.merge_unit)
    y = r16(torch.nn.functional.gelu(linear(merged, TOWER + "merger.mlp.0")))
    y = linear(y, TOWER + "merger.mlp.2")
    return y[torch.from_numpy(inputs["reverse_window_index"])]
