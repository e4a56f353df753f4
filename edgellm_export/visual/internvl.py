"""InternVL's vision tower and projector (families.md §5.4), both faces: InternVL3.5 as transformers lays it out
(`internvl`), and InternVL3's own layout (`internvl_chat`: `vision_model.*` with a fused `attn.qkv`, `mlp1.*`),
whose tensors `prepare` exposes under the transformers names (the same tower, the same graph).

Graph: `input` fp16 `[N, C, S, S]` (N tiles of the runtime's tiling) -> patch embedding (a Conv with stride =
kernel, written as patchify + MatMul: the same sums, and only ops every backend has) -> CLS token + absolute
position table -> pre-norm encoder layers (LayerNorm or RMSNorm, q/k/v projections with optional bias and
q/k RMSNorm, attention decomposed as MatMul -> Softmax -> MatMul, layer-scaled residuals, GELU MLP) ->
CLS dropped -> pixel shuffle by `downsample_ratio` -> projector (LayerNorm, Linear, GELU, Linear) ->
`output` fp16 `[N * tokens_per_tile, text_hidden]`.

Numerics: activations are stored in fp16 where the graph stores them; norms, softmax and GELU compute in
fp32; the eager face (`eager`) rounds at the same points. The 0.7.1 runtime sizes InternVL tiles at 256
tokens each (visualBuilder.cpp, internViTRunner.cpp), so a tower whose tiles give another count is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, GraphBuilder

RUNTIME_TOKENS_PER_TILE = 256  # fixed by 0.7.1's InternVL visual builder and runner
TOWER, PROJECTOR = "vision_tower.", "multi_modal_projector."
CHAT_TOWER, CHAT_PROJECTOR = "vision_model.", "mlp1."  # internvl_chat's names
# internvl_chat name -> transformers name ({i}: the layer); the fused attn.qkv is split in `prepare`
_CHAT_NAMES = {
    "vision_model.embeddings.class_embedding": "vision_tower.embeddings.cls_token",
    "vision_model.embeddings.patch_embedding.weight": "vision_tower.embeddings.patch_embeddings.projection.weight",
    "vision_model.embeddings.patch_embedding.bias": "vision_tower.embeddings.patch_embeddings.projection.bias",
    "vision_model.embeddings.position_embedding": "vision_tower.embeddings.position_embeddings",
    "mlp1.0.weight": "multi_modal_projector.layer_norm.weight", "mlp1.0.bias": "multi_modal_projector.layer_norm.bias",
    "mlp1.1.weight": "multi_modal_projector.linear_1.weight", "mlp1.1.bias": "multi_modal_projector.linear_1.bias",
    "mlp1.3.weight": "multi_modal_projector.linear_2.weight", "mlp1.3.bias": "multi_modal_projector.linear_2.bias",
}
_CHAT_LAYER_NAMES = {"attn.proj": "attention.projection_layer", "attn.q_norm": "attention.q_norm",
                     "attn.k_norm": "attention.k_norm", "norm1": "layernorm_before", "norm2": "layernorm_after",
                     "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_CHAT_LAYER_VECTORS = {"ls1": "lambda_1", "ls2": "lambda_2"}
PREFIXES = (TOWER, PROJECTOR, CHAT_TOWER, CHAT_PROJECTOR)  # every tensor under these must be read
INPUT, OUTPUT = "input", "output"  # binding names (bindingNames.h kVisualInput / kVisualOutput)
_GELU = ("gelu",)  # exact (erf) GELU; HF's "gelu"


@dataclass(frozen=True)
class InternVisionSpec:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    image_size: int
    patch_size: int
    channels: int
    norm: str  # "layer_norm" or "rms_norm"
    eps: float
    qkv_bias: bool
    qk_norm: bool
    final_norm: bool  # use_mean_pooling false: a LayerNorm after the encoder
    ratio: float  # downsample_ratio of the pixel shuffle
    text_hidden: int
    chat_layout: bool = False  # internvl_chat's tensor names (see `prepare`)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.grid * self.ratio) ** 2

    @property
    def shuffled(self) -> int:
        return self.hidden * int(1 / self.ratio) ** 2


def _square(value, what: str, path: Path) -> int:
    """A size given as x or [x, x] (the runtime takes square tiles)."""
    v = value if isinstance(value, list) else [value, value]
    if len(v) != 2 or v[0] != v[1] or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise UnsupportedError(f"vision_config.{what} {value!r}: the runtime's InternVL tiles are square "
                               "(a positive integer or [x, x])", path)
    return v[0]


def parse(raw: dict, text_hidden: int, path: Path) -> InternVisionSpec:
    """The tower's shape from config.json; refuses what the graph or the 0.7.1 runtime cannot run."""
    v = raw.get("vision_config")
    if not isinstance(v, dict):
        raise ExportError("has no vision_config object", path)

    def need(key, default=None):
        value = v.get(key, default)
        if value is None:
            raise ExportError(f"vision_config lacks {key!r}", path)
        return value

    chat = raw.get("model_type") == "internvl_chat"
    spec = InternVisionSpec(
        hidden=need("hidden_size"), heads=need("num_attention_heads"), layers=need("num_hidden_layers"),
        intermediate=need("intermediate_size"), image_size=_square(need("image_size"), "image_size", path),
        patch_size=_square(need("patch_size"), "patch_size", path), channels=need("num_channels", 3),
        norm=need("norm_type", "layer_norm"), eps=float(need("layer_norm_eps", 1e-6)),
        qkv_bias=bool(v.get("qkv_bias" if chat else "attention_bias", False)),
        qk_norm=bool(v.get("qk_normalization" if chat else "use_qk_norm", False)),
        final_norm=not chat and not v.get("use_mean_pooling", True), ratio=float(raw.get("downsample_ratio", 0.5)),
        text_hidden=text_hidden, chat_layout=chat)
    problems = []
    if chat and (raw.get("ps_version", "v2") != "v2" or raw.get("select_layer", -1) != -1):
        problems.append(f"ps_version {raw.get('ps_version')!r} / select_layer {raw.get('select_layer')!r} "
                        "(supported: v2, -1)")
    if spec.norm not in ("layer_norm", "rms_norm"):
        problems.append(f"norm_type {spec.norm!r} (supported: layer_norm, rms_norm)")
    if v.get("hidden_act", "gelu") not in _GELU or raw.get("projector_hidden_act", "gelu") not in _GELU:
        problems.append(f"activations {v.get('hidden_act')!r} / {raw.get('projector_hidden_act')!r} (supported: gelu)")
    if not chat and (raw.get("vision_feature_layer", -1) != -1
                     or raw.get("vision_feature_select_strategy", "default") != "default"):
        problems.append("features taken from another layer than the last, or with the CLS token kept")
    if not v.get("use_absolute_position_embeddings", True):
        problems.append("no absolute position table")
    if spec.hidden % spec.heads:
        problems.append(f"hidden_size {spec.hidden} does not split into {spec.heads} heads")
    if spec.image_size % spec.patch_size or spec.ratio not in (0.5, 0.25) or spec.grid * spec.ratio % 1:
        problems.append(f"image_size {spec.image_size} / patch_size {spec.patch_size} / downsample_ratio "
                        f"{spec.ratio} do not tile into whole merge groups")
    elif spec.tokens_per_tile != RUNTIME_TOKENS_PER_TILE:
        problems.append(f"each tile gives {spec.tokens_per_tile} tokens ({spec.image_size} px, patch "
                        f"{spec.patch_size}, downsample {spec.ratio}), but Edge-LLM 0.7.1's InternVL runtime "
                        f"sizes every tile at {RUNTIME_TOKENS_PER_TILE}")
    if problems:
        raise UnsupportedError("the InternVL vision tower cannot be exported: " + "; ".join(problems), path)
    return spec


def runtime_config(raw: dict, spec: InternVisionSpec, ckpt_dir: Path) -> dict:
    """visual/config.json (families.md §7): what InternViTRunner reads (model_type, image_token_id,
    text_config.vocab_size, vision_config.num_channels / patch_size / image_size as [h, w]). internvl_chat has no
    image_token_id in its config: it is the tokenizer's `<IMG_CONTEXT>`."""
    vision = {**raw["vision_config"], "model_type": "internvl", "patch_size": [spec.patch_size] * 2,
              "image_size": [spec.image_size] * 2, "num_channels": spec.channels}
    image_token = raw.get("image_token_id")
    if not isinstance(image_token, int):
        image_token = _tokenizer_token_id(ckpt_dir, IMAGE_CONTEXT_TOKEN)
    if not isinstance(image_token, int):
        raise ExportError(f"no image_token_id in config.json and no {IMAGE_CONTEXT_TOKEN} token in the tokenizer "
                          "files; the runtime needs the id the image's tokens carry", ckpt_dir / "config.json")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw.get("llm_config")
    return {"model_type": "internvl", "vision_config": vision, "downsample_ratio": spec.ratio,
            "tokens_per_tile": spec.tokens_per_tile, "image_token_id": image_token, "text_config": text}


IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"


def _tokenizer_token_id(ckpt_dir: Path, content: str) -> int | None:
    """The id of added token `content` in tokenizer.json or tokenizer_config.json (None when absent)."""
    import json

    for name, table in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        try:
            data = json.loads((ckpt_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entries = data.get(table) if isinstance(data, dict) else None
        if isinstance(entries, list):
            found = [e.get("id") for e in entries if isinstance(e, dict) and e.get("content") == content]
        elif isinstance(entries, dict):
            found = [int(k) for k, e in entries.items()
                     if isinstance(e, dict) and e.get("content") == content and str(k).isdigit()]
        else:
            found = []
        if found and isinstance(found[0], int):
            return found[0]
    return None


def preprocessor_problems(pre: dict, s: InternVisionSpec) -> list[str]:
    """The tile size the processor crops to against the tower's image_size."""
    out = []
    for key in ("size", "crop_size"):
        size = pre.get(key)
        if isinstance(size, dict):
            hw = (size.get("height"), size.get("width"))
            if None not in hw and hw != (s.image_size, s.image_size):
                out.append(f"{key} is {hw[0]}x{hw[1]}, but the tower's tiles are {s.image_size}x{s.image_size}")
        elif isinstance(size, int) and size != s.image_size:
            out.append(f"{key} is {size}, but the tower's tiles are {s.image_size}")
    return out


def prepare(ckpt, s: InternVisionSpec) -> None:
    """internvl_chat: expose its tensors under the transformers names (the fused attn.qkv split into q/k/v)."""
    if not s.chat_layout:
        return
    for old, new in _CHAT_NAMES.items():
        ckpt.rename(old, new)
    for i in range(s.layers):
        old, new = f"{CHAT_TOWER}encoder.layers.{i}.", f"{TOWER}encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            parts = [(f"{new}attention.{m}_proj.{suffix}", s.hidden) for m in "qkv"]
            ckpt.split_fused(f"{old}attn.qkv.{suffix}", parts, keep=False)
            for a, b in _CHAT_LAYER_NAMES.items():
                ckpt.rename(f"{old}{a}.{suffix}", f"{new}{b}.{suffix}")
        for a, b in _CHAT_LAYER_VECTORS.items():
            ckpt.rename(old + a, new + b)


# -- graph face ---------------------------------------------------------------------------------------
def emit_graph(g: GraphBuilder, w, s: InternVisionSpec) -> None:
    """The whole tower into `g`, weights through `w` (models.weights.WeightSource)."""
    n, i64 = g.node, g.i64
    c, p, grid, d = s.hidden, s.patch_size, s.grid, s.hidden // s.heads
    x = g.input(INPUT, FLOAT16, ["num_tiles", s.channels, s.image_size, s.image_size])

    def linear(y, name, out_f, in_f, bias=True):
        out = n("MatMul", [y, w.linear_weight(name + ".weight", out_f, in_f)])
        return n("Add", [out, w.vector(name + ".bias", out_f)]) if bias else out

    def fp32(y):
        return n("Cast", [y], {"to": FLOAT})

    def fp16(y):
        return n("Cast", [y], {"to": FLOAT16})

    def norm(y, name, size, kind):
        if kind == "layer_norm":
            out = n("LayerNormalization", [fp32(y), fp32(w.vector(name + ".weight", size)),
                                           fp32(w.vector(name + ".bias", size))], {"axis": -1, "epsilon": s.eps})
            return fp16(out)
        y32 = fp32(y)
        ms = n("ReduceMean", [n("Mul", [y32, y32]), i64(-1)], {"keepdims": 1})
        inv = n("Reciprocal", [n("Sqrt", [n("Add", [ms, g.const(np.array(s.eps, np.float32))])])])
        return fp16(n("Mul", [n("Mul", [y32, inv]), fp32(w.vector(name + ".weight", size))]))

    def gelu(y):
        y32 = fp32(y)
        erf = n("Erf", [n("Mul", [y32, g.const(np.array(1 / math.sqrt(2), np.float32))])])
        return fp16(n("Mul", [n("Mul", [y32, g.const(np.array(0.5, np.float32))]),
                              n("Add", [erf, g.const(np.array(1.0, np.float32))])]))

    # Patch embedding: [N, C, S, S] -> [N, grid*grid, C*p*p] patches (channel-major, as the Conv weight) @ W^T.
    patches = n("Reshape", [x, i64(0, s.channels, grid, p, grid, p)])
    patches = n("Reshape", [n("Transpose", [patches], {"perm": [0, 2, 4, 1, 3, 5]}),
                            i64(0, grid * grid, s.channels * p * p)])
    proj = TOWER + "embeddings.patch_embeddings.projection"
    conv = w.ref(proj + ".weight", (c, s.channels, p, p))
    weight = g.weight(proj + ".weight.T", FLOAT16, (s.channels * p * p, c),
                      lambda: _to_fp16(conv).reshape(c, -1).t().contiguous(), tag=conv.where())
    emb = n("Add", [n("MatMul", [patches, weight]), w.vector(proj + ".bias", c)])
    cls = n("Expand", [w.tensor(TOWER + "embeddings.cls_token", (1, 1, c)),
                       n("Concat", [n("Shape", [x], {"start": 0, "end": 1}), i64(1, c)], {"axis": 0})])
    h = n("Add", [n("Concat", [cls, emb], {"axis": 1}),
                  w.tensor(TOWER + "embeddings.position_embeddings", (1, grid * grid + 1, c))])
    scale = g.const(np.array(1 / math.sqrt(d), np.float16))
    for i in range(s.layers):
        g.scope = f"vision.layer.{i}"
        pre = f"{TOWER}encoder.layer.{i}."
        y = norm(h, pre + "layernorm_before", c, s.norm)
        q, k, v = (linear(y, f"{pre}attention.{m}_proj", c, c, s.qkv_bias) for m in "qkv")
        if s.qk_norm:
            q, k = norm(q, pre + "attention.q_norm", c, "rms_norm"), norm(k, pre + "attention.k_norm", c, "rms_norm")

        def heads(t):
            return n("Transpose", [n("Reshape", [t, i64(0, 0, s.heads, d)])], {"perm": [0, 2, 1, 3]})

        qh = n("Mul", [heads(q), scale])
        kt = n("Transpose", [n("Reshape", [k, i64(0, 0, s.heads, d)])], {"perm": [0, 2, 3, 1]})
        probs = fp16(n("Softmax", [fp32(n("MatMul", [qh, kt]))], {"axis": -1}))
        attn = n("Reshape", [n("Transpose", [n("MatMul", [probs, heads(v)])], {"perm": [0, 2, 1, 3]}),
                             i64(0, 0, c)])
        attn = linear(attn, pre + "attention.projection_layer", c, c)
        h = n("Add", [h, n("Mul", [attn, w.vector(pre + "lambda_1", c)])])
        y = norm(h, pre + "layernorm_after", c, s.norm)
        mlp = linear(gelu(linear(y, pre + "mlp.fc1", s.intermediate, c)), pre + "mlp.fc2", c, s.intermediate)
        h = n("Add", [h, n("Mul", [mlp, w.vector(pre + "lambda_2", c)])])
    g.scope = "vision.head"
    if s.final_norm:
        h = norm(h, TOWER + "layernorm", c, "layer_norm")
    feats = n("Slice", [h, i64(1), i64(grid * grid + 1), i64(1)])  # the CLS token dropped
    shuffled = _pixel_shuffle_graph(g, feats, grid, c, s.ratio)  # [N, tokens, shuffled]
    y = norm(shuffled, PROJECTOR + "layer_norm", s.shuffled, "layer_norm")
    y = linear(gelu(linear(y, PROJECTOR + "linear_1", s.text_hidden, s.shuffled)), PROJECTOR + "linear_2",
               s.text_hidden, s.text_hidden)
    g.scope = ""
    g.output(n("Reshape", [y, i64(-1, s.text_hidden)]), OUTPUT, FLOAT16, ["num_image_tokens", s.text_hidden])


def _pixel_shuffle_graph(g, feats: str, grid: int, c: int, ratio: float) -> str:
    """transformers' InternVLModel.pixel_shuffle on `[N, grid*grid, C]`, then flattened to tokens."""
    n, i64 = g.node, g.i64
    small, k = int(grid * ratio), int(1 / ratio)
    y = n("Reshape", [feats, i64(0, grid, small, c * k)])
    y = n("Reshape", [n("Transpose", [y], {"perm": [0, 2, 1, 3]}), i64(0, small, small, c * k * k)])
    return n("Reshape", [n("Transpose", [y], {"perm": [0, 2, 1, 3]}), i64(0, small * small, c * k * k)])


def _to_fp16(ref):
    from ..models.weights import to_fp16

    return to_fp16(ref)


GOLDEN_GRID = (1, 2)  # the golden image: one row of two tiles, so the runtime adds a thumbnail (three tiles)


def golden_inputs(s: InternVisionSpec) -> dict[str, np.ndarray]:
    """One synthetic image as InternViTRunner tiles it (edgellm_core/image_preprocess.py): at its grid's size (no
    resize), its GOLDEN_GRID sub-tiles row-major, then the thumbnail (resized, as the runtime does, with an
    approximation of its filter), normalized with the runtime's ImageNet mean / std: `[3, C, S, S]` fp16."""
    from edgellm_core.image_preprocess import internvl_tiles, synthetic_image

    rows, cols = GOLDEN_GRID
    image = synthetic_image(rows * s.image_size, cols * s.image_size, seed=20261202, channels=s.channels)
    return {INPUT: internvl_tiles(image, tile=s.image_size).astype(np.float16)}


# -- eager face -------------------------------------------------------------------------------------
def eager(inputs: dict, t: dict, s: InternVisionSpec):
    """What the graph computes, in torch: `inputs[INPUT]` `[N, C, S, S]` (fp16 values) and the graph's
    initializers `t` by name (fp16 tensors) -> `[N * tokens, text_hidden]` fp32 holding fp16 values."""
    import torch

    def r16(x):
        return x.half().float()

    def f(name):
        return t[name].float()

    def linear(y, name, bias=True):
        out = r16(y @ f(name + ".weight.T"))
        return r16(out + f(name + ".bias")) if bias else out

    def norm(y, name, kind):
        if kind == "layer_norm":
            return r16(torch.nn.functional.layer_norm(y, y.shape[-1:], f(name + ".weight"), f(name + ".bias"), s.eps))
        return r16(y * torch.rsqrt((y * y).mean(-1, keepdim=True) + s.eps) * f(name + ".weight"))

    def gelu(y):
        return r16(torch.nn.functional.gelu(y))

    c, p, grid, d = s.hidden, s.patch_size, s.grid, s.hidden // s.heads
    x = torch.from_numpy(inputs[INPUT]).float()
    nt = x.shape[0]
    patches = x.reshape(nt, s.channels, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(nt, grid * grid, -1)
    proj = TOWER + "embeddings.patch_embeddings.projection"
    emb = r16(r16(patches @ f(proj + ".weight.T")) + f(proj + ".bias"))
    h = torch.cat([f(TOWER + "embeddings.cls_token").expand(nt, 1, c), emb], dim=1)
    h = r16(h + f(TOWER + "embeddings.position_embeddings"))
    scale = float(np.float16(1 / math.sqrt(d)))
    for i in range(s.layers):
        pre = f"{TOWER}encoder.layer.{i}."
        y = norm(h, pre + "layernorm_before", s.norm)
        q, k, v = (linear(y, f"{pre}attention.{m}_proj", s.qkv_bias) for m in "qkv")
        if s.qk_norm:
            q, k = norm(q, pre + "attention.q_norm", "rms_norm"), norm(k, pre + "attention.k_norm", "rms_norm")
        qh, kh, vh = (z.reshape(nt, -1, s.heads, d).transpose(1, 2) for z in (q, k, v))
        probs = r16(torch.softmax(r16(r16(qh * scale) @ kh.transpose(-1, -2)), dim=-1))
        attn = r16(probs @ vh).transpose(1, 2).reshape(nt, -1, c)
        attn = linear(attn, pre + "attention.projection_layer")
        h = r16(h + r16(attn * f(pre + "lambda_1")))
        mlp = linear(gelu(linear(norm(h, pre + "layernorm_after", s.norm), pre + "mlp.fc1")), pre + "mlp.fc2")
        h = r16(h + r16(mlp * f(pre + "lambda_2")))
    if s.final_norm:
        h = norm(h, TOWER + "layernorm", "layer_norm")
    feats = h[:, 1:]
    small, k = int(grid * s.ratio), int(1 / s.ratio)
    y = feats.reshape(nt, grid, small, c * k).transpose(1, 2).reshape(nt, small, small, c * k * k)
    y = y.transpose(1, 2).reshape(nt, small * small, -1)
    y = norm(y, PROJECTOR + "layer_norm", "layer_norm")
    y = linear(gelu(linear(y, PROJECTOR + "linear_1")), PROJECTOR + "linear_2")
    return y.reshape(-1, s.text_hidden)


def golden_image(s: InternVisionSpec) -> dict:
    """The golden image as the LLM's image scenario uses it: all of its tiles' tokens (sub-tiles, thumbnail),
    in the runtime's order; InternVL's language model has plain RoPE (no grid)."""
    rows, cols = GOLDEN_GRID
    return {"counts": [s.tokens_per_tile * (rows * cols + 1)], "grids": None, "merge": None}
