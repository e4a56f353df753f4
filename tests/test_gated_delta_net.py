"""gated_delta_net: the eager op matches transformers' Qwen3.5 gated delta rule, honours context_lengths,
and the ONNX lowering run by onnxruntime matches the eager op."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.ops import CUSTOM_OPS
from edgellm_core.ops import gated_delta_net as gdn
from edgellm_validate.lowering import lower_custom_ops

HK, HV, D = 2, 4, 128  # the plugin's only head dims; GQA-like grouping 2 value heads per key head
NAMES = list(gdn.INPUTS)


def make_inputs(bsz, seq, seed, h0_scale=0.5, ctx=None, dt_bias=None):
    """Random plugin inputs in their graph dtypes. A = exp(A_log) is kept below 0.2 (HF initialises it up to 16)
    so per-token decays stay near 0.6-1 and the incoming state still matters after a few tokens."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    a_log = torch.empty(HV).uniform_(0.01, 0.2, generator=g).log()
    bias = dt_bias if dt_bias is not None else 1.0 + 0.5 * r(HV)
    return [
        r(bsz, seq, HK, D).half(), r(bsz, seq, HK, D).half(), r(bsz, seq, HV, D).half(),
        r(bsz, seq, HV).half(), r(bsz, seq, HV).half(), a_log.float(), torch.as_tensor(bias).half(),
        (h0_scale * r(bsz, HV, D, D)).float(),
        torch.tensor(ctx if ctx is not None else [seq] * bsz, dtype=torch.int32),
    ]


def run_eager(x):
    return gdn.register_torch_op()(*x, D, D, 0)


def hf_reference(x, state, decode):
    """transformers 5.24 Qwen3.5 GatedDeltaNet: its forward's g/beta preprocessing, then the same rule
    functions it calls (chunked for prefill, recurrent for one-token decode). beta is taken in fp32, as the
    plugin computes it (the HF module would take sigmoid in the model dtype)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    q, k, v, a, b, a_log, dt_bias = x[:7]
    beta = b.float().sigmoid()
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    fn = m.torch_recurrent_gated_delta_rule if decode else m.torch_chunk_gated_delta_rule
    kw = {} if decode else {"chunk_size": 4}  # several chunks for a short prompt
    return fn(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True,
              **kw)


def cosine(x, y):
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("from_zero", [True, False])
def test_prefill_then_decode_match_transformers(from_zero):
    bsz, seq = 2, 9
    x = make_inputs(bsz, seq, seed=1)
    if from_zero:
        x[7] = torch.zeros_like(x[7])
    o, state = run_eager(x)
    ref_o, ref_state = hf_reference(x, None if from_zero else x[7], decode=False)
    assert o.dtype == torch.float16 and state.dtype == torch.float32
    assert cosine(o.float(), ref_o.float()) >= 0.9999
    assert (o.float() - ref_o.float()).abs().max() < 5e-3
    assert (state - ref_state).abs().max() < 1e-4
    for step in range(3):  # decode: S == 1, context_lengths = total length so far
        d = make_inputs(bsz, 1, seed=10 + step, ctx=[seq + step + 1] * bsz)
        d[5], d[6], d[7] = x[5], x[6], state  # same layer weights, carried state
        o, state = run_eager(d)
        ref_o, ref_state = hf_reference(d, ref_state, decode=True)
        assert cosine(o.float(), ref_o.float()) >= 0.9999
        assert (o.float() - ref_o.float()).abs().max() < 5e-3
        assert (state - ref_state).abs().max() < 1e-4


def test_head_grouping_is_repeat_interleave():
    """Value head h reads key head h // (Hv / Hk): spelling the grouping out as Hk = Hv inputs gives the same
    numbers with repeat_interleave and different ones with tile."""
    x = make_inputs(1, 4, seed=2)
    o, _ = run_eager(x)
    interleaved, tiled = list(x), list(x)
    for i in (0, 1):
        interleaved[i] = x[i].repeat_interleave(HV // HK, dim=2)
        tiled[i] = x[i].repeat(1, 1, HV // HK, 1)
    assert torch.equal(o, run_eager(interleaved)[0])
    assert cosine(o.float(), run_eager(tiled)[0].float()) < 0.9


def test_padding_does_not_touch_state_and_outputs_zero():
    ctx = [6, 2, 4, 0]
    x = make_inputs(4, 6, seed=3, ctx=ctx)
    o, state = run_eager(x)
    noisy = [t.clone() for t in x]
    for i in range(5):  # garbage (large, finite) in every padded slot
        for bi, n in enumerate(ctx):
            noisy[i][bi, n:] = 1000.0
    o2, state2 = run_eager(noisy)
    assert torch.equal(state, state2)
    assert torch.equal(state[3], x[7][3])  # nothing valid: state passes through
    for bi, n in enumerate(ctx):
        assert torch.equal(o[bi, :n], o2[bi, :n])
        assert torch.all(o[bi, n:] == 0) and torch.all(o2[bi, n:] == 0)
        if n:  # the same sequence alone, unpadded, agrees exactly
            alone = [t[bi : bi + 1, :n] if t.dim() >= 3 and i < 5 else t for i, t in enumerate(x)]
            alone[7], alone[8] = x[7][bi : bi + 1], torch.tensor([n], dtype=torch.int32)
            o_alone, s_alone = run_eager(alone)
            assert (s_alone[0] - state[bi]).abs().max() < 1e-6
            assert (o_alone[0].float() - o[bi, :n].float()).abs().max() < 2e-3  # fp16 rounding at most
            ref_o, ref_s = hf_reference(alone, x[7][bi : bi + 1], decode=False)
            assert (ref_s[0] - state[bi]).abs().max() < 1e-4


def test_eager_leaves_inputs_alone_and_refuses_mtp():
    x = make_inputs(2, 3, seed=4, ctx=[3, 1])
    before = [t.clone() for t in x]
    run_eager(x)
    assert all(torch.equal(t, u) for t, u in zip(x, before))
    with pytest.raises(NotImplementedError):
        gdn.register_torch_op()(*x, D, D, 1)


# -- ONNX faces ----------------------------------------------------------------------------
def build_graph(dt=(TensorProto.FLOAT16, TensorProto.FLOAT)):
    gdn.register_schema()
    g = GraphBuilder("gdn")
    h, f = dt
    ins = [g.input("q", h, ["B", "S", HK, D]), g.input("k", h, ["B", "S", HK, D]),
           g.input("v", h, ["B", "S", HV, D]), g.input("a", h, ["B", "S", HV]), g.input("b", h, ["B", "S", HV]),
           g.input("A_log", f, [HV]), g.input("dt_bias", h, [HV]), g.input("h0_source", f, ["B", HV, D, D]),
           g.input("context_lengths", TensorProto.INT32, ["B"])]
    o, h0 = gdn.emit(g, ins, k_dim=D, v_dim=D)
    g.output(o, "o", h, ["B", "S", HV, D])
    g.output(h0, "h0_out", f, ["B", HV, D, D])
    return g.to_model("unused.data", {"": 24, "trt_edgellm": 1}, 10)


@pytest.fixture(scope="module")
def session():
    saved = dict(CUSTOM_OPS)
    CUSTOM_OPS[(gdn.DOMAIN, gdn.OP_TYPE)] = gdn  # the package registers it; this test does not rely on that
    try:
        model = lower_custom_ops(build_graph())
    finally:
        CUSTOM_OPS.clear()
        CUSTOM_OPS.update(saved)
    assert len(model.functions) == 1
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_lowering_matches_eager_ragged_prefill_then_decode(session):
    # One head's a + dt_bias above 20 exercises the linear branch of softplus.
    x = make_inputs(3, 7, seed=5, ctx=[7, 3, 5], dt_bias=[1.0, 0.3, 22.0, 1.5])
    worst_o = worst_s = 0.0
    phases = [x]
    for step, ctx in enumerate([[8, 4, 6], [9, 5, 0]]):  # decode; a 0 length makes that row a no-op
        d = make_inputs(3, 1, seed=20 + step, ctx=ctx)
        d[5], d[6] = x[5], x[6]
        phases.append(d)
    state_onnx = state_eager = x[7]
    for p in phases:
        before = state_onnx
        feeds = {n: t.numpy() for n, t in zip(NAMES, p)}
        feeds["h0_source"] = state_onnx.numpy()
        o_onnx, s_onnx = session.run(None, feeds)
        o_eager, s_eager = run_eager(p[:7] + [state_eager, p[8]])
        assert o_onnx.dtype == np.float16 and s_onnx.dtype == np.float32
        assert np.isfinite(o_onnx).all()
        worst_o = max(worst_o, float(np.abs(o_onnx.astype(np.float32) - o_eager.float().numpy()).max()))
        worst_s = max(worst_s, float(np.abs(s_onnx - s_eager.numpy()).max()))
        state_onnx, state_eager = torch.from_numpy(s_onnx), s_eager
    assert worst_o < 2e-3
    assert worst_s < 1e-5
    assert np.array_equal(s_onnx[2], before[2].numpy())  # context length 0 in the last phase: untouched


def test_lowered_padding_rows_are_zero_and_state_ignores_them(session):
    x = make_inputs(2, 5, seed=6, ctx=[5, 2])
    feeds = {n: t.numpy() for n, t in zip(NAMES, x)}
    o1, s1 = session.run(None, feeds)
    for name in ("q", "k", "v", "a", "b"):
        feeds[name] = feeds[name].copy()
        feeds[name][1, 2:] = 1000.0
    o2, s2 = session.run(None, feeds)
    assert np.array_equal(s1, s2) and np.array_equal(o1[:, :2], o2[:, :2])
    assert not o2[1, 2:].any()


def test_schema_checker_and_refusals():
    model = build_graph()
    onnx.checker.check_model(model, full_check=True)
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == ("trt_edgellm", "gated_delta_net")
    assert list(node.input) == NAMES and len(node.output) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k_dim": D, "v_dim": D, "use_mtp": 0}
    schema = onnx.defs.get_schema("gated_delta_net", 1, "trt_edgellm")
    assert [i.name for i in schema.inputs] == NAMES
    # A wrong dtype for the fp32 state must be caught by the checker.
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(build_graph((TensorProto.FLOAT16, TensorProto.FLOAT16)), full_check=True)
    g = GraphBuilder("x")
    with pytest.raises(NotImplementedError):
        gdn.emit(g, NAMES, k_dim=D, v_dim=D, use_mtp=1)
    with pytest.raises(ValueError):
        gdn.emit(g, NAMES, k_dim=64, v_dim=64)
    mtp = onnx.helper.make_node("gated_delta_net", NAMES, ["o", "h"], domain="trt_edgellm", k_dim=D, v_dim=D,
                                use_mtp=1)
    with pytest.raises(NotImplementedError):
        gdn.lowering(mtp)
