"""trt_edgellm::gated_delta_net (Edge-LLM 0.7.1): Qwen3.5 GatedDeltaNet linear attention, one fused op.

Semantics are those of the 0.7.1 plugin and its sequential CuTe DSL kernels (contract families.md §3.2),
not of the PyTorch model code:
- the graph hands the plugin raw tensors; the plugin derives, per token t and value head h, in fp32:
  decay = exp(-exp(A_log[h]) * softplus(a + dt_bias[h])) (softplus(x) = x above 20),
  beta = sigmoid(b), and L2-normalises q and k over Dk as x * rsqrt(sum(x^2) + 1e-6);
  the query is further scaled by 1/sqrt(Dk);
- value head h reads key/query head h // (Hv / Hk) (the repeat_interleave grouping);
- one step: S <- decay * S; delta = beta * (v - S^T k); S <- S + k delta^T; o = S^T q
  (state S `[Dk, Dv]` per (sequence, value head), fp32; o rounded to fp16);
- the step starts from `h0_source` whatever the phase (the runtime zeroes the state for a new sequence);
- token t of sequence b is processed iff t < context_lengths[b]. In prefill (S > 1) that skips the
  right padding; in decode (S == 1, context_lengths = total length >= 1) the one token always runs.
  A skipped token leaves the state alone and outputs zeros;
- the runtime plugin only supports Dk = Dv = 128 (kernels are built for that shape), Hv a multiple of Hk.
  `use_mtp=1` (speculative-decoding verify, with per-token intermediate states) is not implemented here.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT64, GraphBuilder
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "gated_delta_net"
INPUTS = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "h0_source", "context_lengths")
OUTPUTS = ("o", "h0_out")
RUNTIME_HEAD_DIMS = (128, 128)  # (Dk, Dv) the 0.7.1 plugin can run
L2_EPS = 1e-6
SOFTPLUS_THRESHOLD = 20.0


def _refuse_mtp(use_mtp: int) -> None:
    if use_mtp:
        raise NotImplementedError("gated_delta_net with use_mtp=1 (intermediate states for MTP verify) is not "
                                  "implemented")


# -- face 1: torch custom op with eager reference -----------------------------------------
@functools.cache
def register_torch_op():
    """Define `torch.ops.trt_edgellm.gated_delta_net` (once) and return it."""
    import torch

    def fake(q, k, v, a, b, A_log, dt_bias, h0_source, context_lengths, k_dim, v_dim, use_mtp=0):
        _refuse_mtp(use_mtp)
        return v.new_empty(v.shape), torch.empty_like(h0_source)

    return define_torch_op(
        "trt_edgellm",
        "gated_delta_net(Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor A_log, Tensor dt_bias, "
        "Tensor h0_source, Tensor context_lengths, int k_dim, int v_dim, int use_mtp=0) -> (Tensor, Tensor)",
        _eager, fake)


def decay_and_beta(a, b, A_log, dt_bias):
    """Per-token state decay and update strength, fp32 `[..., Hv]` each, as the plugin derives them."""
    import torch

    x = a.float() + dt_bias.float()
    softplus = torch.where(x > SOFTPLUS_THRESHOLD, x, torch.log(1.0 + torch.exp(x.clamp(max=SOFTPLUS_THRESHOLD))))
    decay = torch.exp(-torch.exp(A_log.float()) * softplus)
    beta = torch.sigmoid(b.float())
    return decay, beta


def _eager(q, k, v, a, b, A_log, dt_bias, h0_source, context_lengths, k_dim, v_dim, use_mtp=0):
    """Reference implementation: the sequential scan of the plugin's prefill/decode kernels, in fp32."""
    import torch

    _refuse_mtp(use_mtp)
    bsz, seq, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    if (dk, dv) != (k_dim, v_dim):
        raise ValueError(f"gated_delta_net: k_dim/v_dim attributes {(k_dim, v_dim)} != tensor head dims {(dk, dv)}")
    if hv % hk:
        raise ValueError(f"gated_delta_net: {hv} value heads are not a multiple of {hk} key heads")

    def unit(x, scale=1.0):  # L2 norm over the head dim, then value-head grouping h -> h // (Hv / Hk)
        x = x.float()
        x = x * scale * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)
        return x.repeat_interleave(hv // hk, dim=2)

    qn = unit(q, dk**-0.5)  # [B, S, Hv, Dk]
    kn = unit(k)
    vf = v.float()
    decay, beta = decay_and_beta(a, b, A_log, dt_bias)  # [B, S, Hv]
    active = torch.arange(seq, device=q.device)[None, :] < context_lengths.long()[:, None]  # [B, S]

    state = h0_source.float().clone()  # [B, Hv, Dk, Dv]
    out = q.new_zeros((bsz, seq, hv, dv), dtype=torch.float32)
    for t in range(seq):
        decayed = state * decay[:, t, :, None, None]
        predicted = torch.einsum("bhkv,bhk->bhv", decayed, kn[:, t])
        delta = (vf[:, t] - predicted) * beta[:, t, :, None]
        updated = decayed + kn[:, t, :, :, None] * delta[:, :, None, :]
        on = active[:, t]
        state = torch.where(on[:, None, None, None], updated, state)
        out[:, t] = torch.where(on[:, None, None], torch.einsum("bhkv,bhk->bhv", updated, qn[:, t]), 0.0)
    return out.to(v.dtype), state.to(h0_source.dtype)


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
        "Edge-LLM Qwen3.5 GatedDeltaNet linear attention with explicit recurrent state (0.7 contract).",
        inputs=[
            fp("q", "T"), fp("k", "T"), fp("v", "T"), fp("a", "T"), fp("b", "T"), fp("A_log", "S"),
            fp("dt_bias", "T"), fp("h0_source", "S"), fp("context_lengths", "tensor(int32)"),
        ],
        outputs=[fp("o", "T"), fp("h0_out", "S"), fp("intermediate_h0_out", "S", param_option=optional)],
        type_constraints=[
            ("T", ["tensor(float16)"], "activations"),
            ("S", ["tensor(float)"], "A_log and the recurrent state"),
        ],
        attributes=[attr("k_dim", A.INT, "key head dim"), attr("v_dim", A.INT, "value head dim"),
                    attr("use_mtp", A.INT, "emit per-token intermediate states", required=False)],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation to the runtime node -----------------------------------------------
def emit(g: GraphBuilder, inputs: list[str], *, k_dim: int, v_dim: int, use_mtp: int = 0,
         check_runtime_dims: bool = True) -> tuple[str, str]:
    """Add one gated_delta_net node with the 9 inputs and the attribute set of 0.7.1.

    `check_runtime_dims` refuses head dims the 0.7.1 plugin cannot run (it only has Dk = Dv = 128
    kernels); switch it off only for graphs meant for the CPU lowering.
    """
    assert len(inputs) == len(INPUTS)
    _refuse_mtp(use_mtp)
    if check_runtime_dims and (k_dim, v_dim) != RUNTIME_HEAD_DIMS:
        raise ValueError(f"gated_delta_net: the 0.7.1 plugin only runs k_dim = v_dim = 128, got {k_dim}/{v_dim}")
    o, h0_out = g.node(OP_TYPE, inputs, {"k_dim": k_dim, "v_dim": v_dim, "use_mtp": 0}, n_out=2, domain=DOMAIN)
    return o, h0_out


# -- face 4: lowering to standard ONNX -----------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """An ONNX function computing this node's semantics with standard ops only (a Scan over tokens)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    _refuse_mtp(attrs.get("use_mtp", 0))
    if len([o for o in node.output if o]) > len(OUTPUTS):
        raise NotImplementedError("gated_delta_net intermediate_h0_out has no CPU lowering")
    dk, dv = attrs["k_dim"], attrs["v_dim"]
    name = f"{OP_TYPE}_{hashlib.sha1(f'{dk}_{dv}'.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    _lower_body(g, dk)
    return helper.make_function(
        LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
        [helper.make_opsetid("", ONNX_OPSET)],
    )


def _lower_body(g: GraphBuilder, dk: int) -> None:
    q, k, v, a, b, a_log, dt_bias, h0, ctx = INPUTS
    n = g.node
    i64 = g.i64
    f32 = lambda x: g.const(np.array(x, np.float32))

    # Unit-norm q (also scaled by 1/sqrt(Dk)) and k in fp32, grouped onto the value heads: [S, B, Hv, Dk].
    group = n("Div", [n("Shape", [v], {"start": 2, "end": 3}), n("Shape", [q], {"start": 2, "end": 3})])
    repeat = n("Concat", [i64(1, 1, 1), group, i64(1)], {"axis": 0})

    def unit(x, scale=None):
        xf = n("Cast", [x], {"to": FLOAT})
        inv = n("Reciprocal", [n("Sqrt", [n("Add", [n("ReduceSumSquare", [xf, i64(-1)], {"keepdims": 1}),
                                                   f32(L2_EPS)])])])
        if scale is not None:
            xf = n("Mul", [xf, f32(scale)])
        grouped = n("Expand", [n("Unsqueeze", [n("Mul", [xf, inv]), i64(3)]), repeat])  # [B,S,Hk,G,Dk]
        return n("Transpose", [n("Reshape", [grouped, i64(0, 0, -1, dk)])], {"perm": [1, 0, 2, 3]})

    q_s, k_s = unit(q, dk**-0.5), unit(k)
    v_s = n("Transpose", [n("Cast", [v], {"to": FLOAT})], {"perm": [1, 0, 2, 3]})

    # Per-token decay and beta, [S, B, Hv].
    x = n("Add", [n("Cast", [a], {"to": FLOAT}), n("Cast", [dt_bias], {"to": FLOAT})])
    capped = n("Min", [x, f32(SOFTPLUS_THRESHOLD)])
    soft = n("Log", [n("Add", [f32(1.0), n("Exp", [capped])])])
    soft = n("Where", [n("Greater", [x, f32(SOFTPLUS_THRESHOLD)]), x, soft])
    decay = n("Exp", [n("Mul", [n("Neg", [n("Exp", [a_log])]), soft])])
    decay_s = n("Transpose", [decay], {"perm": [1, 0, 2]})
    beta_s = n("Transpose", [n("Sigmoid", [n("Cast", [b], {"to": FLOAT})])], {"perm": [1, 0, 2]})

    # Token t of sequence b runs iff t < context_lengths[b]: [S, B].
    seq = n("Squeeze", [n("Shape", [q], {"start": 1, "end": 2}), i64(0)])
    steps = n("Range", [g.const(np.array(0, np.int64)), seq, g.const(np.array(1, np.int64))])
    active_s = n("Less", [n("Unsqueeze", [steps, i64(1)]), n("Unsqueeze", [n("Cast", [ctx], {"to": INT64}), i64(0)])])

    state, o_s = n("Scan", [h0, q_s, k_s, v_s, decay_s, beta_s, active_s],
                   {"body": _step_graph(), "num_scan_inputs": 6}, outputs=[OUTPUTS[1], g.fresh("o_scan")])
    n("Cast", [n("Transpose", [o_s], {"perm": [1, 0, 2, 3]})], {"to": FLOAT16}, outputs=[OUTPUTS[0]])


def _step_graph() -> onnx.GraphProto:
    """Scan body: one token for every (sequence, value head) at once."""
    g = GraphBuilder("gdn_step")
    g.function_mode = True
    g.scope = "step"
    n = g.node
    axes = lambda *v: g.const(np.array(v, np.int64), "step_axes")
    names = ["step_state", "step_q", "step_k", "step_v", "step_decay", "step_beta", "step_active"]
    state, q, k, v, decay, beta, active = names
    decayed = n("Mul", [state, n("Unsqueeze", [decay, axes(2, 3)])])  # [B,Hv,Dk,Dv]
    predicted = n("MatMul", [n("Unsqueeze", [k, axes(2)]), decayed])  # [B,Hv,1,Dv]
    delta = n("Mul", [n("Sub", [n("Unsqueeze", [v, axes(2)]), predicted]), n("Unsqueeze", [beta, axes(2, 3)])])
    updated = n("Add", [decayed, n("MatMul", [n("Unsqueeze", [k, axes(3)]), delta])])
    out = n("Squeeze", [n("MatMul", [n("Unsqueeze", [q, axes(2)]), updated]), axes(2)])  # [B,Hv,Dv]
    n("Where", [n("Unsqueeze", [active, axes(1, 2, 3)]), updated, state], outputs=["step_state_out"])
    n("Where", [n("Unsqueeze", [active, axes(1, 2)]), out, g.const(np.array(0.0, np.float32), "step_zero")],
      outputs=["step_o"])
    types = [FLOAT] * 6 + [onnx.TensorProto.BOOL]
    return helper.make_graph(
        g.nodes, "gdn_step",
        [helper.make_tensor_value_info(nm, t, None) for nm, t in zip(names, types)],
        [helper.make_tensor_value_info("step_state_out", FLOAT, None),
         helper.make_tensor_value_info("step_o", FLOAT, None)],
    )
