"""The recurrent mixers' causal conv (`trt_edgellm::causal_conv1d`), both faces, fed its history.

0.7.1's conv kernel takes its prefill path for any call with more than one token and then ignores the
incoming conv state, so a chunk that continues a cached prefix would convolve its first K - 1 tokens with
zeros instead of the previous chunk's inputs (on a tiny Qwen3.5: cosine 0.61 against HF on such a step).
So whenever a call continues a cache (`kvcache_start_index` has entries) with more than one token, the
graph prepends the last K - 1 inputs held in the conv state to x and drops the K - 1 extra outputs: the
kernel then sees the true history and captures the right state. A plain prefill (no start index; the
runtime need not have zeroed the buffer) and decode (one token: the kernel's decode path reads the
state) are left as they are. Used by GatedDeltaNet (Qwen3.5) and Mamba2 (Nemotron-H).
"""

from __future__ import annotations

import numpy as np

from edgellm_core.onnx_graph.builder import INT32
from edgellm_core.ops import causal_conv1d


def eager_attrs(conv_dim: int, kernel: int) -> tuple:
    """(stride, padding, dilation, groups, use_mtp) as the eager op takes them; `causal_conv1d.emit`
    writes the same values from conv_dim and the kernel width."""
    return (1, kernel - 1, 1, conv_dim, 0)


def emit(g, io, x: str, weight: str, bias: str, state: str, conv_dim: int, kernel: int) -> tuple[str, str]:
    """(conv output `[B, S, conv_dim]` before the activation, the state to carry) for input `x`."""
    n = g.node
    continues = n("And", [n("Greater", [n("Shape", [io.kvcache_start_index]), g.i64(0)]),
                          n("Greater", [n("Shape", [x], {"start": 1, "end": 2}), g.i64(1)])])
    m = n("Where", [continues, g.i64(kernel - 1), g.i64(0)])  # int64 [1]: K - 1 or 0
    history = n("Slice", [n("Transpose", [state], {"perm": [0, 2, 1]}), n("Sub", [g.i64(kernel), m]),
                          g.i64(kernel), g.i64(1)])  # [B, m, conv_dim]
    extended = n("Concat", [history, x], {"axis": 1})
    ctx = n("Add", [io.context_lengths, n("Cast", [m], {"to": INT32})])
    out, state_out = causal_conv1d.emit(g, [extended, weight, bias, state, ctx], conv_dim=conv_dim,
                                        kernel_size=kernel)
    return n("Slice", [out, m, g.i64(np.iinfo(np.int64).max), g.i64(1)]), state_out


def eager(x, weight, bias, state, context_lengths, start_index, conv_dim: int, kernel: int):
    """Eager face for one call: x fp16 `[B, S, conv_dim]`; returns (fp32 output, the new state)."""
    import torch

    op = causal_conv1d.register_torch_op()
    m = kernel - 1 if (start_index.numel() > 0 and x.shape[1] > 1) else 0
    history = state.transpose(1, 2)[:, kernel - m:, :]
    extended = torch.cat([history, x.half()], dim=1)
    out, state = op(extended, weight, bias, state, context_lengths + m, *eager_attrs(conv_dim, kernel))
    return out[:, m:].float(), state
