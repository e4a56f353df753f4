"""trt_edgellm::causal_conv1d (Edge-LLM 0.7.1): depthwise causal conv with a carried state.

Semantics are the 0.7.1 plugin's (`cpp/plugins/mamba/causalConv1dPlugin.cpp` enqueue and the
kernels in `cpp/kernels/mamba/causalConv1d.cu`), contract families.md §3.1. The path is chosen
by the runtime sequence length S alone:

- prefill (S > 1): out[b, t] = bias + sum_j w[:, j] * x[b, t + j - padding] over positions
  0 <= t + j - padding < len_b (len_b = context_lengths[b]); everything else reads as zero.
  The incoming conv_state is NOT read (a 0.7.1 limitation: a chunked prefill loses its left
  context; the exporter works around it at graph level). Outputs at t >= len_b are exactly 0.
  conv_state_out is zeroed, then its last min(len_b, K) columns take the last valid tokens of x
  (so a short sequence leaves zeros on the left). `context_lengths` is clamped to [0, S] here;
  the kernel would read out of bounds beyond S.
- decode (S == 1): conv_state_out = conv_state shifted left by one column with x appended;
  out = bias + sum_j w[:, j] * conv_state_out[:, j]. context_lengths and `padding` are ignored.
- arithmetic: fp16 operands widened to fp32, accumulated in fp32 starting from the bias, taps
  in ascending j, rounded once to fp16. Each fp16 x fp16 product is exact in fp32, so a fused
  multiply-add on the GPU rounds exactly as the separate multiply and add here do.
- the weight is `[conv_dim, 1, K]` (depthwise only: groups == conv_dim, or 0 meaning conv_dim),
  stride = dilation = 1, K <= 8 (prefill kernel limit); `use_mtp=1` (per-token intermediate
  states) is not implemented here yet and is refused.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT64, GraphBuilder
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "causal_conv1d"
INPUTS = ("x", "weight", "bias", "conv_state", "context_lengths")
OUTPUTS = ("output", "conv_state_out")
BOOL = TensorProto.BOOL
INT_ATTRS = ("stride", "padding", "dilation", "groups", "use_mtp")
MAX_KERNEL = 8  # the prefill kernel's register window (ELLM_CHECK width <= 8 in invokeCausalConv1d)


def _check_attrs(stride: int, padding: int, dilation: int, use_mtp: int) -> None:
    if use_mtp:
        raise NotImplementedError("causal_conv1d with use_mtp=1 (intermediate conv states): no MTP support yet")
    if stride != 1 or dilation != 1:
        raise NotImplementedError(f"causal_conv1d runs with stride=1, dilation=1 only (got {stride}, {dilation})")
    if padding < 0:
        raise ValueError(f"causal_conv1d padding must be >= 0, got {padding}")


# -- face 1: torch custom op with eager reference -----------------------------------------
@functools.cache
def register_torch_op():
    """Define `torch.ops.trt_edgellm.causal_conv1d` (once) and return it."""

    def fake(x, weight, bias, conv_state, context_lengths, *attrs):
        return x.new_empty(x.shape), conv_state.new_empty(conv_state.shape)

    return define_torch_op(
        "trt_edgellm",
        "causal_conv1d(Tensor x, Tensor weight, Tensor bias, Tensor conv_state, Tensor context_lengths, "
        "int stride, int padding, int dilation, int groups, int use_mtp) -> (Tensor, Tensor)", _eager, fake)


def _eager(x, weight, bias, conv_state, context_lengths, stride, padding, dilation, groups, use_mtp):
    """Reference implementation in plain torch; returns new tensors, never writes its inputs."""
    import torch

    _check_attrs(stride, padding, dilation, use_mtp)
    b, s, dim = x.shape
    k = weight.shape[-1]
    if groups not in (0, dim):
        raise NotImplementedError(f"causal_conv1d is depthwise only: groups={groups}, conv_dim={dim}")
    if tuple(weight.shape) != (dim, 1, k) or tuple(conv_state.shape) != (b, dim, k):
        raise ValueError(f"causal_conv1d shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"conv_state {tuple(conv_state.shape)}")
    w = weight.reshape(dim, k).float()  # [D, K]
    acc0 = bias.float()

    if s == 1:  # decode: shift-insert, then one output per sequence
        state = torch.cat([conv_state[:, :, 1:], x.transpose(1, 2).to(conv_state.dtype)], dim=2)
        acc = acc0.expand(b, dim)
        for j in range(k):
            acc = acc + state[:, :, j].float() * w[:, j]
        return acc.to(x.dtype).unsqueeze(1), state

    lens = context_lengths.to(torch.int64).clamp(0, s)
    valid = (torch.arange(s)[None, :] < lens[:, None])[..., None]  # [B, S, 1]
    xm = torch.where(valid, x.float(), torch.zeros((), dtype=torch.float32))
    # Input position p sits at p + padding; zeros on the right cover padding < K - 1.
    ext = torch.nn.functional.pad(xm, (0, 0, padding, max(0, k - 1 - padding)))
    acc = acc0.expand(b, s, dim)
    for j in range(k):
        acc = acc + ext[:, j : j + s, :] * w[:, j]
    out = torch.where(valid, acc, torch.zeros((), dtype=torch.float32)).to(x.dtype)

    state = torch.zeros_like(conv_state)
    for i in range(b):
        n = int(lens[i])
        tail = min(n, k)
        if tail:
            state[i, :, k - tail :] = x[i, n - tail : n, :].transpose(0, 1)
    return out, state


# -- face 2: ONNX schema -------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    A = onnx.defs.OpSchema.AttrType
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    return onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        "Edge-LLM depthwise causal conv1d with a carried [B, conv_dim, K] state (0.7 contract, no activation).",
        inputs=[fp("x", "T"), fp("weight", "T"), fp("bias", "T"), fp("conv_state", "T"),
                fp("context_lengths", "tensor(int32)")],
        outputs=[fp("output", "T"), fp("conv_state_out", "T"),
                 fp("intermediate_conv_state_out", "T", "with use_mtp=1: [B, S, conv_dim, K]", param_option=optional)],
        type_constraints=[("T", ["tensor(float16)"], "the plugin runs FP16 only")],
        attributes=[attr(n, A.INT, "", required=True) for n in INT_ATTRS[:4]]
        + [attr("use_mtp", A.INT, "1: also output per-token states", required=False)],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation to the runtime node -----------------------------------------------
def emit(g: GraphBuilder, inputs: list[str], *, conv_dim: int, kernel_size: int, use_mtp: int = 0) -> tuple[str, str]:
    """Add one causal_conv1d node with the 5 inputs and the 5 attributes the 0.7.1 exporter writes."""
    assert len(inputs) == len(INPUTS)
    if use_mtp:
        raise NotImplementedError("causal_conv1d with use_mtp=1 (intermediate conv states): no MTP support yet")
    if not 1 <= kernel_size <= MAX_KERNEL:
        raise ValueError(f"causal_conv1d kernel size {kernel_size}: the 0.7.1 prefill kernel takes 1..{MAX_KERNEL}")
    out, state = g.node(
        OP_TYPE, inputs,
        {"stride": 1, "padding": kernel_size - 1, "dilation": 1, "groups": conv_dim, "use_mtp": 0},
        n_out=2, domain=DOMAIN,
    )
    return out, state


# -- face 4: lowering to standard ONNX -----------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """An ONNX function computing this node's semantics with standard ops only (K read at run time)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    _check_attrs(attrs.get("stride", 1), attrs.get("padding", 0), attrs.get("dilation", 1), attrs.get("use_mtp", 0))
    padding = int(attrs["padding"])
    name = f"{OP_TYPE}_{hashlib.sha1(str(padding).encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    _lower_body(g, padding)
    return helper.make_function(
        LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
        [helper.make_opsetid("", ONNX_OPSET)],
    )


def _tap_sum(g: GraphBuilder, ext: str, acc0: str, w_kd: str, k: str, seq: str, tag: str) -> str:
    """acc0 + sum_j w_kd[j] * ext[:, j:j+seq, :], added one tap at a time in ascending j (an ONNX Loop)."""
    n, i64 = g.node, g.i64
    axis1, true = i64(1), g.const(np.array(True), "true")
    body = GraphBuilder(f"{tag}_body")
    body.scope = tag
    j, cond, acc_in = f"{tag}/j", f"{tag}/cond", f"{tag}/acc_in"
    start = body.node("Unsqueeze", [j, i64(0)])
    window = body.node("Slice", [ext, start, body.node("Add", [start, seq]), axis1])
    tap = body.node("Gather", [w_kd, j], {"axis": 0})  # [D]
    acc_out = body.node("Add", [acc_in, body.node("Mul", [window, tap])])
    cond_out = body.node("Identity", [cond])
    graph = helper.make_graph(
        body.nodes, f"{tag}_body",
        [helper.make_tensor_value_info(j, INT64, []), helper.make_tensor_value_info(cond, BOOL, []),
         helper.make_tensor_value_info(acc_in, FLOAT, ["b", "s", "d"])],
        [helper.make_tensor_value_info(cond_out, BOOL, []),
         helper.make_tensor_value_info(acc_out, FLOAT, ["b", "s", "d"])],
    )
    return n("Loop", [n("Squeeze", [k, i64(0)]), true, acc0], {"body": graph})


def _lower_body(g: GraphBuilder, padding: int) -> None:
    x, weight, bias, conv_state, ctx = INPUTS
    n, i64 = g.node, g.i64
    big = np.iinfo(np.int64).max
    f0 = g.const(np.array(0.0, np.float32))
    shape_x = n("Shape", [x])
    batch = n("Shape", [x], {"start": 0, "end": 1})
    seq = n("Shape", [x], {"start": 1, "end": 2})
    k = n("Shape", [weight], {"start": 2, "end": 3})
    w_kd = n("Transpose", [n("Cast", [n("Reshape", [weight, i64(0, -1)])], {"to": FLOAT})], {"perm": [1, 0]})
    bias_f = n("Cast", [bias], {"to": FLOAT})
    is_decode = n("Equal", [seq, i64(1)])  # [1]

    # Prefill: zero padding `padding` on the left, masked tokens beyond context_lengths.
    lens = n("Min", [n("Max", [n("Cast", [ctx], {"to": INT64}), i64(0)]), seq])  # [B]
    steps = n("Range", [g.const(np.array(0, np.int64)), n("Squeeze", [seq, i64(0)]), g.const(np.array(1, np.int64))])
    valid = n("Unsqueeze", [n("Less", [n("Unsqueeze", [steps, i64(0)]), n("Unsqueeze", [lens, i64(1)])]), i64(2)])
    xm = n("Where", [valid, n("Cast", [x], {"to": FLOAT}), f0])
    right = n("Max", [n("Sub", [k, i64(1 + padding)]), i64(0)])
    ext = n("Pad", [xm, n("Concat", [i64(0, padding, 0, 0), right, i64(0)], {"axis": 0})])
    acc0 = n("Expand", [bias_f, shape_x])
    acc = _tap_sum(g, ext, acc0, w_kd, k, seq, "prefill_taps")
    out_prefill = n("Cast", [n("Where", [valid, acc, f0])], {"to": FLOAT16})
    # State: column c holds token len_b - K + c (zero where that is negative): gather from x with K zeros in front.
    xz = n("Pad", [x, n("Concat", [i64(0), k, i64(0, 0, 0, 0)], {"axis": 0})])  # [B, K+S, D]
    cols = n("Range", [g.const(np.array(0, np.int64)), n("Squeeze", [k, i64(0)]), g.const(np.array(1, np.int64))])
    idx = n("Add", [n("Unsqueeze", [lens, i64(1)]), n("Unsqueeze", [cols, i64(0)])])  # [B, K]
    tail = n("GatherND", [xz, n("Unsqueeze", [idx, i64(2)])], {"batch_dims": 1})  # [B, K, D]
    state_prefill = n("Transpose", [tail], {"perm": [0, 2, 1]})

    # Decode (meaningful when S == 1; computed on the first token otherwise and then discarded).
    first = n("Slice", [x, i64(0), i64(1), i64(1)])  # [B, 1, D]
    state_decode = n("Concat", [n("Slice", [conv_state, i64(1), i64(big), i64(2)]),
                                n("Transpose", [first], {"perm": [0, 2, 1]})], {"axis": 2})  # [B, D, K]
    ext_decode = n("Cast", [n("Transpose", [state_decode], {"perm": [0, 2, 1]})], {"to": FLOAT})  # [B, K, D]
    acc0_decode = n("Expand", [bias_f, n("Concat", [batch, i64(1), n("Shape", [x], {"start": 2})], {"axis": 0})])
    acc_decode = _tap_sum(g, ext_decode, acc0_decode, w_kd, k, i64(1), "decode_taps")
    out_decode = n("Expand", [n("Cast", [acc_decode], {"to": FLOAT16}), shape_x])

    n("Where", [is_decode, out_decode, out_prefill], outputs=[OUTPUTS[0]])
    n("Where", [is_decode, state_decode, state_prefill], outputs=[OUTPUTS[1]])
