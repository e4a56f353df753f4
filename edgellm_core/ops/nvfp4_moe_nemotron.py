"""trt_edgellm::Nvfp4MoePlugin (Edge-LLM 0.7.1): Nemotron-H's routed experts with NVFP4 weights: sigmoid
group-top-k routing, ReLU^2 experts without a gate, and the weighted combine, in one op (contract
families.md §2.4, quant.md §3.12). The shared expert is not part of it.

Semantics, from the 0.7.1 sources:
- inputs (`cpp/plugins/nvfp4MoePlugin/nvfp4MoePlugin.cpp::supportsFormatCombination`, the translation in
  `experimental/llm_loader/onnx/dynamo_translations.py`): router_logits fp32 `[T, E]` (T = B*S),
  hidden_states fp16 `[B, S, H]`, hidden_global_scale fp32 `[2]` (FC1, FC2 activation global scales, one for
  all experts), up_qweights int8 `[E, H, I/2]`, up_block_scale int8 `[E, pad128(I), pad4(H/16)]`,
  up_global_scale fp32 `[E]`, down_qweights int8 `[E, I, H/2]`, down_block_scale int8
  `[E, pad128(H), pad4(I/16)]`, down_global_scale fp32 `[E]`, up_block_scale_decode int8 `[E, H/16, I]`,
  down_block_scale_decode int8 `[E, I/16, H]`, e_score_correction_bias fp32 `[E]`; attributes num_experts,
  top_k, hidden_size, moe_inter_size, activation_type (0 = ReLU^2), n_group, topk_group, norm_topk_prob,
  routing_mode (1 = sigmoid group top-k) INT and routed_scaling_factor FLOAT; output fp16 `[B, S, H]`;
- weights are N-major (`checkpoint/repacking.py::_nibble_transpose_fp4`): row k of `[K, N/2]` holds the N
  outputs' e2m1 codes, low nibble = even n. Block scales (one per 16 along K, per output n) come twice: the
  prefill copy in the 128x4 atom layout (`_atom_sf_offsets`: scale [n, j] of the `[N, K/16]` matrix at
  [n//128, j//4, n%32, (n%128)//32, j%4], the layout nvfp4_moe.swizzle_scales writes), the decode copy
  row-major `[K/16, N]`, each byte bits 14..7 of the fp16 encoding of the scale
  (`_marlin_project_raw_fp8`), read back as the fp16 whose bits are byte << 7
  (`nvf4_w4an/marlin_template.cuh::decodeSfByteToFloat`): exact for every positive e4m3 value;
- routing (`moeSigmoidGroupTopkKernels.cu`): s = sigmoid(logit) in fp32, choice = s + bias; each group scored
  by the sum of its two best choices; topk_group groups kept (the others -FLT_MAX); top_k experts by choice;
  weights the UNBIASED s, times 1 / (their sum) when norm_topk_prob (no epsilon; skipped for a zero sum),
  then times routed_scaling_factor;
- dispatch (`enqueue`): T = B*S <= 16 takes the decode path, T > 16 the prefill path;
- decode (`enqueueDecoding`, W4A16 GEMVs): the fp16 tokens are NOT quantized: up = fp16(x . W_up) with
  W = e2m1 x decode scale x up_global_scale[e]; the down GEMV applies ReLU^2 to the fp16 up values (fp32
  `moeActivation`) and adds w x (act . W_down) into the zeroed fp16 output with fp16 atomics;
  hidden_global_scale is not read;
- prefill (`enqueuePrefill`): the tokens are NVFP4-quantized once with hidden_global_scale[0]
  (`fp4Quantize.cu`: block scale e4m3(amax / (6 g)), codes e2m1_rn(x / (s g)), as fp4.quantize_eager), FC1 is
  a block-scaled FP4 GEMM (codes x block scales only) whose epilogue multiplies by alpha1[e] =
  hidden_global_scale[0] x up_global_scale[e] (`alphaCompute.cu`) and applies ReLU^2, stored fp16; that is
  quantized with hidden_global_scale[1]; FC2 likewise with alpha2[e] = hidden_global_scale[1] x
  down_global_scale[e]; the finalize kernel adds w x fp16(down) into the zeroed fp16 output.
Modelled here: fp32 accumulation for every dot product, fp16 roundings where the kernels store fp16, the
experts added in expert order, each addition rounded to fp16 (the atomics' order is not fixed; the decode
GEMVs accumulate partly in fp16, so the runtime differs from both faces by fp16 rounding noise).

Kernel limits (`configurePlugin`, `nvf4_w4an/kernels.h`): hidden_size % 64, moe_inter_size % 64 (ReLU^2:
nOut = I), 1 <= top_k <= num_experts, n_group divides num_experts, 1 <= topk_group <= n_group,
quantization group 16. SMs: the prefill grouped GEMMs are CuTeDSL tcgen05 AOT kernels for SM 100/101/103/110
(`kernelSrcs/nvfp4_moe_cutedsl/README.md`); edgellm_validate/targets.py gates on them.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, GraphBuilder
from edgellm_core.ops import fp4, nvfp4_moe
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "Nvfp4MoePlugin"
INPUTS = ("router_logits", "hidden_states", "hidden_global_scale", "up_qweights", "up_block_scale",
          "up_global_scale", "down_qweights", "down_block_scale", "down_global_scale", "up_block_scale_decode",
          "down_block_scale_decode", "e_score_correction_bias")
OUTPUTS = ("output",)
INT_ATTRS = ("num_experts", "top_k", "hidden_size", "moe_inter_size", "activation_type", "n_group", "topk_group",
             "norm_topk_prob", "routing_mode")
FLOAT_ATTRS = ("routed_scaling_factor",)
ACTIVATION_RELU2 = 0
ROUTING_SIGMOID_GROUP_TOPK = 1
DECODE_MAX_TOKENS = 16  # kPrefillDispatchThreshold: T <= 16 decode, else prefill
BLOCK = 16
SMS = (100, 101, 103, 110)
FLT_MAX = float(np.finfo(np.float32).max)


def _pad(a: int, b: int) -> int:
    return -(-a // b) * b


def check_shape(hidden: int, inter: int, experts: int, top_k: int, n_group: int, topk_group: int) -> str | None:
    """Why the 0.7.1 plugin refuses these sizes (configurePlugin, the decode GEMVs' strips), or None."""
    if hidden <= 0 or hidden % 64:
        return f"hidden_size {hidden} is not a positive multiple of 64"
    if inter <= 0 or inter % 64:
        return f"moe_intermediate_size {inter} is not a positive multiple of 64"
    if experts <= 0 or not 0 < top_k <= experts:
        return f"num_experts_per_tok {top_k} is not in 1..n_routed_experts ({experts})"
    if n_group <= 0 or experts % n_group or not 0 < topk_group <= n_group:
        return f"n_group {n_group} / topk_group {topk_group} do not split {experts} experts"
    return None


def stack_shapes(experts: int, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """The ten weight inputs' shapes, as supportsFormatCombination checks them."""
    return {"hidden_global_scale": (2,),
            "up_qweights": (experts, hidden, inter // 2),
            "up_block_scale": (experts, _pad(inter, 128), _pad(hidden // BLOCK, 4)),
            "up_global_scale": (experts,),
            "down_qweights": (experts, inter, hidden // 2),
            "down_block_scale": (experts, _pad(hidden, 128), _pad(inter // BLOCK, 4)),
            "down_global_scale": (experts,),
            "up_block_scale_decode": (experts, hidden // BLOCK, inter),
            "down_block_scale_decode": (experts, inter // BLOCK, hidden)}


# -- layouts (numpy): checkpoint `[N, K/2]` codes and `[N, K/16]` fp8 scales -> the plugin's ------------
def n_major_codes(packed_nk: np.ndarray) -> np.ndarray:
    """ModelOpt `[N, K/2]` bytes (low nibble = even k) -> int8 `[K, N/2]` (low nibble = even n)."""
    b = np.ascontiguousarray(packed_nk).view(np.uint8)
    n, half = b.shape
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(n, 2 * half).T  # [K, N]
    return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)


def codes_from_n_major(packed_kn: np.ndarray) -> np.ndarray:
    """Inverse of :func:`n_major_codes`: uint8 `[N, K/2]` in ModelOpt's byte layout."""
    b = np.ascontiguousarray(packed_kn).view(np.uint8)
    k, half = b.shape
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(k, 2 * half).T  # [N, K]
    return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def prefill_scales(sf_nk: np.ndarray) -> np.ndarray:
    """fp8 bytes `[N, K/16]` -> int8 `[pad128(N), pad4(K/16)]` in the 128x4 atom layout."""
    s5 = nvfp4_moe.swizzle_scales(sf_nk)
    return s5.reshape(s5.shape[0] * 128, s5.shape[1] * 4)


def scales_from_prefill(s2: np.ndarray, n: int, ks: int) -> np.ndarray:
    """Inverse of :func:`prefill_scales`: uint8 `[N, K/16]`."""
    s2 = np.ascontiguousarray(s2)
    return nvfp4_moe.unswizzle_scales(s2.reshape(s2.shape[0] // 128, s2.shape[1] // 4, 32, 4, 4), n, ks)


def _fp16_top_bits_table() -> np.ndarray:
    """fp8 e4m3 byte -> the decode-scale byte (bits 14..7 of the fp16 of its value; NaN bytes -> 0)."""
    vals = nvfp4_moe.FP8_VALUES.astype(np.float16)
    bits = np.nan_to_num(vals).view(np.uint16).astype(np.uint32)
    return (((bits << 1) & 0xFF00) >> 8).astype(np.uint8)


DECODE_BYTE = _fp16_top_bits_table()
# decode-scale byte -> fp32 value: the fp16 with bits byte << 7 (decodeSfByteToFloat)
DECODE_VALUES = (np.arange(256, dtype=np.uint16) << 7).view(np.float16).astype(np.float32)


def decode_scales(sf_nk: np.ndarray) -> np.ndarray:
    """fp8 bytes `[N, K/16]` -> int8 `[K/16, N]` decode scales (exact: DECODE_VALUES[byte] == fp8 value for
    every non-negative finite e4m3 byte)."""
    return np.ascontiguousarray(DECODE_BYTE[np.ascontiguousarray(sf_nk).view(np.uint8)].T).view(np.int8)


# -- face 1: torch op with eager reference ----------------------------------------------------------
@functools.cache
def register_torch_op():
    import torch

    schema = ("nvfp4_moe_nemotron(Tensor router_logits, Tensor hidden_states, Tensor hidden_global_scale, "
              "Tensor up_qweights, Tensor up_block_scale, Tensor up_global_scale, Tensor down_qweights, "
              "Tensor down_block_scale, Tensor down_global_scale, Tensor up_block_scale_decode, "
              "Tensor down_block_scale_decode, Tensor e_score_correction_bias, int num_experts, int top_k, "
              "int hidden_size, int moe_inter_size, int activation_type, int n_group, int topk_group, "
              "int norm_topk_prob, float routed_scaling_factor, int routing_mode) -> Tensor")
    return define_torch_op("trt_edgellm", schema, _eager, lambda r, x, *rest: torch.empty_like(x))


def _r16(x):
    return x.half().float()


def route_torch(logits, bias, top_k: int, n_group: int, topk_group: int, norm: bool, scale: float):
    """moeSigmoidGroupTopk over fp32 `[T, E]`: dense fp32 weights `[T, E]` (zeros off the top-k)."""
    import torch

    t, e = logits.shape
    scores = 1.0 / (1.0 + torch.exp(-logits.float()))
    choice = (scores + bias.float()).view(t, n_group, e // n_group)
    per = e // n_group
    top2 = choice.topk(min(2, per), dim=-1).values
    group = top2.sum(-1) if per >= 2 else top2[..., 0] - FLT_MAX
    kept = group.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group, dtype=torch.bool).scatter(-1, kept, True)
    choice = choice.masked_fill(~keep[..., None], -FLT_MAX).view(t, e)
    idx = choice.topk(top_k, dim=-1).indices
    w = scores.gather(-1, idx)
    if norm:
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w * (1.0 / torch.where(total > 0, total, 1.0)), w)
    w = w * torch.tensor(scale, dtype=torch.float32)
    return torch.zeros_like(scores).scatter(-1, idx, w)


def weight_torch(packed_kn, scale_nk, global_scale):
    """One expert's `[K, N]` fp32 weight: e2m1(code) x block scale `[N, K/16]` (fp32 values) x global scale."""
    import torch

    b = packed_kn.contiguous().view(torch.uint8).long()
    k = b.shape[0]
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(k, -1)
    vals = torch.from_numpy(fp4.E2M1_VALUES)[codes]
    return vals * scale_nk.t().repeat_interleave(BLOCK, dim=0) * global_scale.float()


def prefill_scale_torch(s2, n: int, ks: int):
    import torch

    u = s2.contiguous().view(torch.uint8).long()
    mt, kt = u.shape[0] // 128, u.shape[1] // 4
    u = u.reshape(mt, kt, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(mt * 128, kt * 4)[:n, :ks]
    return torch.from_numpy(nvfp4_moe.FP8_VALUES)[u]


def decode_scale_torch(s_kn):
    import torch

    return torch.from_numpy(DECODE_VALUES)[s_kn.contiguous().view(torch.uint8).long()].t()  # [N, K/16]


def quantized_torch(x, global_scale):
    """x `[R, K]` NVFP4-quantized with global scale g, returned without g (what the block-scaled MMA sees)."""
    return nvfp4_moe.quantize_torch(x, global_scale)


def expert_down_torch(x, uq, us, ug, dq, ds, dg, hgs, h: int, inter: int, prefill: bool):
    """fp16 `[R, H]` (as fp32) of one expert on the rows x (fp32 of fp16 values). prefill: us / ds are the
    atom-layout block scales and hgs the two activation global scales; decode: us / ds are the decode scales."""
    import torch

    if prefill:
        one = torch.ones((), dtype=torch.float32)
        wu = weight_torch(uq, prefill_scale_torch(us, inter, h // BLOCK), one)
        wd = weight_torch(dq, prefill_scale_torch(ds, h, inter // BLOCK), one)
        acc = quantized_torch(x, hgs[0]) @ wu
        act = _r16(torch.relu(hgs[0].float() * ug.float() * acc) ** 2)
        return _r16(hgs[1].float() * dg.float() * (quantized_torch(act, hgs[1]) @ wd))
    up = _r16(x @ weight_torch(uq, decode_scale_torch(us), ug))
    return _r16(_r16(torch.relu(up) ** 2) @ weight_torch(dq, decode_scale_torch(ds), dg))


def _eager(logits, hidden, hgs, uq, us, ug, dq, ds, dg, us_dec, ds_dec, bias, experts, top_k, h, inter, activation,
           n_group, topk_group, norm, scale, routing_mode):
    import torch

    if activation != ACTIVATION_RELU2 or routing_mode != ROUTING_SIGMOID_GROUP_TOPK:
        raise NotImplementedError("only activation_type 0 (ReLU^2) with routing_mode 1 (sigmoid group top-k) "
                                  f"is modelled, got {activation} / {routing_mode}")
    x = hidden.reshape(-1, h).float()
    prefill = x.shape[0] > DECODE_MAX_TOKENS
    weights = route_torch(logits.reshape(-1, experts), bias, top_k, n_group, topk_group, bool(norm), scale)
    out = torch.zeros_like(x)
    for e in range(experts):
        rows = weights[:, e].nonzero().flatten()
        if rows.numel() == 0:
            continue
        su, sd = (us[e], ds[e]) if prefill else (us_dec[e], ds_dec[e])
        down = expert_down_torch(x[rows], uq[e], su, ug[e], dq[e], sd, dg[e], hgs, h, inter, prefill)
        out[rows] = _r16(out[rows] + _r16(weights[rows, e][:, None] * down))
    return out.reshape(hidden.shape).to(hidden.dtype)


# -- face 2: schema ---------------------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.AttrType
    types = ("tensor(float)", "tensor(float16)", "tensor(float)", "tensor(int8)", "tensor(int8)", "tensor(float)",
             "tensor(int8)", "tensor(int8)", "tensor(float)", "tensor(int8)", "tensor(int8)", "tensor(float)")
    return onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, 1, "Edge-LLM NVFP4 MoE (Nemotron-H): sigmoid group top-k routing, ReLU^2 NVFP4 experts.",
        inputs=[fp(name, t) for name, t in zip(INPUTS, types)],
        outputs=[fp(OUTPUTS[0], "tensor(float16)")],
        attributes=[onnx.defs.OpSchema.Attribute(a, A.INT, "") for a in INT_ATTRS]
        + [onnx.defs.OpSchema.Attribute(a, A.FLOAT, "") for a in FLOAT_ATTRS],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation ----------------------------------------------------------------------------
def emit(g: GraphBuilder, *inputs: str, num_experts: int, top_k: int, hidden_size: int, moe_inter_size: int,
         n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float) -> str:
    """`inputs` in INPUTS order."""
    assert len(inputs) == len(INPUTS)
    attrs = {"num_experts": num_experts, "top_k": top_k, "hidden_size": hidden_size, "moe_inter_size": moe_inter_size,
             "activation_type": ACTIVATION_RELU2, "n_group": n_group, "topk_group": topk_group,
             "norm_topk_prob": int(bool(norm_topk_prob)), "routed_scaling_factor": float(routed_scaling_factor),
             "routing_mode": ROUTING_SIGMOID_GROUP_TOPK}
    return g.node(OP_TYPE, list(inputs), attrs, domain=DOMAIN)


# -- face 4: lowering to standard ONNX --------------------------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """Dense over the experts (every expert on every token, an unrouted one weighted by an exact 0), both
    paths computed and the one the plugin would take (T <= 16: decode) selected, then a Scan adding the
    experts in order into the fp16 sum."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if a.get("activation_type", 0) != ACTIVATION_RELU2 or a.get("routing_mode", 0) != ROUTING_SIGMOID_GROUP_TOPK:
        raise NotImplementedError(f"{OP_TYPE}: only activation_type 0 with routing_mode 1 is lowered")
    e, k, h, inter = (a[x] for x in ("num_experts", "top_k", "hidden_size", "moe_inter_size"))
    ng, kg, norm, scale = a["n_group"], a["topk_group"], a["norm_topk_prob"], float(a["routed_scaling_factor"])
    key = f"{e}_{k}_{h}_{inter}_{ng}_{kg}_{norm}_{scale!r}"
    name = f"{OP_TYPE}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    n, i64 = g.node, g.i64
    f32 = lambda v: g.const(np.array(v, np.float32))  # noqa: E731
    r16 = lambda v: n("Cast", [n("Cast", [v], {"to": FLOAT16})], {"to": FLOAT})  # noqa: E731
    (logits, hidden, hgs, uq, us, ug, dq, ds, dg, us_dec, ds_dec, bias) = INPUTS

    # routing -> dense weights [T, E]
    lg = n("Reshape", [logits, i64(-1, e)])
    scores = n("Reciprocal", [n("Add", [f32(1.0), n("Exp", [n("Neg", [lg])])])])
    per = e // ng
    choice = n("Reshape", [n("Add", [scores, bias]), i64(-1, ng, per)])
    if per >= 2:
        top2 = n("TopK", [choice, i64(2)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)[0]
        group = n("ReduceSum", [top2, i64(-1)], {"keepdims": 0})
    else:
        group = n("Sub", [n("Reshape", [choice, i64(0, ng)]), f32(FLT_MAX)])
    kept = n("TopK", [group, i64(kg)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)[1]
    hot = n("OneHot", [kept, i64(ng), g.const(np.array([0.0, 1.0], np.float32))], {"axis": -1})
    keep = n("Cast", [n("ReduceMax", [hot, i64(-2)], {"keepdims": 0})], {"to": onnx.TensorProto.BOOL})
    masked = n("Reshape", [n("Where", [n("Unsqueeze", [keep, i64(-1)]), choice, f32(-FLT_MAX)]), i64(-1, e)])
    idx = n("TopK", [masked, i64(k)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)[1]
    w = n("GatherElements", [scores, idx], {"axis": -1})
    if norm:
        total = n("ReduceSum", [w, i64(-1)], {"keepdims": 1})
        pos = n("Greater", [total, f32(0.0)])
        w = n("Where", [pos, n("Mul", [w, n("Reciprocal", [n("Where", [pos, total, f32(1.0)])])]), w])
    w = n("Mul", [w, f32(scale)])
    weights = n("ScatterElements", [n("Mul", [scores, f32(0.0)]), idx, w], {"axis": -1})  # [T, E]

    def codes(packed, kk, nn):  # [E, K, N/2] int8 -> [E, K, N] fp32 e2m1 values
        b = n("Mod", [n("Cast", [packed], {"to": INT32}), g.const(np.array(256, np.int32))])
        sixteen = g.const(np.array(16, np.int32))
        c = n("Concat", [n("Unsqueeze", [n("Mod", [b, sixteen]), i64(-1)]),
                         n("Unsqueeze", [n("Div", [b, sixteen]), i64(-1)])], {"axis": -1})
        return n("Gather", [g.const(fp4.E2M1_VALUES), n("Reshape", [c, i64(e, kk, nn)])], {"axis": 0})

    def byte(s):
        return n("Mod", [n("Cast", [s], {"to": INT32}), g.const(np.array(256, np.int32))])

    def expand_k(sf_kn, kk, nn):  # [E, K/16, N] -> [E, K, N]
        rep = n("Expand", [n("Unsqueeze", [sf_kn, i64(2)]), i64(e, kk // BLOCK, BLOCK, nn)])
        return n("Reshape", [rep, i64(e, kk, nn)])

    def prefill_w(packed, s, kk, nn):  # e2m1 x block scale, no global scale
        mt, kt = _pad(nn, 128) // 128, _pad(kk // BLOCK, 4) // 4
        sb = n("Reshape", [byte(s), i64(e, mt, kt, 32, 4, 4)])
        sb = n("Reshape", [n("Transpose", [sb], {"perm": [0, 1, 4, 3, 2, 5]}), i64(e, mt * 128, kt * 4)])
        sb = n("Slice", [sb, i64(0, 0), i64(nn, kk // BLOCK), i64(1, 2)])  # [E, N, K/16]
        sf = n("Gather", [g.const(nvfp4_moe.FP8_VALUES), n("Transpose", [sb], {"perm": [0, 2, 1]})], {"axis": 0})
        return n("Mul", [codes(packed, kk, nn), expand_k(sf, kk, nn)])

    def decode_w(packed, s, gs, kk, nn):  # e2m1 x decode scale x global scale
        sf = n("Gather", [g.const(DECODE_VALUES), byte(s)], {"axis": 0})  # [E, K/16, N]
        return n("Mul", [n("Mul", [codes(packed, kk, nn), expand_k(sf, kk, nn)]), n("Reshape", [gs, i64(e, 1, 1)])])

    def quantized(v, gs, kk):  # [..., K] -> e2m1 x block scale, quantized with global scale gs (a [1] tensor)
        shape = n("Shape", [v])
        blocks = n("Reshape", [v, i64(-1, kk // BLOCK, BLOCK)])
        amax = n("ReduceMax", [n("Abs", [blocks]), i64(-1)], {"keepdims": 1})
        sf = n("Cast", [n("Cast", [n("Div", [amax, n("Mul", [gs, f32(6.0)])])],
                          {"to": onnx.TensorProto.FLOAT8E4M3FN})], {"to": FLOAT})
        denom = n("Mul", [sf, gs])
        pos = n("Greater", [denom, f32(0.0)])
        scaled = n("Where", [pos, n("Div", [blocks, n("Where", [pos, denom, f32(1.0)])]), f32(0.0)])
        vals = n("Gather", [g.const(fp4.E2M1_VALUES), n("Cast", [fp4.e2m1_codes_onnx(g, scaled)], {"to": INT32})],
                 {"axis": 0})
        return n("Reshape", [n("Mul", [vals, sf]), shape])

    x = n("Unsqueeze", [n("Cast", [n("Reshape", [hidden, i64(-1, h)])], {"to": FLOAT}), i64(0)])  # [1, T, H]
    col = lambda v: n("Reshape", [v, i64(e, 1, 1)])  # noqa: E731
    g0 = n("Slice", [hgs, i64(0), i64(1)])
    g1 = n("Slice", [hgs, i64(1), i64(2)])
    # prefill path
    acc1 = n("MatMul", [quantized(x, g0, h), prefill_w(uq, us, h, inter)])  # [E, T, I]
    act = r16(n("Pow", [n("Relu", [n("Mul", [n("Mul", [col(ug), g0]), acc1])]), f32(2.0)]))
    acc2 = n("MatMul", [quantized(act, g1, inter), prefill_w(dq, ds, inter, h)])  # [E, T, H]
    down_p = r16(n("Mul", [n("Mul", [col(dg), g1]), acc2]))
    # decode path
    up = r16(n("MatMul", [x, decode_w(uq, us_dec, ug, h, inter)]))
    down_d = r16(n("MatMul", [r16(n("Pow", [n("Relu", [up]), f32(2.0)])), decode_w(dq, ds_dec, dg, inter, h)]))
    tokens = n("Gather", [n("Shape", [x]), i64(1)])
    down = n("Where", [n("Greater", [tokens, g.const(np.array(DECODE_MAX_TOKENS, np.int64))]), down_p, down_d])

    acc0 = n("Reshape", [n("Mul", [x, f32(0.0)]), i64(-1, h)])
    w_e = n("Unsqueeze", [n("Transpose", [weights], {"perm": [1, 0]}), i64(-1)])  # [E, T, 1]
    acc = n("Scan", [acc0, down, w_e], {"body": _combine_body(), "num_scan_inputs": 2})
    n("Reshape", [n("Cast", [acc], {"to": FLOAT16}), n("Shape", [hidden])], outputs=[OUTPUTS[0]])
    return helper.make_function(LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)])


def _combine_body() -> onnx.GraphProto:
    """acc = fp16(acc + fp16(w x down)), one expert per iteration (skipped rows add an exact 0)."""
    r = "nvmoen_"

    def r16(v, out):
        return [helper.make_node("Cast", [v], [out + "_h"], to=FLOAT16),
                helper.make_node("Cast", [out + "_h"], [out], to=FLOAT)]

    nodes = [helper.make_node("Mul", [r + "w", r + "down"], [r + "c"]), *r16(r + "c", r + "c16"),
             helper.make_node("Add", [r + "acc", r + "c16"], [r + "s"]), *r16(r + "s", r + "acc_out")]
    return helper.make_graph(
        nodes, "nvmoen_combine",
        [helper.make_tensor_value_info(r + "acc", FLOAT, None), helper.make_tensor_value_info(r + "down", FLOAT, None),
         helper.make_tensor_value_info(r + "w", FLOAT, None)],
        [helper.make_tensor_value_info(r + "acc_out", FLOAT, None)])
