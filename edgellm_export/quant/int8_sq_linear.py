"""INT8 SmoothQuant W8A8 (ModelOpt `W8A8_SQ_PER_CHANNEL`), quant.md §3.9.

Checkpoint: weight int8 `[N, K]`, weight_scale fp32 `[N]` (per output channel),
input_scale fp32 scalar, pre_quant_scale `[K]` (the smoother, model dtype).
Graph: Mul(x, pqs) -> QuantizeLinear(s_x fp32, INT8) -> DequantizeLinear -> Cast(fp16);
DequantizeLinear(W, s_w, axis=0) -> Cast(fp16) -> Transpose -> MatMul. Scales stay fp32.
"""

from __future__ import annotations

from edgellm_core.errors import ExportError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT8

from ..models.weights import to_fp16
from .scales import checked_fp32


def emit(ctx, x: str) -> str:
    from .linear import transposed_matmul

    g, ws, p, n, k = ctx.g, ctx.ws, ctx.name, ctx.n, ctx.k
    w_ref = ws.quant_ref(f"{p}.weight", ("I8",), (n, k), "INT8 weight")
    sw_ref = ws.quant_ref(f"{p}.weight_scale", ("F32", "F16", "BF16"), None, "INT8 per-channel weight scale")
    if tuple(sw_ref.shape) not in ((n,), (n, 1)):
        raise ExportError(f"tensor {sw_ref.key!r} (INT8 per-channel weight scale) has shape {list(sw_ref.shape)}; "
                          f"expected [{n}]", sw_ref.file.path)
    sx_ref = ws.quant_ref(f"{p}.input_scale", ("F32", "F16", "BF16"), (), "INT8 input scale")
    pqs_ref = ws.quant_ref(f"{p}.pre_quant_scale", ("F16", "BF16", "F32"), (k,), "SmoothQuant pre_quant_scale")
    pqs = g.weight(f"{p}.pre_quant_scale", FLOAT16, (k,), lambda: to_fp16(pqs_ref), tag=pqs_ref.where())
    sx = g.weight(f"{p}.input_scale", FLOAT, (), lambda: checked_fp32(sx_ref, "input_scale").reshape(()),
                  tag=sx_ref.where())
    w = ws.passthrough(f"{p}.weight", INT8, (n, k), w_ref)
    sw = g.weight(f"{p}.weight_scale", FLOAT, (n,), lambda: checked_fp32(sw_ref, "weight_scale").reshape(n),
                  tag=sw_ref.where())
    xs = g.node("Mul", [x, pqs])
    xq = g.node("QuantizeLinear", [xs, sx], {"output_dtype": INT8})
    xdq = g.node("Cast", [g.node("DequantizeLinear", [xq, sx])], {"to": FLOAT16})
    wdq = g.node("Cast", [g.node("DequantizeLinear", [w, sw], {"axis": 0})], {"to": FLOAT16})
    return transposed_matmul(g, xdq, wdq)


def fake_quant(x, scale):
    """clamp(RNE(x / s), -128, 127) * s (torch.round rounds half to even, like QuantizeLinear)."""
    import torch

    return torch.round(x / scale).clamp(-128, 127) * scale


def eager(x, t: dict, p: str, lq):
    xs = (x.half() * t[f"{p}.pre_quant_scale"].half()).float()  # fp16 activations and Mul, as in the graph
    w = (t[f"{p}.weight"].float() * t[f"{p}.weight_scale"].float()[:, None]).half().float()  # Cast to fp16
    return fake_quant(xs, t[f"{p}.input_scale"].float()).half().float() @ w.t()
