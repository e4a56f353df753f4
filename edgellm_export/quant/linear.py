"""Quantized linear layers: one module per format, one dispatch here.

Each format module provides
- `emit(ctx, x) -> y`: declares the layer's initializers (checked against the checkpoint's
  headers now, bytes produced at write time) and emits the contract's node pattern;
- `eager(x, t, prefix, lq) -> y`: the same numerics in torch over the produced initializers
  (`t` maps initializer names to tensors), for the golden bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import GraphBuilder

from . import fp8_linear, int4_linear, int8_sq_linear, mxfp8_linear, nvfp4_linear
from .plan import FP8, INT4_FORMATS, INT8_SQ, MXFP8, NVFP4, LinearQuant

MODULES = {FP8: fp8_linear, INT8_SQ: int8_sq_linear, MXFP8: mxfp8_linear, NVFP4: nvfp4_linear,
           **{f: int4_linear for f in INT4_FORMATS}}


@dataclass
class LinearContext:
    g: GraphBuilder
    ws: object  # models.weights.WeightSource
    name: str  # canonical module name, e.g. layers.0.self_attn.q_proj
    n: int  # out_features
    k: int  # in_features
    lq: LinearQuant


def module_for(lq: LinearQuant):
    mod = MODULES.get(lq.format)
    if mod is None:
        raise UnsupportedError(f"internal: no linear implementation for format {lq.format!r}")
    return mod


def emit(ctx: LinearContext, x: str) -> str:
    return module_for(ctx.lq).emit(ctx, x)


def eager(x, t: dict, prefix: str, lq: LinearQuant):
    return module_for(lq).eager(x, t, prefix, lq)


def transposed_matmul(g: GraphBuilder, x: str, w_nk: str) -> str:
    """x @ W^T for a dequantized `[N, K]` weight: Transpose(perm=[1,0]) -> MatMul (quant.md §3)."""
    return g.node("MatMul", [x, g.node("Transpose", [w_nk], {"perm": [1, 0]})])
