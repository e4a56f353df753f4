"""What the softmax-routed MoE plugin blocks (moe_int4.py, moe_nvfp4.py) share around their plugin node.

The router: an fp16 MatMul on the flattened tokens, cast to the fp32 `[B*S, E]` logits the plugins read (a
quantized router is refused: the runtime has no other form). The rescale: both plugins renormalise the top-k
weights; for a checkpoint with `norm_topk_prob: false` their output is multiplied by the sum of the k softmax
probabilities (from the same fp32 logits, in fp32, rounded once to fp16), which turns the renormalised mix
back into HF's unnormalised one. Each has a graph and an eager face.
"""

from __future__ import annotations

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16

from ...quant.plan import FP16
from . import linear


def refuse_quantized_router(e, layer: int) -> None:
    """Before any work: the runtime reads the router's logits from an fp16 MatMul, never a quantized one."""
    router = f"layers.{layer}.mlp.gate"
    if router in e.quant.linears and e.quant.linears[router].format != FP16:
        raise UnsupportedError(f"{router}: the MoE router is quantized ({e.quant.linears[router].format}); the "
                               "runtime reads its logits from an fp16 MatMul", e.w.ckpt.path)


def router_logits(e, layer: int, y: str) -> str:
    """Graph face: the fp32 `[B*S, E]` router logits of `layer` for the hidden states `y`."""
    g, h, experts = e.g, e.cfg.hidden_size, e.cfg.moe.num_experts
    router = f"layers.{layer}.mlp.gate"
    refuse_quantized_router(e, layer)
    flat = g.node("Reshape", [y, g.i64(-1, h)])
    return g.node("Cast", [linear.emit(e, flat, router, experts, h, False)], {"to": FLOAT})


def undo_renormalisation(g, out: str, logits: str, y: str, hidden: int, top_k: int) -> str:
    """Graph face: the plugin's `out` times the sum of the top-k softmax probabilities, back in `y`'s shape."""
    n = g.node
    top_v, _ = n("TopK", [n("Softmax", [logits], {"axis": -1}), g.i64(top_k)],
                 {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)
    total = n("ReduceSum", [top_v, g.i64(-1)], {"keepdims": 1})  # [T, 1]
    scaled = n("Mul", [n("Cast", [n("Reshape", [out, g.i64(-1, hidden)])], {"to": FLOAT}), total])
    return n("Reshape", [n("Cast", [scaled], {"to": FLOAT16}), n("Shape", [y])])


def topk_probability_sum(logits, top_k: int):
    """Eager face of the rescale's factor: `[T, 1]` fp32 sums of the top-k softmax probabilities."""
    import torch

    return torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1).values.sum(-1, keepdim=True)
