"""The SwiGLU MLP, both faces: down(SiLU(gate(x)) * up(x)), SiLU written as x * sigmoid(x)."""

from __future__ import annotations

from . import linear


def emit(e, layer: int, y: str) -> str:
    g, c = e.g, e.cfg
    p, h, inter = f"layers.{layer}.", c.hidden_size, c.intermediate_size
    gate = linear.emit(e, y, p + "mlp.gate_proj", inter, h, c.mlp_bias)
    up = linear.emit(e, y, p + "mlp.up_proj", inter, h, c.mlp_bias)
    act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
    return linear.emit(e, act, p + "mlp.down_proj", h, inter, c.mlp_bias)


def eager(y, t: dict, quant: dict):
    import torch

    r16 = linear.r16
    gate = linear.eager(y, t, "mlp.gate_proj", quant)
    act = r16(r16(gate * r16(torch.sigmoid(gate))) * linear.eager(y, t, "mlp.up_proj", quant))
    return linear.eager(act, t, "mlp.down_proj", quant)
