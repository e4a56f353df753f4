"""MXFP8 (ModelOpt `MXFP8`, 32-wide blocks with E8M0 scales), quant.md §3.3.

Checkpoint: weight e4m3 `[N, K]`, weight_scale uint8 `[N, K/32]` (biased exponents).
Graph: trt::TRT_MXFP8DynamicQuantize -> trt::TRT_MXFP8DequantizeLinear on the activation;
trt::TRT_MXFP8DequantizeLinear(W, weight_scale) -> Transpose -> MatMul.
"""

from __future__ import annotations

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT8E4M3FN, UINT8
from edgellm_core.ops import mxfp8


def emit(ctx, x: str) -> str:
    from .linear import transposed_matmul

    g, ws, p, n, k, block = ctx.g, ctx.ws, ctx.name, ctx.n, ctx.k, ctx.lq.group_size
    if k % block:
        raise UnsupportedError(f"layer {p}: in_features {k} is not a multiple of the MXFP8 block {block}",
                               ws.ckpt.path)
    w_ref = ws.quant_ref(f"{p}.weight", ("F8_E4M3",), (n, k), "MXFP8 weight")
    s_ref = ws.quant_ref(f"{p}.weight_scale", ("U8",), (n, k // block), "MXFP8 E8M0 block scales")
    w = ws.passthrough(f"{p}.weight", FLOAT8E4M3FN, (n, k), w_ref)
    s = ws.passthrough(f"{p}.weight_scale", UINT8, (n, k // block), s_ref)
    xdq = mxfp8.emit_activation_qdq(g, x)
    return transposed_matmul(g, xdq, mxfp8.emit_dequantize(g, w, s, block))


def eager(x, t: dict, p: str, lq):
    quantize, dequantize = mxfp8.register_torch_op()
    q, s = quantize(x.half(), mxfp8.BLOCK)  # the runtime quantizes fp16 activations
    xdq = dequantize(q, s, mxfp8.BLOCK).float()
    w = dequantize(t[f"{p}.weight"], t[f"{p}.weight_scale"], lq.group_size).float()
    return xdq @ w.t()
