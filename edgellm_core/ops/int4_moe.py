"""trt_edgellm::Int4MoePlugin (Edge-LLM 0.7.1): softmax top-k routing, INT4 expert GEMMs and the weighted
combine in one op (contract families.md §2.1-§2.2, quant.md §3.12).

Semantics, from the 0.7.1 sources (`cpp/plugins/int4MoePlugin/int4MoePlugin.cpp` and the kernels it calls):
- inputs: router_logits fp32 `[T, E]` (T = B*S), hidden_states fp16 `[B, S, H]`, fc_gate_up_qweights int8
  `[E, H/16, 16I]`, fc_gate_up_scales fp16 `[E, H/G, 2I]`, fc_down_qweights int8 `[E, I/16, 8H]`,
  fc_down_scales fp16 `[E, I/G, H]`; INT attributes num_experts, top_k, hidden_size, moe_inter_size,
  activation_type (0 = SiLU, the only one), quantization_group_size; output fp16 `[B, S, H]`
  (`supportsFormatCombination`, `getOutputShapes`);
- routing (`moeTopkSoftmax(..., renormalize=true, softcap 0)`): softmax over the E logits in fp32, the k
  largest, each multiplied by 1 / (their sum): always renormalised, the model's norm_topk_prob is not
  passed;
- expert GEMMs (`moeAwqW4A16MarlinGemm`, Marlin `kU4`, no zero point): weight = (U - 8) * scale for
  biased nibbles U in [0, 15]. With more than one group along K the kernel scales the fp16 weights before
  the MMA (fp16 products, fp32 accumulation, fp16 result); with one group (K == G, `group_blocks == -1`)
  it rounds the fp32 accumulator to fp16 and multiplies by the scale in fp16 (`marlin_template.h`);
- FC1 output rows are [gate; up] (gate rows first); the activation (`swiGluActivation`) is
  fp16(fp16(silu_fp32(gate)) * up), silu(x) = x / (1 + exp(-x));
- the down GEMM multiplies each routed row's fp16 result by its fp16-cast weight in fp16
  (`mul_topk_weights`), and `aggregateSlotOutputsKernel` sums a token's k rows in fp32, rounded once.
  Both faces here sum the experts in expert order instead of slot order: the same fp16 terms, an fp32
  rounding apart at most.

Weight layout (Marlin, `repacking.py::pack_int4_awq_marlin`, derived here as reshapes and checked
against it): per 16 x 64 tile of W `[K, N]` (K = in, N = out features), row 16kt + 8f0 + 2m0 + f2 and
column 64nt + 16r + 8f1 + m1 hold nibble 4f2 + 2f1 + f0 of int32 word 128nt + 16m1 + 4m0 + r of row kt of
`[K/16, 2N]`; those words are stored little-endian, viewed as int8 `[K/16, 8N]`. Scales `[K/G, N]` have
their columns permuted: with several groups an 8x8 transpose per 64 columns, with one group a [4, 4, 2] ->
[4, 4, 2] swap of the first two axes per 32 (`_marlin_permute_scales`).

Kernel limits (`marlin_moe_wna16/ops.cu` thread configs, `kernel_selector.h`): N % 128 and K % 64 for both
GEMMs (hidden % 128, moe_inter % 64), group sizes 32, 64, 128 (group_blocks 2, 4, 8), or one group.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT32, GraphBuilder
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "Int4MoePlugin"
INPUTS = ("router_logits", "hidden_states", "fc_gate_up_qweights", "fc_gate_up_scales", "fc_down_qweights",
          "fc_down_scales")
OUTPUTS = ("output",)
INT_ATTRS = ("num_experts", "top_k", "hidden_size", "moe_inter_size", "activation_type", "quantization_group_size")
ACTIVATION_SILU = 0
GROUP_SIZES = (32, 64, 128)
# Marlin word layout: W [K, N] viewed [kt, f0, m0, f2, nt, r, f1, m1] <-> packed [kt, nt, m1, m0, r, f2, f1, f0].
_PACK_PERM = (0, 4, 7, 2, 5, 3, 6, 1)
_UNPACK_PERM = (0, 7, 3, 5, 1, 4, 6, 2)


def check_shape(hidden: int, inter: int, group: int) -> str | None:
    """Why the plugin's kernels cannot take these sizes, or None."""
    if hidden <= 0 or hidden % 128:
        return (f"hidden_size {hidden} is not a multiple of 128 (the down GEMM's N must be a multiple of the "
                "Marlin kernel's 128-wide thread tile)")
    if inter <= 0 or inter % 64:
        return (f"moe_intermediate_size {inter} is not a multiple of 64 (the gate/up GEMM's N = 2 x "
                "moe_intermediate_size must be a multiple of 128, the down GEMM's K of 64)")
    if group not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES))
        return f"group size {group} is not one the Marlin MoE kernels are built for ({sizes})"
    if hidden % group or inter % group:
        return f"group size {group} does not divide hidden_size {hidden} and moe_intermediate_size {inter}"
    return None


def stack_shapes(experts: int, hidden: int, inter: int, group: int) -> dict[str, tuple[int, ...]]:
    """The four weight inputs' shapes, as supportsFormatCombination checks them."""
    return {"fc_gate_up_qweights": (experts, hidden // 16, 16 * inter),
            "fc_gate_up_scales": (experts, hidden // group, 2 * inter),
            "fc_down_qweights": (experts, inter // 16, 8 * hidden),
            "fc_down_scales": (experts, inter // group, hidden)}


# -- Marlin layout (numpy) ----------------------------------------------------------------------------
def pack_marlin(u: np.ndarray) -> np.ndarray:
    """Biased nibbles ``U [N, K]`` (values 0..15) -> int8 ``[K/16, 8N]`` (the int32 Marlin words, little-endian)."""
    u = np.asarray(u)
    n, k = u.shape
    if n % 64 or k % 16:
        raise ValueError(f"Marlin tiles need N % 64 == 0 and K % 16 == 0, got N={n}, K={k}")
    w = u.T.astype(np.uint8).reshape(k // 16, 2, 4, 2, n // 64, 4, 2, 8).transpose(_PACK_PERM)
    nib = w.reshape(k // 16, 2 * n, 4, 2)  # word, byte, low/high nibble
    return np.ascontiguousarray(nib[..., 0] | (nib[..., 1] << 4)).reshape(k // 16, 8 * n).view(np.int8)


def unpack_marlin(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_marlin`: int8 (or the int32 words) -> ``U [N, K]`` uint8."""
    b = np.ascontiguousarray(packed).view(np.uint8).reshape(k // 16, 2 * n, 4)
    nib = np.stack([b & 15, b >> 4], -1).reshape(k // 16, n // 64, 8, 4, 4, 2, 2, 2)
    return np.ascontiguousarray(nib.transpose(_UNPACK_PERM).reshape(k, n).T)


def _scale_view(groups: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunk shape, axis swap) of the scale column permutation; the swap is its own inverse."""
    return ((8, 8), (0, 2, 1)) if groups > 1 else ((4, 4, 2), (0, 2, 1, 3))


def permute_scales(s: np.ndarray) -> np.ndarray:
    """Scales ``[K/G, N]`` in checkpoint column order -> Marlin's column order (and back: an involution)."""
    s = np.asarray(s)
    chunk, perm = _scale_view(s.shape[0])
    return np.ascontiguousarray(s.reshape(-1, *chunk).transpose(perm).reshape(s.shape))


unpermute_scales = permute_scales


# -- face 1: torch op with eager reference ----------------------------------------------------------
@functools.cache
def register_torch_op():
    import torch

    schema = ("int4_moe(Tensor router_logits, Tensor hidden_states, Tensor fc_gate_up_qweights, "
              "Tensor fc_gate_up_scales, Tensor fc_down_qweights, Tensor fc_down_scales, int num_experts, "
              "int top_k, int hidden_size, int moe_inter_size, int activation_type, "
              "int quantization_group_size) -> Tensor")
    return define_torch_op("trt_edgellm", schema, _eager, lambda r, x, *rest: torch.empty_like(x))


def _r16(x):
    return x.half().float()


def route_torch(logits, top_k: int):
    """(dense weights `[T, E]` fp32, zero where unrouted; routed mask `[T, E]`): softmax, top-k, times
    1 / (sum of the k)."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    top_v, top_i = torch.topk(probs, top_k, dim=-1)
    top_v = top_v * (1.0 / top_v.sum(-1, keepdim=True))
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_v)
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
    return weights, routed


def unpack_marlin_torch(packed, n: int, k: int):
    """int8 `[K/16, 8N]` -> U `[K, N]` int32 (K-major, as the GEMM reads it)."""
    import torch

    b = packed.contiguous().view(torch.uint8).to(torch.int32).reshape(k // 16, 2 * n, 4)
    nib = torch.stack([b & 15, b >> 4], dim=-1).reshape(k // 16, n // 64, 8, 4, 4, 2, 2, 2)
    return nib.permute(*_UNPACK_PERM).reshape(k, n)


def gemm_torch(x, packed, scales, n: int, k: int, group: int):
    """x (fp32 holding fp16 values) `[M, K]` through one expert's Marlin weights -> fp32 of the fp16 output."""
    w = unpack_marlin_torch(packed, n, k).float() - 8.0
    groups = k // group
    chunk, perm = _scale_view(groups)
    s = scales.float().reshape(-1, *chunk).permute(*perm).reshape(groups, n)
    if groups > 1:  # fp16 weights (U - 8) * s into the MMA
        return _r16(x @ _r16(w * s.repeat_interleave(group, dim=0)))
    return _r16(_r16(x @ w) * s)  # one group: fp16 accumulator times the scale, in fp16


def expert_act_torch(x, packed, scales, hidden: int, inter: int, group: int):
    """fp16(fp16(silu(gate)) * up) for the rows x `[M, H]` of one expert."""
    import torch

    gu = gemm_torch(x, packed, scales, 2 * inter, hidden, group)
    gate, up = gu[:, :inter], gu[:, inter:]
    return _r16(_r16(gate / (1.0 + torch.exp(-gate))) * up)


def expert_out_torch(act, weights, packed, scales, hidden: int, inter: int, group: int):
    """One expert's down GEMM times each row's routing weight, both fp16, the product rounded to fp16."""
    return _r16(gemm_torch(act, packed, scales, hidden, inter, group) * _r16(weights)[:, None])


def _eager(logits, hidden, gu_q, gu_s, dn_q, dn_s, experts, top_k, h, inter, activation, group):
    import torch

    if activation != ACTIVATION_SILU:
        raise NotImplementedError(f"Int4MoePlugin runs only activation_type 0 (SiLU), got {activation}")
    x = hidden.reshape(-1, h).float()
    weights, routed = route_torch(logits, top_k)
    acc = torch.zeros_like(x)
    for e in range(experts):
        rows = routed[:, e].nonzero().flatten()
        if rows.numel() == 0:
            continue
        act = expert_act_torch(x[rows], gu_q[e], gu_s[e], h, inter, group)
        acc.index_add_(0, rows, expert_out_torch(act, weights[rows, e], dn_q[e], dn_s[e], h, inter, group))
    return acc.reshape(hidden.shape).to(hidden.dtype)


# -- face 2: schema ---------------------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    A = onnx.defs.OpSchema.AttrType
    types = ("tensor(float)", "tensor(float16)", "tensor(int8)", "tensor(float16)", "tensor(int8)", "tensor(float16)")
    return onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, 1, "Edge-LLM fused MoE: softmax top-k routing and INT4 (Marlin) SwiGLU experts.",
        inputs=[fp(name, t) for name, t in zip(INPUTS, types)],
        outputs=[fp(OUTPUTS[0], "tensor(float16)")],
        attributes=[onnx.defs.OpSchema.Attribute(a, A.INT, "") for a in INT_ATTRS],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation ----------------------------------------------------------------------------
def emit(g: GraphBuilder, router_logits: str, hidden_states: str, gate_up_qweights: str, gate_up_scales: str,
         down_qweights: str, down_scales: str, *, num_experts: int, top_k: int, hidden_size: int,
         moe_inter_size: int, group_size: int) -> str:
    attrs = {"num_experts": num_experts, "top_k": top_k, "hidden_size": hidden_size,
             "moe_inter_size": moe_inter_size, "activation_type": ACTIVATION_SILU,
             "quantization_group_size": group_size}
    return g.node(OP_TYPE, [router_logits, hidden_states, gate_up_qweights, gate_up_scales, down_qweights,
                            down_scales], attrs, domain=DOMAIN)


# -- face 4: lowering to standard ONNX --------------------------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """A Scan over the experts: per expert, only its routed tokens (an If skips an expert nobody chose),
    the weights unpacked and dequantized inside, accumulated into an fp32 `[T, H]` sum."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("activation_type", ACTIVATION_SILU) != ACTIVATION_SILU:
        raise NotImplementedError(f"Int4MoePlugin runs only activation_type 0 (SiLU), got {attrs['activation_type']}")
    e, k, h, inter, group = (attrs[a] for a in ("num_experts", "top_k", "hidden_size", "moe_inter_size",
                                                 "quantization_group_size"))
    key = f"{e}_{k}_{h}_{inter}_{group}"
    name = f"{OP_TYPE}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    n, i64 = g.node, g.i64
    logits, hidden, gu_q, gu_s, dn_q, dn_s = INPUTS
    probs = n("Softmax", [logits], {"axis": -1})
    top_v, top_i = n("TopK", [probs, i64(k)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)
    top_v = n("Mul", [top_v, n("Reciprocal", [n("ReduceSum", [top_v, i64(-1)], {"keepdims": 1})])])
    zeros = n("ConstantOfShape", [n("Shape", [probs])], {"value": helper.make_tensor("z", FLOAT, [1], [0.0])})
    weights = n("ScatterElements", [zeros, top_i, top_v], {"axis": -1})
    ones = n("ConstantOfShape", [n("Shape", [top_v])], {"value": helper.make_tensor("one", FLOAT, [1], [1.0])})
    routed = n("Greater", [n("ScatterElements", [zeros, top_i, ones], {"axis": -1}),
                           g.const(np.array(0.5, np.float32))])
    x = n("Cast", [n("Reshape", [hidden, i64(-1, h)])], {"to": FLOAT})
    acc0 = n("ConstantOfShape", [n("Shape", [x])], {"value": helper.make_tensor("z", FLOAT, [1], [0.0])})
    acc, _ = n("Scan", [acc0, x, gu_q, gu_s, dn_q, dn_s, n("Transpose", [weights], {"perm": [1, 0]}),
                        n("Transpose", [routed], {"perm": [1, 0]})],
               {"body": _expert_body(h, inter, group), "num_scan_inputs": 6}, n_out=2)
    n("Reshape", [n("Cast", [acc], {"to": FLOAT16}), n("Shape", [hidden])], outputs=[OUTPUTS[0]])
    return helper.make_function(LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)])


_BODY_IN = ("moe_acc", "moe_x", "moe_gu_q", "moe_gu_s", "moe_dn_q", "moe_dn_s", "moe_w", "moe_routed")


def _expert_body(h: int, inter: int, group: int) -> onnx.GraphProto:
    g = GraphBuilder("moe_expert")
    g.function_mode = True
    g.scope = "moe_expert"
    n = g.node
    acc, x, gu_q, gu_s, dn_q, dn_s, w, routed = _BODY_IN
    rows = n("Reshape", [n("NonZero", [routed]), g.const(np.array([-1], np.int64), "moe_expert_flat")])
    chosen = n("Greater", [n("Size", [rows]), g.const(np.array(0, np.int64), "moe_expert_zero")])
    then = _routed_rows_graph(h, inter, group, rows)
    keep = helper.make_graph([helper.make_node("Identity", [acc], ["moe_keep_acc"])], "moe_keep", [],
                             [helper.make_tensor_value_info("moe_keep_acc", FLOAT, None)])
    n("If", [chosen], {"then_branch": then, "else_branch": keep}, outputs=["moe_acc_out"])
    n("Identity", [x], outputs=["moe_x_out"])
    types = [FLOAT, FLOAT, onnx.TensorProto.INT8, FLOAT16, onnx.TensorProto.INT8, FLOAT16, FLOAT,
             onnx.TensorProto.BOOL]
    return helper.make_graph(
        g.nodes, "moe_expert", [helper.make_tensor_value_info(nm, t, None) for nm, t in zip(_BODY_IN, types)],
        [helper.make_tensor_value_info("moe_acc_out", FLOAT, None),
         helper.make_tensor_value_info("moe_x_out", FLOAT, None)])


def _routed_rows_graph(h: int, inter: int, group: int, rows: str) -> onnx.GraphProto:
    """If-branch: the expert's SwiGLU on its routed rows, weighted, added into the accumulator."""
    g = GraphBuilder("moe_rows")
    g.function_mode = True
    g.scope = "moe_rows"
    n = g.node
    c64 = lambda *v: g.const(np.array(v, np.int64), "moe_rows_i64")  # noqa: E731
    f32 = lambda v: g.const(np.array(v, np.float32), "moe_rows_f32")  # noqa: E731
    r16 = lambda v: n("Cast", [n("Cast", [v], {"to": FLOAT16})], {"to": FLOAT})  # noqa: E731
    acc, x, gu_q, gu_s, dn_q, dn_s, w, _ = _BODY_IN

    def gemm(a, packed, scales, out_f, in_f):
        b = n("Mod", [n("Cast", [packed], {"to": INT32}), g.const(np.array(256, np.int32), "moe_rows_b")])
        sixteen = g.const(np.array(16, np.int32), "moe_rows_16")
        nib = n("Concat", [n("Unsqueeze", [n("Mod", [b, sixteen]), c64(-1)]),
                           n("Unsqueeze", [n("Div", [b, sixteen]), c64(-1)])], {"axis": -1})
        u = n("Reshape", [n("Transpose", [n("Reshape", [nib, c64(in_f // 16, out_f // 64, 8, 4, 4, 2, 2, 2)])],
                            {"perm": list(_UNPACK_PERM)}), c64(in_f, out_f)])
        wq = n("Sub", [n("Cast", [u], {"to": FLOAT}), f32(8.0)])  # [K, N]
        groups = in_f // group
        chunk, perm = _scale_view(groups)
        s = n("Reshape", [n("Transpose", [n("Reshape", [n("Cast", [scales], {"to": FLOAT}), c64(-1, *chunk)])],
                            {"perm": list(perm)}), c64(groups, out_f)])
        if groups > 1:
            s = n("Reshape", [n("Expand", [n("Unsqueeze", [s, c64(1)]), c64(groups, group, out_f)]),
                              c64(in_f, out_f)])
            return r16(n("MatMul", [a, r16(n("Mul", [wq, s]))]))
        return r16(n("Mul", [r16(n("MatMul", [a, wq])), s]))

    xs = n("Gather", [x, rows], {"axis": 0})
    gu = gemm(xs, gu_q, gu_s, 2 * inter, h)
    gate = n("Slice", [gu, c64(0), c64(inter), c64(1)])
    up = n("Slice", [gu, c64(inter), c64(2 * inter), c64(1)])
    silu = r16(n("Div", [gate, n("Add", [f32(1.0), n("Exp", [n("Neg", [gate])])])]))
    act = r16(n("Mul", [silu, up]))
    down = gemm(act, dn_q, dn_s, h, inter)
    wr = n("Unsqueeze", [r16(n("Gather", [w, rows], {"axis": 0})), c64(1)])
    contrib = r16(n("Mul", [down, wr]))
    n("ScatterND", [acc, n("Unsqueeze", [rows, c64(1)]), contrib], {"reduction": "add"}, outputs=["moe_rows_acc"])
    return helper.make_graph(g.nodes, "moe_rows", [], [helper.make_tensor_value_info("moe_rows_acc", FLOAT, None)])
