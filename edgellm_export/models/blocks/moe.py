"""The sparse MoE MLP of Qwen3-MoE, both faces. FP16/BF16 experts in standard ONNX ops (no plugin: this
module); INT4 experts (GPTQ, AutoAWQ, ModelOpt W4A16) through `trt_edgellm::Int4MoePlugin` (moe_int4.py,
dispatched from `emit` / `eager`); NVFP4 experts (ModelOpt) through `trt_edgellm::NvFP4MoEPluginGeforce`
(moe_nvfp4.py, likewise); other formats are refused.

Routing as the runtime's kernel does it: router `MatMul` (fp16) then a cast to fp32 outside the experts,
softmax over the experts, top-k, renormalised to sum 1 when `norm_topk_prob`. The k weights are scattered
into a dense `[.., E]` row (zeros elsewhere), every expert's SwiGLU runs on every token as batched
`MatMul`s over `[E, H, I]` / `[E, I, H]` stacks, and the outputs are summed with those weights in fp32.
Exact for any routing: an unselected expert is multiplied by an exact 0.

Cost: all E experts per token, E / k times the arithmetic of the routed experts (and every expert's
weights read on every call, as a decode step's routed experts would cover most of them anyway for
batch > 1), growing linearly with tokens x experts; fine for the small-E models on the Edge-LLM list,
and the runtime's MoE plugins route instead (INT4: moe_int4.py; NVFP4: moe_nvfp4.py).
"""

from __future__ import annotations

import numpy as np

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16

from ...config import ModelConfig
from ...quant.plan import INT4_FORMATS, NVFP4
from . import linear, moe_int4, moe_nvfp4

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def router_name(layer: int) -> str:
    return f"layers.{layer}.mlp.gate"


def stack_name(layer: int, proj: str) -> str:
    return f"layers.{layer}.mlp.experts.{proj}.stacked"


def expert_linears(cfg: ModelConfig, layer: int) -> list[str]:
    return [f"layers.{layer}.mlp.experts.{e}.{p}" for e in range(cfg.moe.num_experts) for p in PROJECTIONS]


def emit(e, layer: int, y: str) -> str:
    g, c, w, m = e.g, e.cfg, e.w, e.cfg.moe
    n, h, inter = g.node, c.hidden_size, m.intermediate_size
    where = w.ckpt.path if w is not None else None
    fmt = moe_int4.expert_format(e.quant.linears, expert_linears(c, layer), where)  # mixed formats: refused
    if fmt in INT4_FORMATS:
        return moe_int4.emit(e, layer, y, fmt)  # trt_edgellm::Int4MoePlugin
    if fmt == NVFP4:
        return moe_nvfp4.emit(e, layer, y)  # trt_edgellm::NvFP4MoEPluginGeforce
    quantized = [k for k in e.quant.linears if k.startswith(f"layers.{layer}.mlp.")
                 and e.quant.linears[k].format != "fp16"]
    if quantized:
        fmt = e.quant.linears[quantized[0]].format
        raise UnsupportedError(f"{quantized[0]}: quantized MoE experts of format {fmt} are not exported "
                               "(FP16/BF16, INT4 and NVFP4 only)", where)
    logits = n("Cast", [linear.emit(e, y, router_name(layer), m.num_experts, h, False)], {"to": FLOAT})
    probs = n("Softmax", [logits], {"axis": -1})
    top_v, top_i = n("TopK", [probs, g.i64(m.top_k)], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)
    if m.norm_topk_prob:
        top_v = n("Div", [top_v, n("ReduceSum", [top_v, g.i64(-1)], {"keepdims": 1})])
    weights = n("ScatterElements", [n("Mul", [probs, g.const(np.array(0.0, np.float32))]), top_i, top_v],
                {"axis": -1})  # [B, S, E]
    parts = {p: [f"layers.{layer}.mlp.experts.{x}.{p}.weight" for x in range(m.num_experts)] for p in PROJECTIONS}
    wg = w.stacked_linear_weights(stack_name(layer, "gate_proj"), parts["gate_proj"], inter, h)  # [E, H, I]
    wu = w.stacked_linear_weights(stack_name(layer, "up_proj"), parts["up_proj"], inter, h)
    wd = w.stacked_linear_weights(stack_name(layer, "down_proj"), parts["down_proj"], h, inter)  # [E, I, H]
    # All tokens as the rows of one GEMM per expert: [1, T, H] against [E, H, I] gives [E, T, I], so each
    # expert's weights are read once per call, not once per token.
    x3 = n("Reshape", [y, g.i64(1, -1, h)])
    gate = n("MatMul", [x3, wg])
    act = n("Mul", [n("Mul", [gate, n("Sigmoid", [gate])]), n("MatMul", [x3, wu])])
    down = n("Cast", [n("MatMul", [act, wd])], {"to": FLOAT})  # [E, T, H]
    per_expert = n("Unsqueeze", [n("Transpose", [n("Reshape", [weights, g.i64(-1, m.num_experts)])],
                                   {"perm": [1, 0]}), g.i64(-1)])  # [E, T, 1]
    mixed = n("ReduceSum", [n("Mul", [down, per_expert]), g.i64(0)], {"keepdims": 0})  # [T, H]
    return n("Reshape", [n("Cast", [mixed], {"to": FLOAT16}), n("Shape", [y])])


def eager(y, t: dict, cfg: ModelConfig, layer_quant: dict):
    """Eager face, the same numerics: expert outputs rounded to fp16 as the graph stores them, the
    weighted sum in fp32, rounded once."""
    if moe_int4.is_int4(layer_quant):
        return moe_int4.eager(y, t, cfg, layer_quant)  # the Int4MoePlugin's numerics
    if moe_nvfp4.is_nvfp4(layer_quant):
        return moe_nvfp4.eager(y, t, cfg, layer_quant)  # the NvFP4MoEPluginGeforce's numerics
    stream = Stream(y, t, cfg, layer_quant)
    for proj in PROJECTIONS:
        stream.take(proj, t[f"mlp.experts.{proj}.stacked"])
    return stream.result(t, layer_quant)


class Stream:
    """The eager face fed one expert stack at a time, in the graph's declaration order (gate, up, down),
    so the golden pass can drop each `[E, ...]` stack as soon as it is used instead of holding a layer's
    three. Per expert it computes exactly what a one-expert-at-a-time loop would, and sums the experts in
    order."""

    def __init__(self, y, t: dict, cfg: ModelConfig, layer_quant: dict):
        import torch

        m = cfg.moe
        self.shape, self.m = y.shape, m
        logits = linear.eager(y, t, "mlp.gate", layer_quant).float()
        probs = torch.softmax(logits, dim=-1)
        top_v, top_i = torch.topk(probs, m.top_k, dim=-1)
        if m.norm_topk_prob:
            top_v = top_v / top_v.sum(-1, keepdim=True)
        self.weights = torch.zeros_like(probs).scatter(-1, top_i, top_v)
        self.y, self.gates, self.acts, self.out = y, None, None, None

    def take(self, proj: str, stack) -> None:
        import torch

        r16, n = linear.r16, self.m.num_experts
        if proj == "gate_proj":
            self.gates = [r16(linear.matmul_fp16(self.y, stack[x])) for x in range(n)]
        elif proj == "up_proj":
            self.acts = [r16(r16(gate * r16(torch.sigmoid(gate))) * r16(linear.matmul_fp16(self.y, stack[x])))
                         for x, gate in enumerate(self.gates)]
            self.gates = None
        else:
            out = torch.zeros_like(self.y)
            for x, act in enumerate(self.acts):
                out = out + r16(linear.matmul_fp16(act, stack[x])) * self.weights[..., x : x + 1]
            self.out, self.acts = out, None

    def result(self, t: dict, layer_quant: dict):
        return linear.r16(self.out)
