"""Qwen3.5's GatedDeltaNet token mixer, both faces (families.md §3.2).

in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, a depthwise causal conv over q, k and v together
(`trt_edgellm::causal_conv1d`), SiLU, the delta-rule recurrence (`trt_edgellm::gated_delta_net`, which
derives the decay from a, A_log and dt_bias, beta from b, and L2-normalises q and k itself), a per-head
RMSNorm gated by SiLU(z), out_proj. The layer carries two states between calls: the conv state (the
last K conv inputs) and the recurrent state (fp32).

The conv is fed its history in chunked prefill (blocks/conv.py: the 0.7.1 kernel would otherwise
start a continuing chunk from zeros).
"""

from __future__ import annotations

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16
from edgellm_core.ops import gated_delta_net

from ...config import ModelConfig
from . import conv as convolution
from . import linear, norms

LINEARS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


def linear_names(layer: int) -> list[str]:
    return [f"layers.{layer}.linear_attn.{m}" for m in LINEARS]


def _shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    d, h = c.gdn, c.hidden_size
    return {"in_proj_qkv": (d.conv_dim, h), "in_proj_z": (d.value_dim, h), "in_proj_b": (d.num_v_heads, h),
            "in_proj_a": (d.num_v_heads, h), "out_proj": (h, d.value_dim)}


def gdn_attrs(c: ModelConfig) -> dict:
    return {"k_dim": c.gdn.k_head_dim, "v_dim": c.gdn.v_head_dim, "use_mtp": 0}


def emit(e, io, contract, layer: int, y: str) -> str:
    """Graph face: the mixer's output `[B, S, H]` from the normed input `y`."""
    g, c, w, n = e.g, e.cfg, e.w, e.g.node
    d, p, sh = c.gdn, f"layers.{layer}.linear_attn.", _shapes(c)
    qkv, z, b, a = (linear.emit(e, y, p + m, *sh[m], False) for m in LINEARS[:4])
    conv_in, rec_in = io.conv[layer], io.recurrent[layer]

    k = d.conv_kernel
    bias = g.const(np.zeros(d.conv_dim, np.float16), "conv_bias_zero")
    weight = w.tensor(p + "conv1d.weight", (d.conv_dim, 1, k))
    conv, conv_out = convolution.emit(g, io, qkv, weight, bias, conv_in, d.conv_dim, k)
    act = n("Mul", [conv, n("Sigmoid", [conv])])

    q, kk, v = n("Split", [act, g.i64(d.key_dim, d.key_dim, d.value_dim)], {"axis": -1}, n_out=3)
    q = n("Reshape", [q, g.i64(0, 0, d.num_k_heads, d.k_head_dim)])
    kk = n("Reshape", [kk, g.i64(0, 0, d.num_k_heads, d.k_head_dim)])
    v = n("Reshape", [v, g.i64(0, 0, d.num_v_heads, d.v_head_dim)])
    o, rec_out = gated_delta_net.emit(
        g, [q, kk, v, a, b, w.vector_f32(p + "A_log", d.num_v_heads), w.vector(p + "dt_bias", d.num_v_heads),
            rec_in, io.context_lengths], **gdn_attrs(c))
    contract.set_state_present(io, conv_in, conv_out)
    contract.set_state_present(io, rec_in, rec_out)

    # Per-head RMSNorm (plain weight), times SiLU(z) in fp32.
    normed = norms.emit(g, o, w.vector(p + "norm.weight", d.v_head_dim), c.rms_norm_eps)
    zf = n("Cast", [n("Reshape", [z, g.i64(0, 0, d.num_v_heads, d.v_head_dim)])], {"to": FLOAT})
    gated = n("Cast", [n("Mul", [n("Cast", [normed], {"to": FLOAT}), n("Mul", [zf, n("Sigmoid", [zf])])])],
              {"to": FLOAT16})
    out = n("Reshape", [gated, g.i64(0, 0, d.value_dim)])
    return linear.emit(e, out, p + "out_proj", *sh["out_proj"], False)


def initial_state(c: ModelConfig, batch: int, bindings):
    """Zeroed (conv state fp16, recurrent state fp32) of one layer, in the contract's shapes."""
    import torch

    d = c.gdn
    return (torch.zeros(bindings.conv_state_dims(batch, d.conv_dim, d.conv_kernel), dtype=torch.float16),
            torch.zeros(bindings.recurrent_state_dims(batch, d.num_v_heads, d.k_head_dim, d.v_head_dim),
                        dtype=torch.float32))


def eager(y, sizes: list[int], t: dict, quant: dict, c: ModelConfig, states: list, calls: list):
    """Eager face over many runtime calls (attention.eager's convention): the projections run on every
    call's tokens at once, the conv and the recurrence walk `calls` in order, updating `states`
    (per cache index: (conv state, recurrent state))."""
    import torch

    r16 = linear.r16
    gdn_op = gated_delta_net.register_torch_op()
    d, b, k = c.gdn, y.shape[0], c.gdn.conv_kernel
    qkv, z, bb, aa = (linear.eager(y, t, "linear_attn." + m, quant) for m in LINEARS[:4])
    weight = t["linear_attn.conv1d.weight"]
    bias = torch.zeros(d.conv_dim, dtype=torch.float16)
    a_log, dt_bias = t["linear_attn.A_log"], t["linear_attn.dt_bias"]
    ga = gdn_attrs(c)
    outs = []
    for xs, bs, as_, (idx, ctx, start) in zip(qkv.split(sizes, 1), bb.split(sizes, 1), aa.split(sizes, 1), calls):
        conv_state, rec_state = states[idx]
        s = xs.shape[1]
        conv, conv_state = convolution.eager(xs, weight, bias, conv_state, ctx, start, d.conv_dim, k)
        act = r16(conv * r16(torch.sigmoid(conv)))
        q, kk, v = act.split([d.key_dim, d.key_dim, d.value_dim], dim=-1)
        o, rec_state = gdn_op(q.reshape(b, s, d.num_k_heads, d.k_head_dim).half(),
                              kk.reshape(b, s, d.num_k_heads, d.k_head_dim).half(),
                              v.reshape(b, s, d.num_v_heads, d.v_head_dim).half(), as_.half(), bs.half(),
                              a_log, dt_bias, rec_state, ctx, *ga.values())
        states[idx] = (conv_state, rec_state)
        outs.append(o.float())
    o = torch.cat(outs, dim=1)  # [B, S_all, Hv, Dv]
    normed = norms.eager(o, t["linear_attn.norm.weight"], c.rms_norm_eps)
    zf = z.view(b, -1, d.num_v_heads, d.v_head_dim)
    gated = r16(normed * (zf * torch.sigmoid(zf)))
    return linear.eager(gated.reshape(b, -1, d.value_dim), t, "linear_attn.out_proj", quant)
