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


# ---------------------------------------------------------------- recurrent mixers (Qwen3.5, Nemotron-H)
QWEN3_5 = dict(model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, head_dim=256, vocab_size=64,
               layer_types=["linear_attention"], linear_num_key_heads=1, linear_num_value_heads=2,
               linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)
NEMOTRON = dict(model_type="nemotron_h", hidden_size=64, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64, vocab_size=64, hybrid_override_pattern="M", mamba_num_heads=2,
                mamba_head_dim=64, ssm_state_size=64, n_groups=1, conv_kernel=4)


class _StateWeights(_Weights):
    """The WeightSource methods the recurrent blocks call besides linear_weight / vector."""

    def tensor(self, name, shape):
        return self.g.weight(name, FLOAT16, shape, lambda: None)

    def vector_f32(self, name, size, transform=None, as_name=None):
        return self.g.weight(as_name or name, 1, (size,), lambda: None)


def _recording(op_module, calls, outputs):
    """A stand-in for an op's registered torch op that records its arguments, named from the real schema."""
    names = [a.name for a in op_module.register_torch_op().default._schema.arguments]

    def op(*args):
        calls.append(dict(zip(names, args)))
        return outputs(*args)

    return op


def _graph_attrs(g, op_type):
    node = next(nd for nd in g.nodes if nd.op_type == op_type)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("family", ["qwen3_5 gated delta net", "nemotron_h mamba2"])
def test_recurrent_op_attributes_reach_both_faces(family, monkeypatch):
    """Every attribute the graph's causal_conv1d / gated_delta_net / update_ssm_state nodes carry reaches the
    eager op with the same value (the block decides them once: conv.eager_attrs, gdn_attrs, ssm_attrs)."""
    from edgellm_core.ops import causal_conv1d, gated_delta_net, update_ssm_state
    from edgellm_export.models.blocks import gdn, mamba

    raw = QWEN3_5 if family.startswith("qwen3_5") else NEMOTRON
    cfg = build_model_config(raw, lambda suffix: False, Path("config.json"))
    g = GraphBuilder("t")
    io = v0_7.declare_io(g, cfg)
    e = _Emitter(g, cfg)
    e.w = _StateWeights(g)
    block, scan_mod, scan_op = ((gdn, gated_delta_net, "gated_delta_net") if cfg.gdn is not None
                                else (mamba, update_ssm_state, "update_ssm_state"))
    block.emit(e, io, v0_7, 0, io.inputs_embeds)
    graph = {"causal_conv1d": _graph_attrs(g, "causal_conv1d"), scan_op: _graph_attrs(g, scan_op)}

    calls = {"causal_conv1d": [], scan_op: []}
    conv = _recording(causal_conv1d, calls["causal_conv1d"], lambda x, w, b, state, *rest: (x.clone(), state))
    scan = _recording(scan_mod, calls[scan_op], lambda *a: (torch.zeros_like(a[2] if scan_op == "gated_delta_net"
                                                                             else a[0]), a[7]))
    monkeypatch.setattr(causal_conv1d, "register_torch_op", lambda: conv)
    monkeypatch.setattr(scan_mod, "register_torch_op", lambda: scan)
    h, s = cfg.hidden_size, 3
    rng = torch.Generator().manual_seed(0)

    def w(i, o):
        return (torch.randn(i, o, generator=rng) * 0.05).half()

    if cfg.gdn is not None:
        d = cfg.gdn
        p = "linear_attn."
        t = {p + "in_proj_qkv.weight.T": w(h, d.conv_dim), p + "in_proj_z.weight.T": w(h, d.value_dim),
             p + "in_proj_b.weight.T": w(h, d.num_v_heads), p + "in_proj_a.weight.T": w(h, d.num_v_heads),
             "linear_attn.conv1d.weight": w(d.conv_dim, d.conv_kernel)[:, None, :],
             "linear_attn.A_log": torch.zeros(d.num_v_heads), "linear_attn.dt_bias": torch.ones(d.num_v_heads).half(),
             "linear_attn.norm.weight": torch.ones(d.v_head_dim).half(),
             "linear_attn.out_proj.weight.T": w(d.value_dim, h)}
    else:
        m = cfg.mamba
        t = {"mixer.in_proj.weight.T": w(h, m.inner + m.conv_dim + m.num_heads),
             "mixer.conv1d.weight": w(m.conv_dim, m.conv_kernel)[:, None, :],
             "mixer.conv1d.bias": torch.zeros(m.conv_dim).half(), "mixer.A": -torch.ones(m.num_heads),
             "mixer.D": torch.ones(m.num_heads).half(), "mixer.dt_bias": torch.ones(m.num_heads).half(),
             "mixer.norm.weight": torch.ones(m.inner).half(), "mixer.out_proj.weight.T": w(m.inner, h)}
    states = [block.initial_state(cfg, 1, v0_7.BINDINGS)]
    block.eager(torch.randn(1, s, h, generator=rng), [s], t, {}, cfg, states,
                [(0, torch.tensor([s], dtype=torch.int32), torch.zeros(0, dtype=torch.int32))])
    for op_type, attrs in graph.items():
        assert len(calls[op_type]) == 1, op_type
        got = calls[op_type][0]
        assert set(attrs) <= set(got), f"{op_type}: attributes the eager op never receives: {sorted(attrs)}"
        for name, value in attrs.items():
            assert got[name] == value, f"{op_type}.{name}: graph {value}, eager {got[name]}"
