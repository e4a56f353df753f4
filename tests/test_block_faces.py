"""Each block's two faces (graph emission and eager torch) are held against each other.

For attention, every attribute the emitted AttentionPlugin node carries must reach the eager op with the
same value: the test emits the block, runs its eager face against a recording stand-in for the op, and
compares attribute by attribute, naming the op's arguments from the registered torch schema (not from the
block). The configs cover what has drifted before: a sliding window (Mistral), q/k norms (Qwen3), an FP8
KV cache with its scales. The numerics of the two faces are held together end to end elsewhere (golden vs
the CPU twin for every family and format, tests/test_quant_export.py, tests/test_parity_hf.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from onnx import helper

from edgellm_core.onnx_graph.builder import FLOAT16, GraphBuilder
from edgellm_export.config import build_model_config
from edgellm_export.contract import v0_7
from edgellm_export.models.blocks import attention
from edgellm_export.quant.plan import QuantDecisions

BASE = dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
            rms_norm_eps=1e-5)
CASES = {
    "mistral sliding window": (dict(sliding_window=32), None),
    "qwen3 q/k norm": (dict(model_type="qwen3", head_dim=32), None),
    "fp8 kv cache": (dict(), (0.5, 0.25)),
}


class _Weights:
    """The two WeightSource methods blocks call, declaring weights by name (no checkpoint needed)."""

    def __init__(self, g):
        self.g = g

    def linear_weight(self, name, out_f, in_f):
        return self.g.weight(f"{name}.T", FLOAT16, (in_f, out_f), lambda: None)

    def vector(self, name, size):
        return self.g.weight(name, FLOAT16, (size,), lambda: None)


class _Emitter:
    def __init__(self, g, cfg):
        self.g, self.w, self.cfg, self.quant = g, _Weights(g), cfg, QuantDecisions()


def _schema_argument_names() -> list[str]:
    from edgellm_core.ops.attention_plugin import register_torch_op

    op = register_torch_op()
    return [a.name for a in op.default._schema.arguments]


@pytest.mark.parametrize("case", list(CASES))
def test_attention_plugin_attributes_reach_both_faces(case):
    overrides, kv_scales = CASES[case]
    cfg = build_model_config({**BASE, **overrides}, lambda suffix: "norm" in suffix, Path("config.json"))
    g = GraphBuilder("t")
    io = v0_7.declare_io(g, cfg, kv_fp8=kv_scales is not None)
    attention.emit(_Emitter(g, cfg), io, v0_7, 0, io.inputs_embeds, kv_scales)
    node = next(nd for nd in g.nodes if nd.op_type == "AttentionPlugin")
    graph_attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    calls = []

    def recording_op(*args):
        calls.append(args)
        q, past = args[0], args[3]
        return torch.zeros(q.shape[0], q.shape[1], cfg.num_attention_heads, cfg.head_dim), past

    b, s, h, d = 1, 3, cfg.hidden_size, cfg.head_dim
    rng = torch.Generator().manual_seed(0)

    def w(o, i):
        return (torch.randn(i, o, generator=rng) * 0.05).half()

    t = {"self_attn.q_proj.weight.T": w(cfg.q_dim, h), "self_attn.k_proj.weight.T": w(cfg.kv_dim, h),
         "self_attn.v_proj.weight.T": w(cfg.kv_dim, h), "self_attn.o_proj.weight.T": w(h, cfg.q_dim),
         "self_attn.q_norm.weight": torch.ones(d).half(), "self_attn.k_norm.weight": torch.ones(d).half()}
    cache = torch.zeros(b, 2, cfg.num_key_value_heads, 16, d).half()
    attention.eager(torch.randn(b, s, h, generator=rng), [s], t, {}, cfg, kv_scales, [cache],
                    torch.zeros(1, 16, cfg.rotary_dim), [(0, torch.tensor([s]), torch.zeros(0, dtype=torch.int32))],
                    recording_op)
    assert len(calls) == 1
    eager_attrs = dict(zip(_schema_argument_names(), calls[0]))
    assert set(graph_attrs) <= set(eager_attrs), f"attributes the eager op never receives: {graph_attrs}"
    for name, value in graph_attrs.items():
        got = eager_attrs[name]
        if isinstance(value, list):
            assert [float(x) for x in got] == pytest.approx([float(x) for x in value]), name
        else:
            assert got == value, f"{name}: graph {value}, eager {got}"
    if case == "mistral sliding window":
        assert graph_attrs["sliding_window_size"] == 32  # the drift this test exists for
    if kv_scales:
        assert graph_attrs["enable_fp8_kv_cache"] == 1 and graph_attrs["qkv_scales"] == pytest.approx([1.0, *kv_scales])
