"""Nemotron-H's MoE (fp16 experts), both faces, in standard ONNX ops: no plugin.

Routing (families.md §2.4, the runtime's sigmoid group-top-k kernel): the router is a plain fp16 `MatMul`
whose output is cast to fp32, as the runtime feeds its MoE plugins; then, all in fp32, scores =
sigmoid(logits), choice = scores + e_score_correction_bias (the bias picks experts, never weighs them),
each of `n_group` groups is scored by the sum of its two best choice values, the `topk_group` best groups
are kept (the others' experts masked to -inf), the top-k experts of the masked choice are selected, and
their weights are the UNBIASED scores, divided by (their sum + 1e-20) when `norm_topk_prob`, times
`routed_scaling_factor`. The k weights are scattered into a dense `[T, E]` row (zeros elsewhere).

Experts are ReLU^2 MLPs without a gate, down(relu(up(x))^2). As in moe.py every expert runs on every token
as one batched `MatMul` over the `[E, H, I]` / `[E, I, H]` stacks (exact for any routing: an unselected
expert is multiplied by an exact 0), each expert's output is stored in fp16 and the weighted sum is taken in
fp32, rounded to fp16 once. The shared expert (the same ReLU^2 MLP, its own `Is`) runs as plain linears in
fp16 and is added to the rounded routed sum in fp16, where HF's `NemotronHMoE.forward` adds it (after the
experts' sum is cast back to the model dtype).

Numerics, choice by choice:
- router logits are rounded to fp16 (the MatMul's output) before the fp32 cast: the runtime's router is a
  plain linear in the model dtype; HF keeps `gate.weight` and the bias in fp32 (`_keep_in_fp32_modules_strict`)
  and routes from fp32 logits, so near ties (choice gaps below ~1e-3) may select differently from HF;
- the correction bias stays fp32 (`WeightSource.vector_f32`), as the runtime keeps its plugin input fp32: it
  decides selection, and an fp16 round of a bias of magnitude 1 to 8 moves it by up to 2e-3 to 4e-3, more than
  the gaps between sigmoid scores it exists to shift;
- ReLU^2 is `Relu` then `Mul(r, r)` in fp16 (the eager face rounds the square to fp16 as the graph stores it).

Cost: all E experts per token (E / k times the routed arithmetic), as in moe.py; fine for small E. NVFP4
experts (ModelOpt) go through the runtime's Nvfp4MoePlugin instead (sigmoid_moe_nvfp4.py, dispatched from
`emit` / `eager`), which routes.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16

from ...config import ModelConfig
from ...quant.plan import NVFP4
from . import linear, moe_int4, sigmoid_moe_nvfp4
from .moe import stack_name

PROJECTIONS = ("up_proj", "down_proj")
NORM_EPS = 1e-20  # HF's NemotronHTopkRouter: weights / (sum + 1e-20)


def router_name(layer: int) -> str:
    return f"layers.{layer}.mlp.gate"


def bias_name(layer: int) -> str:
    return f"layers.{layer}.mlp.gate.e_score_correction_bias"


def shared_name(layer: int, proj: str) -> str:
    return f"layers.{layer}.mlp.shared_experts.{proj}"


def expert_linears(cfg: ModelConfig, layer: int) -> list[str]:
    """Every routed expert's linears, then the shared expert's (canonical module names)."""
    routed = [f"layers.{layer}.mlp.experts.{e}.{p}" for e in range(cfg.sigmoid_moe.num_experts) for p in PROJECTIONS]
    return routed + [shared_name(layer, p) for p in PROJECTIONS]


def _grouped(m) -> bool:
    """Whether the group stage can drop anything (with every group kept it is the identity)."""
    return m.topk_group < m.n_group


def check(m, layer: int) -> None:
    """Refuse routing shapes the reference cannot run or would run on masked (-inf) experts."""
    where = f"layers.{layer}.mlp"
    if not 1 <= m.top_k <= m.num_experts:
        raise UnsupportedError(f"{where}: top_k {m.top_k} outside [1, {m.num_experts}]")
    if not 1 <= m.topk_group <= m.n_group or m.num_experts % m.n_group:
        raise UnsupportedError(f"{where}: n_group {m.n_group} / topk_group {m.topk_group} do not split "
                               f"{m.num_experts} experts")
    per_group = m.num_experts // m.n_group
    if _grouped(m) and (per_group < 2 or m.top_k > m.topk_group * per_group):
        raise UnsupportedError(f"{where}: groups of {per_group} experts, {m.topk_group} kept, cannot be scored "
                               f"by their top-2 or hold top_k {m.top_k} experts")


def emit(e, layer: int, y: str) -> str:
    g, c, w, m = e.g, e.cfg, e.w, e.cfg.sigmoid_moe
    n, h, inter, ne = g.node, c.hidden_size, m.intermediate_size, m.num_experts
    routed = [f"layers.{layer}.mlp.experts.{x}.{p}" for x in range(ne) for p in PROJECTIONS]
    where = getattr(getattr(w, "ckpt", None), "path", None)
    if moe_int4.expert_format(e.quant.linears, routed, where) == NVFP4:  # mixed formats: refused
        check(m, layer)
        return sigmoid_moe_nvfp4.emit(e, layer, y)  # trt_edgellm::Nvfp4MoePlugin
    quantized = [k for k in e.quant.linears if k.startswith(f"layers.{layer}.mlp.")
                 and e.quant.linears[k].format != "fp16"]
    if quantized:
        raise UnsupportedError(f"{quantized[0]}: quantized MoE experts are not exported yet (FP16/BF16 only)")
    check(m, layer)

    # -- routing, fp32 over [T, E] ---------------------------------------------------------
    logits = n("Cast", [linear.emit(e, y, router_name(layer), ne, h, False)], {"to": FLOAT})
    scores = n("Sigmoid", [n("Reshape", [logits, g.i64(-1, ne)])])  # [T, E]
    choice = n("Add", [scores, w.vector_f32(bias_name(layer), ne)])
    if _grouped(m):
        per_group = ne // m.n_group
        by_group = n("Reshape", [choice, g.i64(-1, m.n_group, per_group)])  # [T, G, E/G]
        top2 = n("TopK", [by_group, g.i64(2)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)[0]
        group_scores = n("ReduceSum", [top2, g.i64(-1)], {"keepdims": 0})  # [T, G]
        kept = n("TopK", [group_scores, g.i64(m.topk_group)], {"axis": -1, "largest": 1, "sorted": 1},
                 n_out=2)[1]  # [T, kg]
        hot = n("OneHot", [kept, g.i64(m.n_group), g.const(np.array([0.0, 1.0], np.float32))], {"axis": -1})
        keep = n("Cast", [n("ReduceMax", [hot, g.i64(-2)], {"keepdims": 0})], {"to": TensorProto.BOOL})  # [T, G]
        masked = n("Where", [n("Unsqueeze", [keep, g.i64(-1)]), by_group,
                             g.const(np.array(-np.inf, np.float32))])
        choice = n("Reshape", [masked, g.i64(-1, ne)])
    top_i = n("TopK", [choice, g.i64(m.top_k)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)[1]
    top_v = n("GatherElements", [scores, top_i], {"axis": -1})  # unbiased scores [T, k]
    if m.norm_topk_prob:
        total = n("Add", [n("ReduceSum", [top_v, g.i64(-1)], {"keepdims": 1}),
                          g.const(np.array(NORM_EPS, np.float32))])
        top_v = n("Div", [top_v, total])
    if m.routed_scaling_factor != 1.0:
        top_v = n("Mul", [top_v, g.const(np.array(m.routed_scaling_factor, np.float32))])
    weights = n("ScatterElements", [n("Mul", [scores, g.const(np.array(0.0, np.float32))]), top_i, top_v],
                {"axis": -1})  # [T, E]

    # -- routed experts: all tokens as the rows of one GEMM per expert ---------------------
    parts = {p: [f"layers.{layer}.mlp.experts.{x}.{p}.weight" for x in range(ne)] for p in PROJECTIONS}
    wu = w.stacked_linear_weights(stack_name(layer, "up_proj"), parts["up_proj"], inter, h)  # [E, H, I]
    wd = w.stacked_linear_weights(stack_name(layer, "down_proj"), parts["down_proj"], h, inter)  # [E, I, H]
    x3 = n("Reshape", [y, g.i64(1, -1, h)])
    r = n("Relu", [n("MatMul", [x3, wu])])
    down = n("Cast", [n("MatMul", [n("Mul", [r, r]), wd])], {"to": FLOAT})  # [E, T, H]
    per_expert = n("Unsqueeze", [n("Transpose", [weights], {"perm": [1, 0]}), g.i64(-1)])  # [E, T, 1]
    mixed = n("ReduceSum", [n("Mul", [down, per_expert]), g.i64(0)], {"keepdims": 0})  # [T, H]
    routed = n("Reshape", [n("Cast", [mixed], {"to": FLOAT16}), n("Shape", [y])])

    # -- shared expert, fp16, added to the rounded routed sum ------------------------------
    rs = n("Relu", [linear.emit(e, y, shared_name(layer, "up_proj"), m.shared_intermediate_size, h, False)])
    shared = linear.emit(e, n("Mul", [rs, rs]), shared_name(layer, "down_proj"), h, m.shared_intermediate_size,
                         False)
    return n("Add", [routed, shared])


def route(logits, bias, m):
    """Eager routing over fp32 `[T, E]` router logits: (selected experts `[T, k]`, dense weights `[T, E]`)."""
    import torch

    scores = torch.sigmoid(logits)
    choice = scores + bias.float()
    if _grouped(m):
        by_group = choice.view(-1, m.n_group, m.num_experts // m.n_group)
        group_scores = by_group.topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(m.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, kept, True)
        choice = by_group.masked_fill(~keep[..., None], float("-inf")).view(-1, m.num_experts)
    top_i = choice.topk(m.top_k, dim=-1).indices
    top_v = scores.gather(-1, top_i)
    if m.norm_topk_prob:
        top_v = top_v / (top_v.sum(-1, keepdim=True) + NORM_EPS)
    if m.routed_scaling_factor != 1.0:
        top_v = top_v * m.routed_scaling_factor
    return top_i, torch.zeros_like(scores).scatter(-1, top_i, top_v)


def eager(y, t: dict, cfg: ModelConfig, layer_quant: dict):
    """Eager face, the same numerics: fp16-rounded router logits routed in fp32 with the fp32 bias, expert
    outputs rounded to fp16 as the graph stores them, the weighted sum in fp32 rounded once, the shared
    expert in fp16 added in fp16. NVFP4 experts (packed, held whole): the Nvfp4MoePlugin's numerics."""
    if sigmoid_moe_nvfp4.is_nvfp4(layer_quant):
        return sigmoid_moe_nvfp4.eager(y, t, cfg, layer_quant)
    stream = Stream(y, t, cfg, layer_quant)
    for proj in PROJECTIONS:
        stream.take(proj, t[f"mlp.experts.{proj}.stacked"])
    return stream.result(t, layer_quant)


class Stream:
    """The eager face fed one expert stack at a time (up, then down: the graph's declaration order), so
    the golden pass drops each `[E, ...]` stack once used; the shared expert, declared after the stacks,
    joins in `result`. Per expert the same ops as a one-expert-at-a-time loop, experts summed in order."""

    def __init__(self, y, t: dict, cfg: ModelConfig, layer_quant: dict):
        m = cfg.sigmoid_moe
        logits = linear.eager(y, t, "mlp.gate", layer_quant).float().reshape(-1, m.num_experts)
        _, self.weights = route(logits, t["mlp.gate.e_score_correction_bias"], m)
        self.m, self.y, self.x2, self.acts, self.out = m, y, y.reshape(-1, y.shape[-1]), None, None

    def take(self, proj: str, stack) -> None:
        import torch

        r16 = linear.r16
        if proj == "up_proj":
            self.acts = []
            for x in range(self.m.num_experts):
                r = torch.relu(r16(linear.matmul_fp16(self.x2, stack[x])))
                self.acts.append(r16(r * r))
        else:
            out = torch.zeros_like(self.x2)
            for x, act in enumerate(self.acts):
                out = out + r16(linear.matmul_fp16(act, stack[x])) * self.weights[:, x : x + 1]
            self.out, self.acts = out, None

    def result(self, t: dict, layer_quant: dict):
        import torch

        r16, y = linear.r16, self.y
        routed = r16(self.out).reshape(y.shape)
        rs = torch.relu(linear.eager(y, t, "mlp.shared_experts.up_proj", layer_quant))
        shared = linear.eager(r16(rs * rs), t, "mlp.shared_experts.down_proj", layer_quant)
        return r16(routed + shared)
