"""The dense MLPs, both faces: SwiGLU, down(SiLU(gate(x)) * up(x)) with SiLU written as x * sigmoid(x);
and Nemotron-H's ReLU^2, down(relu(up(x))^2), no gate."""

from __future__ import annotations

from ...config import RELU2, SWIGLU
from . import linear


def projections(kind: str = SWIGLU) -> tuple[str, ...]:
    return ("up_proj", "down_proj") if kind == RELU2 else ("gate_proj", "up_proj", "down_proj")


def emit(e, layer: int, y: str, kind: str = SWIGLU) -> str:
    g, c = e.g, e.cfg
    p, h, inter = f"layers.{layer}.", c.hidden_size, c.intermediate_size
    if kind == RELU2:
        r = g.node("Relu", [linear.emit(e, y, p + "mlp.up_proj", inter, h, c.mlp_bias)])
        act = g.node("Mul", [r, r])
    else:
        gate = linear.emit(e, y, p + "mlp.gate_proj", inter, h, c.mlp_bias)
        up = linear.emit(e, y, p + "mlp.up_proj", inter, h, c.mlp_bias)
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
    return linear.emit(e, act, p + "mlp.down_proj", h, inter, c.mlp_bias)


def eager(y, t: dict, quant: dict, kind: str = SWIGLU):
    import torch

    r16 = linear.r16
    if kind == RELU2:
        r = torch.relu(linear.eager(y, t, "mlp.up_proj", quant))
        act = r16(r * r)
    else:
        gate = linear.eager(y, t, "mlp.gate_proj", quant)
        act = r16(r16(gate * r16(torch.sigmoid(gate))) * linear.eager(y, t, "mlp.up_proj", quant))
    return linear.eager(act, t, "mlp.down_proj", quant)
