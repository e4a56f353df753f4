"""FP8 per-tensor W8A8 (ModelOpt `FP8`), quant.md §3.2.

Checkpoint: weight e4m3 `[N, K]`, weight_scale and input_scale fp32 scalars.
Graph: [Mul(x, pre_quant_scale)] -> QuantizeLinear(x, s_x, FLOAT8E4M3FN) -> DequantizeLinear -> MatMul with
DequantizeLinear(W, s_w) -> Transpose; both scales fp16 0-D, as the runtime carries them.
"""

from __future__ import annotations

from edgellm_core.onnx_graph.builder import FLOAT8E4M3FN, FLOAT16
from edgellm_core.ops.schemas import FP8_E4M3_MAX

from ..models.weights import to_fp16
from .scales import to_fp16_scale


def emit(ctx, x: str) -> str:
    from .linear import transposed_matmul

    g, ws, p = ctx.g, ctx.ws, ctx.name
    w_ref = ws.quant_ref(f"{p}.weight", ("F8_E4M3",), (ctx.n, ctx.k), "FP8 weight")
    sw_ref = ws.quant_ref(f"{p}.weight_scale", ("F32", "F16", "BF16"), (), "FP8 weight scale")
    sx_ref = ws.quant_ref(f"{p}.input_scale", ("F32", "F16", "BF16"), (), "FP8 input scale")
    w = ws.passthrough(f"{p}.weight", FLOAT8E4M3FN, (ctx.n, ctx.k), w_ref)
    sw = g.weight(f"{p}.weight_scale", FLOAT16, (), lambda: to_fp16_scale(sw_ref, "weight_scale").reshape(()),
                  tag=sw_ref.where())
    sx = g.weight(f"{p}.input_scale", FLOAT16, (), lambda: to_fp16_scale(sx_ref, "input_scale").reshape(()),
                  tag=sx_ref.where())
    if ctx.lq.smoothing:
        # ModelOpt keeps an AWQ-style smoothing scale on FP8 layers it cannot fold (an FP8 lm_head
        # after an AWQ backbone); the reference exporter drops it, we apply it.
        pqs_ref = ws.quant_ref(f"{p}.pre_quant_scale", ("F16", "BF16", "F32"), (ctx.k,), "pre_quant_scale")
        x = g.node("Mul", [x, g.weight(f"{p}.pre_quant_scale", FLOAT16, (ctx.k,), lambda: to_fp16(pqs_ref),
                                       tag=pqs_ref.where())])
    xq = g.node("QuantizeLinear", [x, sx], {"output_dtype": FLOAT8E4M3FN})
    xdq = g.node("DequantizeLinear", [xq, sx])
    return transposed_matmul(g, xdq, g.node("DequantizeLinear", [w, sw]))


def fake_quant(x, scale):
    """sat_e4m3(RNE(x / s)) * s."""
    import torch

    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def eager(x, t: dict, p: str, lq):
    # fp16 where the graph is fp16: the activation entering Q, both DequantizeLinear outputs.
    x = x.half()
    if f"{p}.pre_quant_scale" in t:
        x = x * t[f"{p}.pre_quant_scale"].half()
    xdq = fake_quant(x.float(), t[f"{p}.input_scale"].float()).half().float()
    w = (t[f"{p}.weight"].float() * t[f"{p}.weight_scale"].float()).half().float()
    return xdq @ w.t()
