"""trt_edgellm::NvFP4MoEPluginGeforce (Edge-LLM 0.7.1): softmax top-k routing, NVFP4 SwiGLU experts with
on-the-fly NVFP4 activation quantization, and the weighted combine, in one op (contract families.md §2.3,
quant.md §3.4, §3.12).

Semantics, from the 0.7.1 sources:
- inputs (`cpp/plugins/nvfp4MoePluginGeforce/nvfp4MoePluginGeforce.cpp::supportsFormatCombination`):
  router_logits fp32 `[T, E]` (T = B*S), hidden_states fp16 `[B, S, H]`, fc1_qweights int8 `[E, 2I, H/2]`,
  fc1_blocks_scale int8 `[E, ceil(2I/128), ceil(H/64), 32, 4, 4]`, fc1_alpha fp32 `[E]`, fc2_qweights int8
  `[E, H, I/2]`, fc2_blocks_scale int8 `[E, ceil(H/128), ceil(I/64), 32, 4, 4]`, fc2_alpha, input_global_scale,
  down_input_scale fp32 `[E]`; INT attributes num_experts, top_k, hidden_size, moe_inter_size,
  activation_type (2 = SwiGLU), backend (0 auto), max_routed_rows (0 = from the profile), io_dtype (1 = fp16);
  output fp16 `[B, S, H]`;
- routing (`enqueue`: `moeTopkSoftmax(..., renormalize=true, 0)`): softmax over E in fp32, top k, times
  1 / (their sum), as the Int4MoePlugin (int4_moe.route_torch);
- weights (`kernelSrcs/nvfp4_fused_moe_cutedsl/moe_decode_kernel.py`, the prefill kernel alike): rows of
  e2m1 codes, two per byte, low nibble = even column (ModelOpt's own byte layout), with fp8 e4m3 block
  scales per 16 along K. FC1 rows are [up; gate]: N-tiles 0..I/128-1 feed the "up" accumulator, the rest
  "gate". The block scales are stored in the CuTe block-scaled MMA layout: scale [m, k] of the `[M, K/16]`
  matrix (zero-padded to M % 128, K/16 % 4) sits at [m // 128, k // 4, m % 32, (m % 128) // 32, k % 4];
- activation quantization (`fp4_common.py::quantize_block_fp4_fast`, the kernels are exported with
  `fast_math=True, input_scales_are_reciprocal=False`): per 16 along K, with g = the per-expert global
  scale, s_b = e4m3_satfinite(amax_b / (6 g)) and codes = e2m1_rn(x / (s_b g)) (the kernel multiplies by
  approximate reciprocals: an ulp apart, modelled here as exact divisions). The token rows are quantized
  with input_global_scale[e], the SwiGLU output with down_input_scale[e];
- GEMMs (block-scaled FP4 MMA, fp32 accumulation): acc = sum_k (code_a s_a)(code_w s_w): the global scales
  are NOT applied by the MMA; the epilogue multiplies by fc1_alpha[e] / fc2_alpha[e], which must therefore
  carry (activation global scale) x (weight global scale);
- SwiGLU epilogue: g = alpha acc_gate, u = alpha acc_up, act = g * sigmoid(g) * u in fp32, rounded to fp16
  (the shared-memory tile), then quantized as above;
- FC2 epilogue: d = fp16(fc2_alpha acc); each routed row adds fp16(w * d) (w the fp32 routing weight) into the
  fp16 output with `red.global.add.f16x2` atomics (`scatter_add_f16x2`), the output zeroed first. The
  atomics' order is not fixed; both faces here add the experts in expert order, rounding to fp16 after each.

FP4 values are carried as uint8 codes (bit 3 sign) and fp8 scales as their bytes, decoded through tables,
in both faces (neither torch nor onnxruntime computes on float4e2m1).

Kernel limits (`cpp/kernels/moe/nvfp4_cutedsl/cuteDslNvfp4MoeRunner.cpp::canImplement`): SM 120/121 only,
fp16 io, hidden_size == kSupportedHiddenSize (2048 in 0.7.1, a compile-time axis of the AOT kernels),
moe_inter_size > 0 and % 128 (kLevelTileN), 0 < top_k <= num_experts.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT8E4M3FN, FLOAT16, INT8, INT32, GraphBuilder
from edgellm_core.ops import fp4, int4_moe
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "NvFP4MoEPluginGeforce"
INPUTS = ("router_logits", "hidden_states", "fc1_qweights", "fc1_blocks_scale", "fc1_alpha", "fc2_qweights",
          "fc2_blocks_scale", "fc2_alpha", "input_global_scale", "down_input_scale")
OUTPUTS = ("output",)
INT_ATTRS = ("num_experts", "top_k", "hidden_size", "moe_inter_size", "activation_type", "backend",
             "max_routed_rows", "io_dtype")
ACTIVATION_SWIGLU = 2
BACKEND_AUTO = 0
IO_FP16 = 1
SUPPORTED_HIDDEN = 2048  # CuteDslNvfp4MoeRunner::kSupportedHiddenSize in 0.7.1
TILE_N = 128  # kLevelTileN
SMS = (120, 121)
BLOCK = 16


def _fp8_table() -> np.ndarray:
    """fp32 value of every e4m3fn byte (0x7f / 0xff are NaN)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 15, b & 7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0)) * sign
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


FP8_VALUES = _fp8_table()


def check_shape(hidden: int, inter: int, experts: int, top_k: int) -> str | None:
    """Why the 0.7.1 kernels cannot take these sizes (canImplement), or None."""
    if hidden != SUPPORTED_HIDDEN:
        return (f"hidden_size {hidden} is not {SUPPORTED_HIDDEN}, the one hidden size the 0.7.1 AOT-compiled "
                "CuTeDSL kernels are built for (kSupportedHiddenSize)")
    if inter <= 0 or inter % TILE_N:
        return f"moe_intermediate_size {inter} is not a positive multiple of {TILE_N} (the kernels' N tile)"
    if experts <= 0 or not 0 < top_k <= experts:
        return f"num_experts_per_tok {top_k} is not in 1..num_experts ({experts})"
    return None


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(m: int, k: int) -> tuple[int, ...]:
    """The 6-D block-scale shape of an `[M, K]` weight (K/16 scales per row)."""
    return (_ceil(m, 128), _ceil(k // BLOCK, 4), 32, 4, 4)


def stack_shapes(experts: int, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """The eight weight inputs' shapes, as supportsFormatCombination checks them."""
    return {"fc1_qweights": (experts, 2 * inter, hidden // 2),
            "fc1_blocks_scale": (experts, *scale_shape(2 * inter, hidden)),
            "fc1_alpha": (experts,),
            "fc2_qweights": (experts, hidden, inter // 2),
            "fc2_blocks_scale": (experts, *scale_shape(hidden, inter)),
            "fc2_alpha": (experts,), "input_global_scale": (experts,), "down_input_scale": (experts,)}


# -- block-scale layout (numpy) -----------------------------------------------------------------------
def swizzle_scales(sf: np.ndarray) -> np.ndarray:
    """fp8 scale bytes `[M, K/16]` (row-major, as ModelOpt stores them) -> int8 `[M/128, K/64, 32, 4, 4]`."""
    sf = np.ascontiguousarray(sf).view(np.uint8)
    m, ks = sf.shape
    mt, kt = _ceil(m, 128), _ceil(ks, 4)
    pad = np.zeros((mt * 128, kt * 4), np.uint8)
    pad[:m, :ks] = sf
    return np.ascontiguousarray(pad.reshape(mt, 4, 32, kt, 4).transpose(0, 3, 2, 1, 4)).view(np.int8)


def unswizzle_scales(s6: np.ndarray, m: int, ks: int) -> np.ndarray:
    """Inverse of :func:`swizzle_scales`: uint8 `[M, K/16]`."""
    s6 = np.ascontiguousarray(s6).view(np.uint8)
    mt, kt = s6.shape[:2]
    return np.ascontiguousarray(s6.transpose(0, 3, 2, 1, 4).reshape(mt * 128, kt * 4)[:m, :ks])


# -- face 1: torch op with eager reference ----------------------------------------------------------
@functools.cache
def register_torch_op():
    import torch

    schema = ("nvfp4_moe_geforce(Tensor router_logits, Tensor hidden_states, Tensor fc1_qweights, "
              "Tensor fc1_blocks_scale, Tensor fc1_alpha, Tensor fc2_qweights, Tensor fc2_blocks_scale, "
              "Tensor fc2_alpha, Tensor input_global_scale, Tensor down_input_scale, int num_experts, int top_k, "
              "int hidden_size, int moe_inter_size, int activation_type, int backend, int max_routed_rows, "
              "int io_dtype) -> Tensor")
    return define_torch_op("trt_edgellm", schema, _eager, lambda r, x, *rest: torch.empty_like(x))


def _r16(x):
    return x.half().float()


def weight_torch(packed, s6, m: int, k: int):
    """One expert's `[M, K]` fp32 weight without its global scale: e2m1(code) x fp8 block scale."""
    import torch

    b = packed.contiguous().view(torch.uint8).long()
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(m, k)
    vals = torch.from_numpy(fp4.E2M1_VALUES)[codes]
    mt, kt = s6.shape[:2]
    sf = s6.contiguous().view(torch.uint8).long().permute(0, 3, 2, 1, 4).reshape(mt * 128, kt * 4)[:m, : k // BLOCK]
    return vals * torch.from_numpy(FP8_VALUES)[sf].repeat_interleave(BLOCK, dim=-1)


def quantize_torch(x, global_scale):
    """x (fp32 of fp16 values) `[R, K]` NVFP4-quantized with the global scale g, returned without g:
    e2m1(code) x fp8 block scale (what the MMA multiplies)."""
    import torch

    codes, sf = fp4.quantize_eager(x, global_scale.reshape(()))
    return torch.from_numpy(fp4.E2M1_VALUES)[codes.long()] * sf.float().repeat_interleave(BLOCK, dim=-1)


def expert_act_torch(x, fc1_q, fc1_s, alpha, in_gs, hidden: int, inter: int):
    """fp16(SwiGLU) `[M, I]` (as fp32) for the rows x `[M, H]` routed to one expert."""
    import torch

    w = weight_torch(fc1_q, fc1_s, 2 * inter, hidden)
    acc = quantize_torch(x, in_gs) @ w.t()
    a = alpha.float()
    up, gate = a * acc[:, :inter], a * acc[:, inter:]
    return _r16(gate * torch.sigmoid(gate) * up)


def expert_down_torch(act, fc2_q, fc2_s, alpha, dn_gs, hidden: int, inter: int):
    """fp16(fc2_alpha x FC2) `[M, H]` (as fp32) of one expert's fp16 SwiGLU rows."""
    w = weight_torch(fc2_q, fc2_s, hidden, inter)
    return _r16(alpha.float() * (quantize_torch(act, dn_gs) @ w.t()))


def combine_torch(out, rows, down, weights):
    """The scatter: out[rows] = fp16(out[rows] + fp16(w x down)) (fp32 tensors of fp16 values)."""
    out[rows] = _r16(out[rows] + _r16(weights[:, None] * down))


def _eager(logits, hidden, fc1_q, fc1_s, fc1_a, fc2_q, fc2_s, fc2_a, in_gs, dn_gs, experts, top_k, h, inter,
           activation, backend, max_rows, io_dtype):
    import torch

    if activation != ACTIVATION_SWIGLU:
        raise NotImplementedError(f"only activation_type 2 (SwiGLU) is modelled, got {activation}")
    x = hidden.reshape(-1, h).float()
    weights, routed = int4_moe.route_torch(logits, top_k)
    out = torch.zeros_like(x)
    for e in range(experts):
        rows = routed[:, e].nonzero().flatten()
        if rows.numel() == 0:
            continue
        act = expert_act_torch(x[rows], fc1_q[e], fc1_s[e], fc1_a[e], in_gs[e], h, inter)
        down = expert_down_torch(act, fc2_q[e], fc2_s[e], fc2_a[e], dn_gs[e], h, inter)
        combine_torch(out, rows, down, weights[rows, e])
    return out.reshape(hidden.shape).to(hidden.dtype)


# -- face 2: schema ---------------------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.AttrType
    types = ("tensor(float)", "tensor(float16)", "tensor(int8)", "tensor(int8)", "tensor(float)", "tensor(int8)",
             "tensor(int8)", "tensor(float)", "tensor(float)", "tensor(float)")
    return onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, 1, "Edge-LLM fused MoE (SM 120/121): softmax top-k routing and NVFP4 SwiGLU experts.",
        inputs=[fp(name, t) for name, t in zip(INPUTS, types)],
        outputs=[fp(OUTPUTS[0], "tensor(float16)")],
        attributes=[onnx.defs.OpSchema.Attribute(a, A.INT, "") for a in INT_ATTRS],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation ----------------------------------------------------------------------------
def emit(g: GraphBuilder, router_logits: str, hidden_states: str, fc1_qweights: str, fc1_blocks_scale: str,
         fc1_alpha: str, fc2_qweights: str, fc2_blocks_scale: str, fc2_alpha: str, input_global_scale: str,
         down_input_scale: str, *, num_experts: int, top_k: int, hidden_size: int, moe_inter_size: int) -> str:
    attrs = {"num_experts": num_experts, "top_k": top_k, "hidden_size": hidden_size,
             "moe_inter_size": moe_inter_size, "activation_type": ACTIVATION_SWIGLU, "backend": BACKEND_AUTO,
             "max_routed_rows": 0, "io_dtype": IO_FP16}
    return g.node(OP_TYPE, [router_logits, hidden_states, fc1_qweights, fc1_blocks_scale, fc1_alpha, fc2_qweights,
                            fc2_blocks_scale, fc2_alpha, input_global_scale, down_input_scale], attrs, domain=DOMAIN)


# -- face 4: lowering to standard ONNX --------------------------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """A Scan over the experts: per expert, only its routed tokens (an If skips an expert nobody chose),
    codes and scales decoded through tables, the activations quantized inside, added into an fp16 sum."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("activation_type", ACTIVATION_SWIGLU) != ACTIVATION_SWIGLU:
        raise NotImplementedError(f"{OP_TYPE}: only activation_type 2 (SwiGLU) is lowered")
    e, k, h, inter = (attrs[a] for a in ("num_experts", "top_k", "hidden_size", "moe_inter_size"))
    name = f"{OP_TYPE}_{hashlib.sha1(f'{e}_{k}_{h}_{inter}'.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    n, i64 = g.node, g.i64
    logits, hidden = INPUTS[:2]
    probs = n("Softmax", [logits], {"axis": -1})
    top_v, top_i = n("TopK", [probs, i64(k)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)
    top_v = n("Mul", [top_v, n("Reciprocal", [n("ReduceSum", [top_v, i64(-1)], {"keepdims": 1})])])
    zeros = n("ConstantOfShape", [n("Shape", [probs])], {"value": helper.make_tensor("z", FLOAT, [1], [0.0])})
    weights = n("ScatterElements", [zeros, top_i, top_v], {"axis": -1})
    ones = n("ConstantOfShape", [n("Shape", [top_v])], {"value": helper.make_tensor("one", FLOAT, [1], [1.0])})
    routed = n("Greater", [n("ScatterElements", [zeros, top_i, ones], {"axis": -1}),
                           g.const(np.array(0.5, np.float32), "half")])
    x = n("Cast", [n("Reshape", [hidden, i64(-1, h)])], {"to": FLOAT})
    acc0 = n("ConstantOfShape", [n("Shape", [x])], {"value": helper.make_tensor("z", FLOAT, [1], [0.0])})
    acc, _ = n("Scan", [acc0, x, *INPUTS[2:], n("Transpose", [weights], {"perm": [1, 0]}),
                        n("Transpose", [routed], {"perm": [1, 0]})],
               {"body": _expert_body(h, inter), "num_scan_inputs": 10}, n_out=2)
    n("Reshape", [n("Cast", [acc], {"to": FLOAT16}), n("Shape", [hidden])], outputs=[OUTPUTS[0]])
    return helper.make_function(LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)])


_BODY_IN = ("nvmoe_acc", "nvmoe_x", "nvmoe_q1", "nvmoe_s1", "nvmoe_a1", "nvmoe_q2", "nvmoe_s2", "nvmoe_a2",
            "nvmoe_gs1", "nvmoe_gs2", "nvmoe_w", "nvmoe_routed")
_BODY_TYPES = (FLOAT, FLOAT, INT8, INT8, FLOAT, INT8, INT8, FLOAT, FLOAT, FLOAT, FLOAT, onnx.TensorProto.BOOL)


def _expert_body(h: int, inter: int) -> onnx.GraphProto:
    g = GraphBuilder("nvmoe_expert")
    g.function_mode = True
    g.scope = "nvmoe_expert"
    n = g.node
    acc, x, *_, routed = _BODY_IN
    rows = n("Reshape", [n("NonZero", [routed]), g.const(np.array([-1], np.int64), "nvmoe_body_flat")])
    chosen = n("Greater", [n("Size", [rows]), g.const(np.array(0, np.int64), "nvmoe_body_zero")])
    then = _routed_rows_graph(h, inter, rows)
    keep = helper.make_graph([helper.make_node("Identity", [acc], ["nvmoe_keep_acc"])], "nvmoe_keep", [],
                             [helper.make_tensor_value_info("nvmoe_keep_acc", FLOAT, None)])
    n("If", [chosen], {"then_branch": then, "else_branch": keep}, outputs=["nvmoe_acc_out"])
    n("Identity", [x], outputs=["nvmoe_x_out"])
    return helper.make_graph(
        g.nodes, "nvmoe_expert",
        [helper.make_tensor_value_info(nm, t, None) for nm, t in zip(_BODY_IN, _BODY_TYPES)],
        [helper.make_tensor_value_info("nvmoe_acc_out", FLOAT, None),
         helper.make_tensor_value_info("nvmoe_x_out", FLOAT, None)])


def _routed_rows_graph(h: int, inter: int, rows: str) -> onnx.GraphProto:
    """If-branch: the expert's FC1, SwiGLU, FC2 on its routed rows, added into the fp16 accumulator."""
    g = GraphBuilder("nvmoe_rows")
    g.function_mode = True
    g.scope = "nvmoe_rows"
    n = g.node
    c64 = lambda *v: g.const(np.array(v, np.int64), "nvmoe_rows_i64")  # noqa: E731
    f32 = lambda v: g.const(np.array(v, np.float32), "nvmoe_rows_f32")  # noqa: E731
    r16 = lambda v: n("Cast", [n("Cast", [v], {"to": FLOAT16})], {"to": FLOAT})  # noqa: E731
    acc, x, q1, s1, a1, q2, s2, a2, gs1, gs2, w, _ = _BODY_IN

    def weight(packed, s6, m, k):  # [M, K] fp32: e2m1(code) x fp8 block scale
        b = n("Mod", [n("Cast", [packed], {"to": INT32}), g.const(np.array(256, np.int32), "nvmoe_rows_256")])
        sixteen = g.const(np.array(16, np.int32), "nvmoe_rows_16")
        codes = n("Reshape", [n("Concat", [n("Unsqueeze", [n("Mod", [b, sixteen]), c64(-1)]),
                                           n("Unsqueeze", [n("Div", [b, sixteen]), c64(-1)])], {"axis": -1}),
                              c64(m, k)])
        vals = n("Gather", [g.const(fp4.E2M1_VALUES, "nvmoe_rows_e2m1"), codes], {"axis": 0})
        mt, kt = _ceil(m, 128), _ceil(k // BLOCK, 4)
        sb = n("Mod", [n("Cast", [s6], {"to": INT32}), g.const(np.array(256, np.int32), "nvmoe_rows_256")])
        sb = n("Reshape", [n("Transpose", [sb], {"perm": [0, 3, 2, 1, 4]}), c64(mt * 128, kt * 4)])
        sb = n("Slice", [sb, c64(0, 0), c64(m, k // BLOCK)])
        sf = n("Gather", [g.const(FP8_VALUES, "nvmoe_rows_fp8"), sb], {"axis": 0})  # [M, K/16]
        sf = n("Reshape", [n("Expand", [n("Unsqueeze", [sf, c64(-1)]), c64(m, k // BLOCK, BLOCK)]), c64(m, k)])
        return n("Mul", [vals, sf])

    def quantized(v, gs, k):  # [R, K] -> e2m1(code) x fp8 block scale, quantized with global scale gs
        blocks = n("Reshape", [v, c64(-1, k // BLOCK, BLOCK)])
        amax = n("ReduceMax", [n("Abs", [blocks]), c64(-1)], {"keepdims": 1})
        six_g = n("Mul", [gs, f32(6.0)])
        sf = n("Cast", [n("Cast", [n("Div", [amax, six_g])], {"to": FLOAT8E4M3FN})], {"to": FLOAT})
        denom = n("Mul", [sf, gs])
        pos = n("Greater", [denom, f32(0.0)])
        scaled = n("Where", [pos, n("Div", [blocks, n("Where", [pos, denom, f32(1.0)])]), f32(0.0)])
        vals = n("Gather", [g.const(fp4.E2M1_VALUES, "nvmoe_rows_e2m1"),
                            n("Cast", [fp4.e2m1_codes_onnx(g, scaled)], {"to": INT32})], {"axis": 0})
        return n("Reshape", [n("Mul", [vals, sf]), c64(-1, k)])

    xs = n("Gather", [x, rows], {"axis": 0})
    fc1 = n("MatMul", [quantized(xs, gs1, h), n("Transpose", [weight(q1, s1, 2 * inter, h)], {"perm": [1, 0]})])
    up = n("Mul", [a1, n("Slice", [fc1, c64(0), c64(inter), c64(1)])])
    gate = n("Mul", [a1, n("Slice", [fc1, c64(inter), c64(2 * inter), c64(1)])])
    act = r16(n("Mul", [n("Mul", [gate, n("Sigmoid", [gate])]), up]))
    fc2 = n("MatMul", [quantized(act, gs2, inter), n("Transpose", [weight(q2, s2, h, inter)], {"perm": [1, 0]})])
    down = r16(n("Mul", [a2, fc2]))
    contrib = r16(n("Mul", [down, n("Unsqueeze", [n("Gather", [w, rows], {"axis": 0}), c64(1)])]))
    idx = n("Unsqueeze", [rows, c64(1)])
    summed = r16(n("Add", [n("GatherND", [acc, idx]), contrib]))
    n("ScatterND", [acc, idx, summed], outputs=["nvmoe_rows_acc"])
    return helper.make_graph(g.nodes, "nvmoe_rows", [],
                             [helper.make_tensor_value_info("nvmoe_rows_acc", FLOAT, None)])
