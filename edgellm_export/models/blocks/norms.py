"""RMSNorm, both faces, over the hidden size or per head (q/k norm), in the conventions the families use:

- Llama's: fp32 statistics, the normalised value stored as fp16, then times the fp16 weight;
- `fp32_product` (Qwen3.5, Nemotron-H): the weight multiplies the fp32 normalised value, one rounding after;
- `plus_one` (Qwen3.5): the checkpoint stores w and the norm applies 1 + w; the initializer holds 1 + w
  (WeightSource.vector), so only the weight's name differs.

`weight_name` / `weight_key` are the one place that decides which initializer a norm reads, for both faces.
"""

from __future__ import annotations

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16

from .linear import r16


def weight_name(w, name: str, size: int, plus_one: bool) -> str:
    """Graph face: declare the norm's weight initializer."""
    return w.vector(name, size, plus_one=True) if plus_one else w.vector(name, size)


def weight_key(name: str, plus_one: bool) -> str:
    """Eager face: the initializer's name as the golden pass receives it."""
    return f"{name}+1" if plus_one else name


def emit(g, x: str, weight: str, eps: float, fp32_product: bool = False) -> str:
    n = g.node
    xf = n("Cast", [x], {"to": FLOAT})
    var = n("ReduceMean", [n("Pow", [xf, g.const(np.array(2.0, np.float32))]), g.i64(-1)])
    inv = n("Reciprocal", [n("Sqrt", [n("Add", [var, g.const(np.array(eps, np.float32))])])])
    if fp32_product:
        return n("Cast", [n("Mul", [n("Mul", [xf, inv]), n("Cast", [weight], {"to": FLOAT})])], {"to": FLOAT16})
    normed = n("Cast", [n("Mul", [xf, inv])], {"to": FLOAT16})
    return n("Mul", [normed, weight])


def emit_per_head(g, x: str, weight: str, eps: float, heads: int, head_dim: int, fp32_product: bool = False) -> str:
    x4 = g.node("Reshape", [x, g.i64(0, 0, heads, head_dim)])
    y = emit(g, x4, weight, eps, fp32_product)
    return g.node("Reshape", [y, g.i64(0, 0, heads * head_dim)])


def eager(x, weight, eps: float, fp32_product: bool = False):
    import torch

    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if fp32_product:
        return r16(normed * weight.float())
    return r16(r16(normed) * weight.float())


def eager_per_head(x, weight, eps: float, heads: int, head_dim: int, fp32_product: bool = False):
    b = x.shape[0]
    return eager(x.view(b, -1, heads, head_dim), weight, eps, fp32_product).reshape(b, -1, heads * head_dim)
