"""NVFP4 W4A4 (ModelOpt `NVFP4`, 16-wide blocks), quant.md §3.4.

Checkpoint: weight uint8 `[N, K/2]` (two e2m1 codes per byte, low nibble first),
weight_scale e4m3 `[N, K/16]`, weight_scale_2 and input_scale fp32 scalars.
Graph: the activation goes through trt::TRT_FP4DynamicQuantize and two trt::DequantizeLinear
(block scales by the fp16 global scale, then the codes by the block scales); the weight is
a FLOAT4E2M1 `[N, K]` initializer (same bytes) dequantized by the standard
DequantizeLinear(weight_scale, weight_scale_2) -> DequantizeLinear(W, ., block 16) -> Cast.
"""

from __future__ import annotations

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT4E2M1, FLOAT8E4M3FN, FLOAT16
from edgellm_core.ops import fp4

from .scales import checked_fp32, to_fp16_scale

SCALE = ("F32",)


def emit(ctx, x: str) -> str:
    from .linear import transposed_matmul

    g, ws, p, n, k, block = ctx.g, ctx.ws, ctx.name, ctx.n, ctx.k, ctx.lq.group_size
    if k % block:
        raise UnsupportedError(f"layer {p}: in_features {k} is not a multiple of the NVFP4 block {block}",
                               ws.ckpt.path)
    w_ref = ws.quant_ref(f"{p}.weight", ("U8",), (n, k // 2), "NVFP4 packed weight")
    bs_ref = ws.quant_ref(f"{p}.weight_scale", ("F8_E4M3",), (n, k // block), "NVFP4 block scales")
    ws2_ref = ws.quant_ref(f"{p}.weight_scale_2", SCALE, (), "NVFP4 global weight scale")
    sx_ref = ws.quant_ref(f"{p}.input_scale", SCALE, (), "NVFP4 input scale")
    w = ws.passthrough(f"{p}.weight", FLOAT4E2M1, (n, k), w_ref)
    bs = ws.passthrough(f"{p}.weight_scale", FLOAT8E4M3FN, (n, k // block), bs_ref)
    ws2 = g.weight(f"{p}.weight_scale_2", FLOAT, (), lambda: checked_fp32(ws2_ref, "weight_scale_2").reshape(()),
                   tag=ws2_ref.where())
    sx = g.weight(f"{p}.input_scale", FLOAT, (), lambda: checked_fp32(sx_ref, "input_scale").reshape(()),
                  tag=sx_ref.where())
    sx16 = g.weight(f"{p}.input_scale_f16", FLOAT16, (),
                    lambda: to_fp16_scale(sx_ref, "input_scale").reshape(()), tag=sx_ref.where())
    xdq = fp4.emit_activation_qdq(g, x, sx, sx16)
    scales = g.node("DequantizeLinear", [bs, ws2])
    wdq = g.node("DequantizeLinear", [w, scales], {"axis": -1, "block_size": block})
    return transposed_matmul(g, xdq, g.node("Cast", [wdq], {"to": FLOAT16}))


def unpack_codes(packed):
    """uint8 `[N, K/2]` -> e2m1 codes `[N, K]`, low nibble = even k."""
    import torch

    b = packed.view(torch.uint8)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)


def eager(x, t: dict, p: str, lq):
    import torch

    quantize, dequantize = fp4.register_torch_op()
    codes, sf = quantize(x.half(), t[f"{p}.input_scale"], fp4.BLOCK)  # the runtime quantizes fp16 activations
    xdq = dequantize(codes, dequantize(sf, t[f"{p}.input_scale_f16"], 0), fp4.BLOCK).float()
    block_scales = t[f"{p}.weight_scale"].float() * t[f"{p}.weight_scale_2"].float()
    vals = torch.from_numpy(fp4.E2M1_VALUES)[unpack_codes(t[f"{p}.weight"]).long()]
    w = (vals * block_scales.repeat_interleave(lq.group_size, dim=-1)).half().float()
    return xdq @ w.t()
