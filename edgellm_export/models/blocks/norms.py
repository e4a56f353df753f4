"""RMSNorm, both faces: fp32 statistics, the normalised value stored as fp16, then times the fp16 weight
(as HF Llama does); over the hidden size or per head (q/k norm)."""

from __future__ import annotations

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16

from .linear import r16


def emit(g, x: str, weight: str, eps: float) -> str:
    n = g.node
    xf = n("Cast", [x], {"to": FLOAT})
    var = n("ReduceMean", [n("Pow", [xf, g.const(np.array(2.0, np.float32))]), g.i64(-1)])
    inv = n("Reciprocal", [n("Sqrt", [n("Add", [var, g.const(np.array(eps, np.float32))])])])
    normed = n("Cast", [n("Mul", [xf, inv])], {"to": FLOAT16})
    return n("Mul", [normed, weight])


def emit_per_head(g, x: str, weight: str, eps: float, heads: int, head_dim: int) -> str:
    x4 = g.node("Reshape", [x, g.i64(0, 0, heads, head_dim)])
    y = emit(g, x4, weight, eps)
    return g.node("Reshape", [y, g.i64(0, 0, heads * head_dim)])


def eager(x, weight, eps: float):
    import torch

    xf = x.float()
    return r16(r16(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * weight.float())


def eager_per_head(x, weight, eps: float, heads: int, head_dim: int):
    b = x.shape[0]
    return eager(x.view(b, -1, heads, head_dim), weight, eps).reshape(b, -1, heads * head_dim)
