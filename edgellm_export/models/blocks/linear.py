"""A linear layer, both faces: fp16 `MatMul` over a pre-transposed `[in, out]` weight, or the quantized
pattern of its checkpoint's format (quant/linear.py); an optional bias."""

from __future__ import annotations

from ...quant import linear as qlinear
from ...quant.plan import FP16


def emit(e, x: str, name: str, out_f: int, in_f: int, bias: bool) -> str:
    """Graph face; `e` is the decoder's emission context (g, w, quant)."""
    lq = e.quant.linears.get(name)
    if lq is not None and lq.format != FP16:
        y = qlinear.emit(qlinear.LinearContext(e.g, e.w, name, out_f, in_f, lq), x)
    else:
        y = e.g.node("MatMul", [x, e.w.linear_weight(f"{name}.weight", out_f, in_f)])
    if bias:
        y = e.g.node("Add", [y, e.w.vector(f"{name}.bias", out_f)])
    return y


def r16(x):
    """Round to fp16 where the graph stores an fp16 activation. Computing in fp32 but storing
    where the runtime stores keeps the reference's quantizer inputs bit-identical to the
    engine's in almost every element, so activation quantization (a step of up to a third
    of the value in NVFP4) rarely rounds one way here and the other way there."""
    return x.half().float()


def eager(x, t: dict, name: str, quant: dict):
    """Eager face: fp32 x through the linear `name`, in its checkpoint's format, over initializers `t`."""
    lq = quant.get(name)
    if lq is not None and lq.format != FP16:
        y = r16(qlinear.eager(x, t, name, lq))
    else:
        y = r16(matmul_fp16(x, t[name + ".weight.T"]))
    b = t.get(name + ".bias")
    return r16(y + b.float()) if b is not None else y


def matmul_fp16(x, w):
    """x (fp32, [..., K]) @ w (fp16, [K, N]) in fp32, widening w in cache-sized blocks.

    Widening a whole weight to fp32 first costs a full extra pass through
    memory; blocks of 64 rows by 8192 columns stay in cache (about 2x faster).
    The block shape fixes the summation order, so the golden logits depend on it.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = w.shape[1]
    y = x2.new_zeros((x2.shape[0], n))
    for n0 in range(0, n, 8192):
        cols = w[:, n0 : n0 + 8192]
        out = y[:, n0 : n0 + 8192]
        for k0 in range(0, k, 64):
            out.addmm_(x2[:, k0 : k0 + 64], cols[k0 : k0 + 64].float())
    return y.reshape(*lead, n)
