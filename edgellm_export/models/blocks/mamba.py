"""Nemotron-H's Mamba2 token mixer, both faces (families.md §3.1).

in_proj splits into z (the gate, d_inner), xBC (conv_dim) and dt (one per head); `trt_edgellm::causal_conv1d`
over xBC (fed its history in chunked prefill: blocks/conv.py), SiLU, split into x `[B, S, Hm, Dm]`,
B and C `[B, S, G, N]`; `trt_edgellm::update_ssm_state` with A = -exp(A_log) in fp32 (computed at
export), D, dt (raw) and dt_bias in fp16, softplus in the kernel, no time-step clamp (the runtime's and
the hub code's (0, inf)); then a gated grouped RMSNorm, norm(y * SiLU(z)) over groups of d_inner / G in
fp32, rounded to fp16 and times the fp16 weight (as HF's NemotronHRMSNormGated); out_proj. Carries a
conv state `[B, conv_dim, K]` and an SSM state `[B, Hm, Dm, N]`, both fp16.
"""

from __future__ import annotations

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16
from edgellm_core.ops import update_ssm_state

from ...config import ModelConfig
from . import conv as convolution
from . import linear

LINEARS = ("in_proj", "out_proj")


def linear_names(layer: int) -> list[str]:
    return [f"layers.{layer}.mixer.{m}" for m in LINEARS]


def ssm_attrs(c: ModelConfig) -> dict:
    """The update_ssm_state attributes, for both faces."""
    return {"dt_softplus": 1, "ngroups": c.mamba.n_groups, "chunk_size": 0}


def _neg_exp(t):
    return -t.exp()


def emit(e, io, contract, layer: int, y: str) -> str:
    """Graph face: the mixer's output `[B, S, H]` from the normed input `y`."""
    g, c, w, n = e.g, e.cfg, e.w, e.g.node
    m, p, h = c.mamba, f"layers.{layer}.mixer.", c.hidden_size
    proj = linear.emit(e, y, p + "in_proj", m.inner + m.conv_dim + m.num_heads, h, m.proj_bias)
    z, xbc, dt = n("Split", [proj, g.i64(m.inner, m.conv_dim, m.num_heads)], {"axis": -1}, n_out=3)
    conv_in, ssm_in = io.conv[layer], io.recurrent[layer]
    k = m.conv_kernel
    weight = w.tensor(p + "conv1d.weight", (m.conv_dim, 1, k))
    bias = (w.vector(p + "conv1d.bias", m.conv_dim) if m.conv_bias
            else g.const(np.zeros(m.conv_dim, np.float16), "conv_bias_zero"))
    conv, conv_out = convolution.emit(g, io, xbc, weight, bias, conv_in, m.conv_dim, k)
    act = n("Mul", [conv, n("Sigmoid", [conv])])
    gn = m.n_groups * m.state_size
    x, bm, cm = n("Split", [act, g.i64(m.inner, gn, gn)], {"axis": -1}, n_out=3)
    x4 = n("Reshape", [x, g.i64(0, 0, m.num_heads, m.head_dim)])
    b4 = n("Reshape", [bm, g.i64(0, 0, m.n_groups, m.state_size)])
    c4 = n("Reshape", [cm, g.i64(0, 0, m.n_groups, m.state_size)])
    a = w.vector_f32(p + "A_log", m.num_heads, _neg_exp, as_name=p + "A")
    out4, ssm_out = update_ssm_state.emit(
        g, [x4, a, b4, c4, w.vector(p + "D", m.num_heads), dt, w.vector(p + "dt_bias", m.num_heads), ssm_in,
            io.context_lengths], **ssm_attrs(c), num_heads=m.num_heads, head_dim=m.head_dim,
        state_size=m.state_size)
    contract.set_state_present(io, conv_in, conv_out)
    contract.set_state_present(io, ssm_in, ssm_out)

    # Gated grouped RMSNorm: y * SiLU(z) in fp32, normalised per group, rounded, times the weight.
    yf = n("Cast", [n("Reshape", [out4, g.i64(0, 0, m.inner)])], {"to": FLOAT})
    zf = n("Cast", [z], {"to": FLOAT})
    gated = n("Mul", [yf, n("Mul", [zf, n("Sigmoid", [zf])])])
    groups = n("Reshape", [gated, g.i64(0, 0, m.n_groups, m.inner // m.n_groups)])
    var = n("ReduceMean", [n("Mul", [groups, groups]), g.i64(-1)])
    inv = n("Reciprocal", [n("Sqrt", [n("Add", [var, g.const(np.array(c.rms_norm_eps, np.float32))])])])
    normed = n("Cast", [n("Reshape", [n("Mul", [groups, inv]), g.i64(0, 0, m.inner)])], {"to": FLOAT16})
    out = n("Mul", [normed, w.vector(p + "norm.weight", m.inner)])
    return linear.emit(e, out, p + "out_proj", h, m.inner, m.proj_bias)


def initial_state(c: ModelConfig, batch: int, bindings):
    """Zeroed (conv state, SSM state) of one layer, both fp16, in the contract's shapes."""
    import torch

    m = c.mamba
    return (torch.zeros(bindings.conv_state_dims(batch, m.conv_dim, m.conv_kernel), dtype=torch.float16),
            torch.zeros(bindings.recurrent_state_dims(batch, m.num_heads, m.head_dim, m.state_size),
                        dtype=torch.float16))


def eager(y, sizes: list[int], t: dict, quant: dict, c: ModelConfig, states: list, calls: list):
    """Eager face over many runtime calls (attention.eager's convention): projections on every call's
    tokens at once; the conv and the SSM walk `calls` in order, updating `states` (per cache index)."""
    import torch

    r16 = linear.r16
    ssm_op = update_ssm_state.register_torch_op()
    m, b, k = c.mamba, y.shape[0], c.mamba.conv_kernel
    proj = linear.eager(y, t, "mixer.in_proj", quant)
    z, xbc, dt = proj.split([m.inner, m.conv_dim, m.num_heads], dim=-1)
    weight = t["mixer.conv1d.weight"]
    bias = t["mixer.conv1d.bias"] if m.conv_bias else torch.zeros(m.conv_dim, dtype=torch.float16)
    a, d, dt_bias = t["mixer.A"], t["mixer.D"], t["mixer.dt_bias"]
    attrs = ssm_attrs(c)
    gn = m.n_groups * m.state_size
    outs = []
    for xs, dts, (idx, ctx, start) in zip(xbc.split(sizes, 1), dt.split(sizes, 1), calls):
        conv_state, ssm_state = states[idx]
        s = xs.shape[1]
        conv, conv_state = convolution.eager(xs, weight, bias, conv_state, ctx, start, m.conv_dim, k)
        act = r16(conv * r16(torch.sigmoid(conv)))
        x, bm, cm = act.split([m.inner, gn, gn], dim=-1)
        out, ssm_state = ssm_op(x.reshape(b, s, m.num_heads, m.head_dim).half(),
                                a, bm.reshape(b, s, m.n_groups, m.state_size).half(),
                                cm.reshape(b, s, m.n_groups, m.state_size).half(), d, dts.half(), dt_bias,
                                ssm_state, ctx, *attrs.values())
        states[idx] = (conv_state, ssm_state)
        outs.append(out.float().reshape(b, s, m.inner))
    yf = torch.cat(outs, dim=1)
    gated = yf * (z * torch.sigmoid(z))
    groups = gated.view(b, -1, m.n_groups, m.inner // m.n_groups)
    normed = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)).reshape(b, -1, m.inner)
    out = r16(r16(normed) * t["mixer.norm.weight"].float())
    return linear.eager(out, t, "mixer.out_proj", quant)
