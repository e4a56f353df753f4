"""trt_edgellm::update_ssm_state (Edge-LLM 0.7): the Mamba2 selective state update of Nemotron-H.

Contract families.md §3.1. Inputs x fp16 `[B, S, Hm, Dm]`, A fp32 `[Hm]` (= -exp(A_log)),
B and C fp16 `[B, S, G, N]`, D fp16 `[Hm]`, dt fp16 `[B, S, Hm]` (raw), dt_bias fp16 `[Hm]`,
state fp16 `[B, Hm, Dm, N]`, context_lengths int32 `[B]`; attributes dt_softplus, ngroups,
chunk_size (0). Outputs output fp16 `[B, S, Hm, Dm]` and state_out fp16 `[B, Hm, Dm, N]`.

Semantics are the 0.7.1 plugin's (mambaPlugin.cpp enqueue + the prefill kernel of
selectiveStateUpdate.cu, which serves every 4-D x, decode included), per token t:
- dt = dt[t] + dt_bias in fp32; with dt_softplus, dt = log(1 + exp(dt)) for dt <= 20, else dt;
  no clamping (the plugin refuses any time_step_limit other than (0, inf));
- dA = exp(A * dt); state = state * dA + (dt * B[t]) x[t]^T (outer product over Dm x N);
- y[t] = state . C[t] (sum over N) + D * x[t]; head h reads group h // (Hm / G);
- the state stays fp32 across the tokens of one call and is rounded to fp16 once, at the end;
  each y[t] is rounded to fp16;
- S > 1 (prefill and chunked prefill alike): only tokens t < context_lengths[b] run; the state
  ignores the rest and their outputs are written as 0. S == 1 (decode): context_lengths is
  ignored (it holds the total length) and the one token always runs.

Not modelled: the optional CuTe-DSL SSD prefill (built only with ENABLE_CUTE_DSL covering `ssd`;
taken for S >= 128 on SM >= 80 when Dm and N are both 64 or 128), which starts from a zero
state whatever the state input holds.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import onnx
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT64, GraphBuilder
from edgellm_core.ops.schemas import LOWERING_DOMAIN, ONNX_OPSET, register_missing
from edgellm_core.ops.torch_ops import define_torch_op

DOMAIN = "trt_edgellm"
OP_TYPE = "update_ssm_state"
INPUTS = ("x", "A", "B", "C", "D", "dt", "dt_bias", "state", "context_lengths")
OUTPUTS = ("output", "state_out")

# The kernels are instantiated for these head dims (Dm) and state sizes (N) only
# (selectiveStateUpdate.cu, AllowedDims / AllowedDstates); anything else throws at enqueue.
SUPPORTED_HEAD_DIMS = (64, 80, 128, 256)
SUPPORTED_STATE_SIZES = (64, 80, 128, 256)
SOFTPLUS_THRESHOLD = 20.0  # above it softplus(dt) is taken as dt


def check_shape(num_heads: int, head_dim: int, state_size: int, ngroups: int) -> str | None:
    """Why the plugin cannot take these dimensions, or None."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"mamba head dim {head_dim} is not one of the kernel's {SUPPORTED_HEAD_DIMS}"
    if state_size not in SUPPORTED_STATE_SIZES:
        return f"ssm state size {state_size} is not one of the kernel's {SUPPORTED_STATE_SIZES}"
    if ngroups < 1 or num_heads % ngroups:
        return f"{num_heads} mamba heads do not split into {ngroups} groups"
    return None


# -- face 1: torch custom op with eager reference -----------------------------------------
@functools.cache
def register_torch_op():
    """Define `torch.ops.trt_edgellm.update_ssm_state` (once) and return it."""
    import torch

    return define_torch_op(
        "trt_edgellm",
        "update_ssm_state(Tensor x, Tensor A, Tensor B, Tensor C, Tensor D, Tensor dt, Tensor dt_bias, "
        "Tensor state, Tensor context_lengths, int dt_softplus, int ngroups, int chunk_size) -> (Tensor, Tensor)",
        _eager, lambda x, a, b, c, d, dt, dtb, state, *rest: (x.new_empty(x.shape), torch.empty_like(state)))


def _eager(x, A, B, C, D, dt, dt_bias, state, context_lengths, dt_softplus, ngroups, chunk_size):
    """Reference in plain torch: fp32 math, a loop over tokens, all sequences at once."""
    import torch

    if x.dim() != 4:
        raise ValueError(f"update_ssm_state takes x as [B, S, Hm, Dm]; got {tuple(x.shape)}")
    if chunk_size > 1:
        raise NotImplementedError("chunk_size > 1: the 0.7.1 plugin refuses it at build time")
    batch, seq, heads, _ = x.shape
    groups = B.shape[2]  # the kernel takes G from B's shape
    if groups != ngroups or heads % groups:
        raise ValueError(f"ngroups={ngroups} disagrees with B's {groups} groups or with {heads} heads")
    rep = heads // groups
    bh = B.float().repeat_interleave(rep, dim=2)  # [B, S, Hm, N]
    ch = C.float().repeat_interleave(rep, dim=2)
    step = dt.float() + dt_bias.float()  # [B, S, Hm]
    if dt_softplus:
        step = torch.where(step <= SOFTPLUS_THRESHOLD, torch.log(1.0 + torch.exp(step)), step)
    decay = torch.exp(A.float() * step)  # [B, S, Hm]
    db = bh * step[..., None]  # [B, S, Hm, N]
    xf = x.float()
    skip = D.float()[:, None] * xf  # [B, S, Hm, Dm]
    # Prefill: tokens past context_lengths are padding. Decode: the only token always runs.
    n_valid = context_lengths.long() if seq > 1 else torch.full((batch,), seq, dtype=torch.long)
    active = torch.arange(seq)[None, :] < n_valid[:, None]  # [B, S]

    run = state.float()  # a copy: fp32 for the whole call
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(seq):
        new = run * decay[:, t, :, None, None] + db[:, t, :, None, :] * xf[:, t, :, :, None]
        y = (new @ ch[:, t, :, :, None])[..., 0] + skip[:, t]  # [B, Hm, Dm]
        keep = active[:, t]
        run = torch.where(keep[:, None, None, None], new, run)
        out[:, t] = torch.where(keep[:, None, None], y, 0.0)
    return out.to(x.dtype), run.to(state.dtype)


# -- face 2: ONNX schema -------------------------------------------------------------------
def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    A = onnx.defs.OpSchema.AttrType
    half, f32 = "tensor(float16)", "tensor(float)"
    return onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        "Edge-LLM Mamba2 selective state update (0.7 contract, 9 inputs).",
        inputs=[fp("x", half), fp("A", f32), fp("B", half), fp("C", half), fp("D", half), fp("dt", half),
                fp("dt_bias", half), fp("state", half), fp("context_lengths", "tensor(int32)")],
        outputs=[fp("output", half), fp("state_out", half)],
        attributes=[
            attr("dt_softplus", A.INT, "apply softplus to dt + dt_bias"),
            attr("ngroups", A.INT, "number of B/C groups"),
            attr("chunk_size", A.INT, "0 = sequential scan (the only kind the plugin has)", required=False),
            attr("time_step_limit", A.FLOATS, "dt clamp range; only (0, inf) is accepted", required=False),
        ],
    )


@functools.cache
def register_schema() -> None:
    register_missing(_schema())


# -- face 3: translation to the runtime node -----------------------------------------------
def emit(g: GraphBuilder, inputs: list[str], *, ngroups: int, dt_softplus: int = 1, chunk_size: int = 0,
         num_heads: int | None = None, head_dim: int | None = None, state_size: int | None = None
         ) -> tuple[str, str]:
    """Add one update_ssm_state node: the 9 inputs, dt_softplus, ngroups and chunk_size (no time_step_limit).

    When num_heads, head_dim and state_size are given, dimensions the plugin cannot run are refused here.
    """
    assert len(inputs) == len(INPUTS)
    if chunk_size > 1:
        raise ValueError("update_ssm_state: the 0.7.1 plugin accepts chunk_size 0 or 1 only")
    if None not in (num_heads, head_dim, state_size):
        problem = check_shape(num_heads, head_dim, state_size, ngroups)
        if problem:
            raise ValueError(f"update_ssm_state: {problem}")
    out, state_out = g.node(
        OP_TYPE, inputs, {"dt_softplus": int(dt_softplus), "ngroups": int(ngroups), "chunk_size": int(chunk_size)},
        n_out=2, domain=DOMAIN,
    )
    return out, state_out


# -- face 4: lowering to standard ONNX -----------------------------------------------------
def lowering(node: onnx.NodeProto) -> onnx.FunctionProto:
    """An ONNX function computing this node's semantics with standard ops only (a Scan over tokens)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("chunk_size", 0) > 1:
        raise NotImplementedError("update_ssm_state: chunk_size > 1 is refused by the plugin")
    limit = attrs.get("time_step_limit")
    if limit is not None and not (len(limit) >= 2 and limit[0] == 0.0 and math.isinf(limit[1]) and limit[1] > 0):
        raise NotImplementedError(f"update_ssm_state: time_step_limit {list(limit)} is refused by the plugin")
    softplus, groups = int(attrs.get("dt_softplus", 1)), int(attrs["ngroups"])
    name = f"{OP_TYPE}_{hashlib.sha1(f'{softplus}_{groups}'.encode()).hexdigest()[:8]}"
    g = GraphBuilder(name)
    g.function_mode = True
    _lower_body(g, softplus, groups)
    return helper.make_function(
        LOWERING_DOMAIN, name, list(INPUTS), list(OUTPUTS), g.nodes,
        [helper.make_opsetid("", ONNX_OPSET)],
    )


def _step_graph(prefix: str) -> onnx.GraphProto:
    """Scan body for one token, shapes pre-arranged so it needs no constants:
    state [B,Hm,Dm,N], x [B,Hm,Dm,1], dt*B [B,Hm,1,N], C [B,Hm,N,1], dA [B,Hm,1,1], active [B,1,1,1]
    -> new state, y [B,Hm,Dm,1]."""
    s, x, db, c, da, act = (f"{prefix}_{v}" for v in ("state", "x", "db", "c", "da", "active"))
    decayed, inject, new, y, s_out = (f"{prefix}_{v}" for v in ("decayed", "inject", "new", "y", "state_out"))
    nodes = [
        helper.make_node("Mul", [s, da], [decayed]),
        helper.make_node("Mul", [db, x], [inject]),
        helper.make_node("Add", [decayed, inject], [new]),
        helper.make_node("MatMul", [new, c], [y]),
        helper.make_node("Where", [act, new, s], [s_out]),
    ]
    vi = helper.make_tensor_value_info
    ins = [vi(n, FLOAT, None) for n in (s, x, db, c, da)] + [vi(act, onnx.TensorProto.BOOL, None)]
    outs = [vi(s_out, FLOAT, None), vi(y, FLOAT, None)]
    return helper.make_graph(nodes, f"{prefix}_body", ins, outs)


def _lower_body(g: GraphBuilder, softplus: int, groups: int) -> None:
    x, a, b, c, d, dt, dt_bias, state, ctx = INPUTS
    n, i64 = g.node, g.i64
    f32 = lambda v: n("Cast", [v], {"to": FLOAT})
    zero, one = g.const(np.array(0, np.int64)), g.const(np.array(1, np.int64))

    # Head h reads group h // (Hm / G).
    heads = n("Squeeze", [n("Shape", [x], {"start": 2, "end": 3}), i64(0)])
    per_group = n("Div", [heads, g.const(np.array(groups, np.int64))])
    head_group = n("Div", [n("Range", [zero, heads, one]), per_group])
    bh = n("Gather", [f32(b), head_group], {"axis": 2})  # [B,S,Hm,N]
    ch = n("Gather", [f32(c), head_group], {"axis": 2})

    step = n("Add", [f32(dt), f32(dt_bias)])  # [B,S,Hm]
    if softplus:
        soft = n("Log", [n("Add", [n("Exp", [step]), g.const(np.array(1.0, np.float32))])])
        small = n("LessOrEqual", [step, g.const(np.array(SOFTPLUS_THRESHOLD, np.float32))])
        step = n("Where", [small, soft, step])
    decay = n("Exp", [n("Mul", [a, step])])  # A [Hm] broadcasts over [B,S,Hm]
    db = n("Mul", [bh, n("Unsqueeze", [step, i64(3)])])

    # Which tokens run: t < context_lengths[b] when S > 1, the single token when S == 1.
    seq = n("Shape", [x], {"start": 1, "end": 2})
    n_valid = n("Where", [n("Greater", [seq, i64(1)]), n("Cast", [ctx], {"to": INT64}), seq])  # [B]
    tokens = n("Range", [zero, n("Squeeze", [seq, i64(0)]), one])
    active = n("Less", [n("Unsqueeze", [tokens, i64(0)]), n("Unsqueeze", [n_valid, i64(1)])])  # [B,S]

    xf = f32(x)
    final, ys = n(
        "Scan",
        [f32(state), n("Unsqueeze", [xf, i64(4)]), n("Unsqueeze", [db, i64(3)]), n("Unsqueeze", [ch, i64(4)]),
         n("Unsqueeze", [decay, i64(3, 4)]), n("Unsqueeze", [active, i64(2, 3, 4)])],
        {"body": _step_graph(g.fresh("ssm_step").replace("/", "_")), "num_scan_inputs": 5,
         "scan_input_axes": [1] * 5, "scan_output_axes": [1]},
        n_out=2,
    )
    y = n("Add", [n("Squeeze", [ys, i64(4)]), n("Mul", [n("Unsqueeze", [f32(d), i64(1)]), xf])])
    y = n("Where", [n("Unsqueeze", [active, i64(2, 3)]), y, g.const(np.array(0.0, np.float32))])
    n("Cast", [y], {"to": FLOAT16}, outputs=[OUTPUTS[0]])
    n("Cast", [final], {"to": FLOAT16}, outputs=[OUTPUTS[1]])
