"""The pieces both faces of the encoder graphs are built from (visual/*.py, audio/*.py): linears (quantized ones
through the language model's formats), patch embedding, norms, GELUs, the Qwen vision RoPE and ViT attention.

Precision, the same in both faces: activations stored in fp16 where the graph stores them; norms, softmax,
activations and RoPE compute in fp32 and round once.
"""

from __future__ import annotations

import math

import numpy as np

from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, GraphBuilder
from edgellm_core.ops import vit_attention_plugin


# -- graph face pieces ---------------------------------------------------------------------------------
class GraphOps:
    """Graph-face building blocks over `g` and the weight source `w`; `w.quant` (set by visual.plan): the
    tower's quantized linears by name (FP8, NVFP4, MXFP8 as the language model's, quant/linear.py)."""

    def __init__(self, g: GraphBuilder, w):
        self.g, self.w, self.n = g, w, g.node
        self.quant = getattr(w, "quant", None) or {}

    def fp32(self, y):
        return self.n("Cast", [y], {"to": FLOAT})

    def fp16(self, y):
        return self.n("Cast", [y], {"to": FLOAT16})

    def linear(self, y, name, out_f, in_f, bias: bool = True):
        lq = self.quant.get(name)
        if lq is not None:
            from .quant import linear as qlinear

            out = qlinear.emit(qlinear.LinearContext(self.g, self.w, name, out_f, in_f, lq), y)
        else:
            out = self.n("MatMul", [y, self.w.linear_weight(name + ".weight", out_f, in_f)])
        return self.n("Add", [out, self.w.vector(name + ".bias", out_f)]) if bias else out

    def patch_embed(self, x, name, shape, bias: bool):
        """A Conv3d with stride = kernel over the processor's flattened patches is one MatMul."""
        conv = self.w.ref(name + ".weight", shape)
        out_f = shape[0]
        weight = self.g.weight(name + ".weight.T", FLOAT16, (int(np.prod(shape[1:])), out_f),
                               lambda: _to_fp16(conv).reshape(out_f, -1).t().contiguous(), tag=conv.where())
        y = self.n("MatMul", [x, weight])
        return self.n("Add", [y, self.w.vector(name + ".bias", out_f)]) if bias else y

    def rms(self, y, name, size, eps):
        n, y32 = self.n, self.fp32(y)
        ms = n("ReduceMean", [n("Mul", [y32, y32]), self.g.i64(-1)], {"keepdims": 1})
        inv = n("Reciprocal", [n("Sqrt", [n("Add", [ms, self.g.const(np.array(eps, np.float32))])])])
        return n("Mul", [self.fp16(n("Mul", [y32, inv])), self.w.vector(name + ".weight", size)])

    def layer_norm(self, y, name, size, eps):
        w, f = self.w, self.fp32
        scale, shift = f(w.vector(name + ".weight", size)), f(w.vector(name + ".bias", size))
        out = self.n("LayerNormalization", [f(y), scale, shift], {"axis": -1, "epsilon": eps})
        return self.fp16(out)

    def gelu(self, y, tanh: bool = False):
        n, c, y32 = self.n, self.g.const, self.fp32(y)
        if tanh:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            inner = n("Mul", [n("Add", [y32, n("Mul", [c(np.array(0.044715, np.float32)),
                                                      n("Mul", [y32, n("Mul", [y32, y32])])])]),
                              c(np.array(math.sqrt(2 / math.pi), np.float32))])
            core = n("Tanh", [inner])
        else:
            core = n("Erf", [n("Mul", [y32, c(np.array(1 / math.sqrt(2), np.float32))])])
        return self.fp16(n("Mul", [n("Mul", [y32, c(np.array(0.5, np.float32))]),
                                   n("Add", [core, c(np.array(1.0, np.float32))])]))

    def cos_sin(self, rot):
        """`[T, D/2]` angles -> (cos, sin) `[T, 1, D]` fp32."""
        emb = self.n("Unsqueeze", [self.n("Concat", [rot, rot], {"axis": -1}), self.g.i64(1)])
        return self.n("Cos", [emb]), self.n("Sin", [emb])

    def rope(self, t, cos, sin, d):
        """`[T, heads, D]` fp16 rotated (rotate-half) in fp32, rounded to fp16."""
        n, i64, t32 = self.n, self.g.i64, self.fp32(t)
        first = n("Slice", [t32, i64(0), i64(d // 2), i64(-1)])
        second = n("Slice", [t32, i64(d // 2), i64(d), i64(-1)])
        rotated = n("Concat", [n("Neg", [second]), first], {"axis": -1})
        return self.fp16(n("Add", [n("Mul", [t32, cos]), n("Mul", [rotated, sin])]))

    def attention(self, y, name, hidden, heads, cos, sin, cu, carrier):
        """Fused qkv -> RoPE on q and k -> ViTAttentionPlugin -> proj, on `[T, hidden]`."""
        n, i64, d = self.n, self.g.i64, hidden // heads
        qkv = n("Reshape", [self.linear(y, name + ".qkv", 3 * hidden, hidden), i64(0, 3, heads, d)])
        q, k, v = (n("Gather", [qkv, self.g.const(np.array(j, np.int64))], {"axis": 1}) for j in range(3))
        attn = vit_attention_plugin.emit(self.g, self.rope(q, cos, sin, d), self.rope(k, cos, sin, d), v, cu, carrier,
                                         num_heads=heads, head_size=d)
        return self.linear(n("Reshape", [attn, i64(0, hidden)]), name + ".proj", hidden, hidden)


def _to_fp16(ref):
    from .models.weights import to_fp16

    return to_fp16(ref)


# -- eager face pieces ---------------------------------------------------------------------------------
class EagerOps:
    """The same pieces in torch over the graph's initializers `t` (fp16 tensors by name)."""

    def __init__(self, t: dict, quant: dict | None = None):
        import torch

        self.torch, self.t = torch, t
        self.quant = quant if quant is not None else getattr(t, "quant", None) or {}
        self.op = vit_attention_plugin.register_torch_op()

    @staticmethod
    def r16(x):
        return x.half().float()

    def f(self, name):
        return self.t[name].float()

    def linear(self, y, name, bias: bool = True):
        lq = self.quant.get(name)
        if lq is not None:
            from .quant import linear as qlinear

            out = self.r16(qlinear.eager(y, self.t, name, lq))
        else:
            out = self.r16(y @ self.f(name + ".weight.T"))
        return self.r16(out + self.f(name + ".bias")) if bias else out

    def patch_embed(self, x, name, bias: bool):
        y = self.r16(x @ self.f(name + ".weight.T"))
        return self.r16(y + self.f(name + ".bias")) if bias else y

    def rms(self, y, name, eps):
        torch = self.torch
        return self.r16(self.r16(y * torch.rsqrt((y * y).mean(-1, keepdim=True) + eps)) * self.f(name + ".weight"))

    def layer_norm(self, y, name, eps):
        nf = self.torch.nn.functional
        return self.r16(nf.layer_norm(y, y.shape[-1:], self.f(name + ".weight"), self.f(name + ".bias"), eps))

    def gelu(self, y, tanh: bool = False):
        return self.r16(self.torch.nn.functional.gelu(y, approximate="tanh" if tanh else "none"))

    def cos_sin(self, rot):
        emb = self.torch.cat([rot, rot], dim=-1)[:, None]
        return emb.cos(), emb.sin()

    @staticmethod
    def rope(z, cos, sin, d):
        import torch

        rotated = torch.cat([-z[..., d // 2:], z[..., : d // 2]], dim=-1)
        return (z * cos + rotated * sin).half()

    def attention(self, y, name, hidden, heads, cos, sin, cu, carrier):
        d = hidden // heads
        qkv = self.linear(y, name + ".qkv").reshape(-1, 3, heads, d)
        attn = self.op(self.rope(qkv[:, 0], cos, sin, d), self.rope(qkv[:, 1], cos, sin, d), qkv[:, 2].half(), cu,
                       carrier, heads, d).float()
        return self.linear(attn.reshape(-1, hidden), name + ".proj")
