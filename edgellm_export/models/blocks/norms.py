"""RMSNorm, both faces, over the hidden size or per head (q/k norm), in two conventions:

- Llama's: fp32 statistics, the normalised value stored as fp16, then times the fp16 weight;
- Qwen3.5's "(1 + w)": the checkpoint stores w, the initializer holds 1 + w (WeightSource.vector), and
  the product is taken in fp32 before the one rounding to fp16, as HF's Qwen3_5RMSNorm does.

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


def emit(g, x: str, weight: str, eps: float, plus_one: bool = False) -> str:
    n = g.node
    xf = n("Cast", [x], {"to": FLOAT})
    var = n("ReduceMean", [n("Pow", [xf, g.const(np.array(2.0, np.float32))]), g.i64(-1)])
    inv = n("Reciprocal", [n("Sqrt", [n("Add", [var, g.const(np.array(eps, np.float32))])])])
    if plus_one:
        return n("Cast", [n("Mul", [n("Mul", [xf, inv]), n("Cast", [weight], {"to": FLOAT})])], {"to": FLOAT16})
    normed = n("Cast", [n("Mul", [xf, inv])], {"to": FLOAT16})
    return n("Mul", [normed, weight])


def emit_per_head(g, x: str, weight: str, eps: float, heads: int, head_dim: int, plus_one: bool = False) -> str:
    x4 = g.node("Reshape", [x, g.i64(0, 0, heads, head_dim)])
    y = emit(g, x4, weight, eps, plus_one)
    return g.node("Reshape", [y, g.i64(0, 0, heads * head_dim)])


def eager(x, weight, eps: float, plus_one: bool = False):
    import torch

    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if plus_one:
        return r16(normed * weight.float())
    return r16(r16(normed) * weight.float())


def eager_per_head(x, weight, eps: float, heads: int, head_dim: int, plus_one: bool = False):
    b = x.shape[0]
    return eager(x.view(b, -1, heads, head_dim), weight, eps, plus_one).reshape(b, -1, heads * head_dim)
