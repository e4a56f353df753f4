"""update_ssm_state (Mamba2 SSM update): the eager op follows the Mamba2 recurrence and transformers'
Nemotron-H torch path (with the runtime's dt rules), respects ragged batches, and the ONNX lowering
agrees with it in onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.ops import CUSTOM_OPS
from edgellm_core.ops import update_ssm_state as ssm
from edgellm_validate.lowering import lower_custom_ops

HM, DM, N, G = 4, 64, 64, 2  # kernel-legal head dim / state size; 2 heads per group


def make_inputs(batch, seq, seed, state_scale=1.0):
    """fp16/fp32 inputs shaped as the node's; head 2's bias gives dt < 1e-3, head 3's gives dt > 20."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(batch, seq, HM, DM).half()
    a = -torch.exp(rnd(HM) * 0.5)  # fp32, = -exp(A_log)
    b = (rnd(batch, seq, G, N) * 0.5).half()
    c = (rnd(batch, seq, G, N) * 0.5).half()
    d = rnd(HM).half()
    dt = (rnd(batch, seq, HM) * 0.5).half()
    dt_bias = torch.tensor([0.5, -1.0, -9.0, 21.0]).half()
    state = (rnd(batch, HM, DM, N) * state_scale).half()
    return [x, a, b, c, d, dt, dt_bias, state]


def eager(inputs, ctx, dt_softplus=1):
    op = ssm.register_torch_op()
    return op(*inputs, torch.tensor(ctx, dtype=torch.int32), dt_softplus, G, 0)


def recurrence64(x, a, b, c, d, dt, dt_bias, state):
    """The Mamba2 recurrence for one sequence in float64: x [T,Hm,Dm], b/c [T,G,N], dt [T,Hm], state [Hm,Dm,N]."""
    f = lambda t: t.double().numpy()
    x, a, b, c, d, dt, dt_bias, h = map(f, (x, a, b, c, d, dt, dt_bias, state))
    grp = np.arange(HM) // (HM // G)
    ys = []
    for t in range(x.shape[0]):
        delta = np.logaddexp(0.0, dt[t] + dt_bias)  # softplus, no clamp
        h = np.exp(a * delta)[:, None, None] * h + (delta[:, None] * b[t, grp])[:, None, :] * x[t][:, :, None]
        ys.append(np.einsum("hdn,hn->hd", h, c[t, grp]) + d[:, None] * x[t])
    return np.stack(ys), h


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def head_err(got, want, axis):
    """rel_err per head (heads along `axis`), the worst one: head 3's large dt must not hide the others."""
    got, want = np.moveaxis(np.asarray(got, np.float64), axis, 0), np.moveaxis(np.asarray(want, np.float64), axis, 0)
    return max(rel_err(g, w) for g, w in zip(got, want))


def cosine(got, want):
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    return got @ want / np.linalg.norm(got) / np.linalg.norm(want)


# -- (a) eager vs the Mamba2 recurrence and transformers ----------------------------------------
@pytest.mark.parametrize("state_scale", [0.0, 1.0], ids=["zero_state", "carried_state"])
def test_prefill_matches_recurrence_and_transformers_chunk_scan(state_scale):
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    inputs = make_inputs(2, 7, seed=1, state_scale=state_scale)
    before = [t.clone() for t in inputs]
    out, state_out = eager(inputs, [7, 7])
    assert all(torch.equal(t, u) for t, u in zip(inputs, before)), "the op modified an input"
    assert out.dtype == torch.float16 and state_out.dtype == torch.float16

    for i in range(2):
        want_y, want_h = recurrence64(*(t[i] if t.dim() > 1 and t.shape[0] == 2 else t for t in inputs))
        assert head_err(out[i].float(), want_y, -2) < 2e-3
        assert head_err(state_out[i].float(), want_h, -3) < 2e-3
        assert cosine(out[i].float(), want_y) > 0.99999

    # transformers' torch chunk scan (the Nemotron-H prefill path), fed the same fp16 values in fp32.
    # Nemotron-H passes dt_limit=(time_step_min, inf) there (1e-3 by default) but the plugin has no
    # clamp: our exporter emits no time_step_limit, i.e. (0, inf), so compare with that.
    x, a, b, c, d, dt, dt_bias, state = inputs
    kw = dict(chunk_size=4, D=d.float(), dt_bias=dt_bias.float(), initial_states=state.float(),
              dt_softplus=True, return_final_states=True)
    hf_y, hf_h = mamba2_chunk_scan(x.float(), dt.float(), a, b.float(), c.float(), dt_limit=(0.0, math.inf), **kw)
    assert head_err(out.float(), hf_y, -2) < 2e-3
    assert head_err(state_out.float(), hf_h, -3) < 2e-3
    if state_scale == 0:  # with HF's default clamp, head 2 (softplus(dt) ~ 1.2e-4) differs: the test can tell
        _, clamped_h = mamba2_chunk_scan(x.float(), dt.float(), a, b.float(), c.float(), dt_limit=(1e-3, math.inf),
                                         **kw)
        assert rel_err(state_out[:, 2].float(), clamped_h[:, 2]) > 0.5


def test_decode_matches_transformers_step_and_continues_prefill():
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_selective_state_update

    inputs = make_inputs(2, 9, seed=2)
    x, a, b, c, d, dt, dt_bias, state = inputs
    long_out, long_state = eager(inputs, [9, 9])

    # 6-token prefill, then 3 decode steps (context_lengths = total length, as in decode).
    out6, carried = eager([x[:, :6], a, b[:, :6], c[:, :6], d, dt[:, :6], dt_bias, state], [6, 6])
    hf_state = carried.float().clone()  # transformers updates this in place
    step_outs = []
    for t in range(6, 9):
        xt, bt, ct, dtt = (u[:, t : t + 1] for u in (x, b, c, dt))
        y, carried_next = eager([xt, a, bt, ct, d, dtt, dt_bias, carried], [t + 1, t + 1])
        hf_y = mamba2_selective_state_update(
            hf_state, xt[:, 0].float(), dtt[:, 0].float()[..., None].expand(-1, -1, DM),
            a[:, None, None].expand(-1, DM, N), bt[:, 0].float(), ct[:, 0].float(), d.float()[:, None].expand(-1, DM),
            dt_bias=dt_bias.float()[:, None].expand(-1, DM), dt_softplus=True)
        assert head_err(y[:, 0].float(), hf_y, -2) < 2e-3
        # same starting point for the next step, so only one step's rounding is compared
        hf_state = carried_next.float().clone()
        carried = carried_next
        step_outs.append(y)

    # Decode after prefill = one long prefill, up to the fp16 rounding of the state between calls.
    chained = torch.cat([out6, *step_outs], dim=1)
    assert head_err(chained.float(), long_out.float(), -2) < 2e-3
    assert head_err(carried.float(), long_state.float(), -3) < 2e-3
    assert cosine(chained.float(), long_out.float()) > 0.99999
    for i in range(2):
        want_y, want_h = recurrence64(x[i], a, b[i], c[i], d, dt[i], dt_bias, state[i])
        assert head_err(chained[i].float(), want_y, -2) < 2e-3
        assert head_err(carried[i].float(), want_h, -3) < 2e-3


def test_state_stays_fp32_within_a_call_and_is_rounded_to_fp16_once():
    """State 1024 (fp16 spacing 1 there), no decay, +0.25 per token: four tokens in one call reach 1025;
    four decode calls, each storing fp16, stay at 1024 (the prefill kernel keeps the state in fp32 registers)."""
    x = torch.ones(1, 4, HM, DM, dtype=torch.float16)
    a = torch.full((HM,), -1e-9)  # exp(A * dt) == 1 in fp32
    b = torch.ones(1, 4, G, N, dtype=torch.float16)
    c = torch.ones(1, 4, G, N, dtype=torch.float16)
    d = torch.zeros(HM, dtype=torch.float16)
    dt = torch.full((1, 4, HM), 0.25, dtype=torch.float16)  # used raw: dt_softplus = 0
    dt_bias = torch.zeros(HM, dtype=torch.float16)
    state = torch.full((1, HM, DM, N), 1024.0, dtype=torch.float16)
    _, one_call = eager([x, a, b, c, d, dt, dt_bias, state], [4], dt_softplus=0)
    assert (one_call == 1025).all()
    carried = state
    for t in range(4):
        _, carried = eager([x[:, :1], a, b[:, :1], c[:, :1], d, dt[:, :1], dt_bias, carried], [t + 1], dt_softplus=0)
    assert (carried == 1024).all()


# -- (b) ragged batch -----------------------------------------------------------------------------
def test_ragged_prefill_padding_leaves_state_alone():
    inputs = make_inputs(3, 6, seed=3)
    ctx = [6, 2, 0]
    # Garbage in the padding: must change nothing but (don't-care, finite) padded outputs.
    noisy = [t.clone() for t in inputs]
    for i, n in enumerate(ctx):
        for k in (0, 2, 3, 5):  # x, B, C, dt
            noisy[k][i, n:] = 300.0
    out, state_out = eager(noisy, ctx)
    assert torch.isfinite(out.float()).all()
    for i, n in enumerate(ctx):
        assert torch.count_nonzero(out[i, n:]) == 0  # the kernel writes 0 at padded positions
        alone = [t[i : i + 1, :n] if k in (0, 2, 3, 5) else t[i : i + 1] if k == 7 else t
                 for k, t in enumerate(inputs)]
        if n == 0:
            assert torch.equal(state_out[i], inputs[7][i])
            continue
        want_out, want_state = eager(alone, [n])
        assert torch.equal(state_out[i], want_state[0])
        assert rel_err(out[i, :n].float(), want_out[0].float()) < 1e-3


def test_decode_ignores_context_lengths():
    """S == 1: every sequence's token runs, whatever context_lengths says (it holds the total length)."""
    inputs = make_inputs(2, 1, seed=4)
    out_a, state_a = eager(inputs, [0, 37])
    out_b, state_b = eager(inputs, [1, 1])
    assert torch.equal(state_a, state_b) and torch.equal(out_a, out_b)
    assert not torch.equal(state_a, inputs[7])
    assert torch.count_nonzero(out_a[0]) > 0


# -- (c) ONNX lowering in onnxruntime vs eager ----------------------------------------------------
def build_graph():
    g = GraphBuilder("t")
    half = TensorProto.FLOAT16
    ins = [g.input("x", half, ["B", "S", HM, DM]), g.input("A", TensorProto.FLOAT, [HM]),
           g.input("Bm", half, ["B", "S", G, N]), g.input("Cm", half, ["B", "S", G, N]), g.input("D", half, [HM]),
           g.input("dt", half, ["B", "S", HM]), g.input("dt_bias", half, [HM]),
           g.input("state", half, ["B", HM, DM, N]), g.input("ctx", TensorProto.INT32, ["B"])]
    return g, ins


def finish(g, out, state_out):
    g.output(out, "out", TensorProto.FLOAT16, ["B", "S", HM, DM])
    g.output(state_out, "state_out", TensorProto.FLOAT16, ["B", HM, DM, N])
    return g.to_model("unused.data", {"": 24, "trt_edgellm": 1}, 10)


def lowered_session(monkeypatch, dt_softplus):
    """The emitted node, lowered to its ONNX function (registered here until the package lists the op)."""
    monkeypatch.setitem(CUSTOM_OPS, (ssm.DOMAIN, ssm.OP_TYPE), ssm)
    g, ins = build_graph()
    model = lower_custom_ops(finish(g, *ssm.emit(g, ins, ngroups=G, dt_softplus=dt_softplus)))
    assert len(model.functions) == 1
    assert all(n.domain != ssm.DOMAIN for n in model.graph.node)
    return ort.InferenceSession(model.SerializeToString()), [i.name for i in model.graph.input]


@pytest.mark.parametrize("dt_softplus", [1, 0])
def test_lowering_matches_eager_ragged_prefill_then_decode(monkeypatch, dt_softplus):
    sess, names = lowered_session(monkeypatch, dt_softplus)

    inputs = make_inputs(2, 7, seed=5)
    if not dt_softplus:  # raw dt is used as the step: keep it positive and small
        inputs[5], inputs[6] = inputs[5].abs() * 0.1, inputs[6].abs() * 0.1
    onnx_state = eager_state = inputs[7]
    phases = [(0, 7, [7, 4]), (7, 8, [8, 5]), (8, 9, [9, 6])]  # ragged prefill, then two decode steps
    more = make_inputs(2, 2, seed=6)
    errs = []
    for lo, hi, ctx in phases:
        if lo == 0:
            step = inputs[:7]
        else:
            step = [more[k][:, lo - 7 : hi - 7] if k in (0, 2, 3, 5) else inputs[k] for k in range(7)]
        feeds = {nm: t.numpy() for nm, t in zip(names, [*step, onnx_state, torch.tensor(ctx, dtype=torch.int32)])}
        o_out, o_state = sess.run(None, feeds)
        e_out, e_state = eager([*step, eager_state], ctx, dt_softplus)
        assert np.isfinite(o_out.astype(np.float32)).all()
        if lo == 0:
            assert not o_out[1, 4:].any()  # padded outputs are zero in both
        errs.append((head_err(o_out, e_out.float(), -2), head_err(o_state, e_state.float(), -3)))
        onnx_state, eager_state = torch.from_numpy(o_state), e_state
    assert max(e for pair in errs for e in pair) < 2e-3, errs


# -- (d) schema and node -------------------------------------------------------------------------
def test_schema_registered_and_checker_full_check_passes():
    ssm.register_schema()
    schema = onnx.defs.get_schema(ssm.OP_TYPE, 1, ssm.DOMAIN)
    assert [i.name for i in schema.inputs] == list(ssm.INPUTS)
    g, ins = build_graph()
    model = finish(g, *ssm.emit(g, ins, ngroups=G, num_heads=HM, head_dim=DM, state_size=N))
    onnx.checker.check_model(model, full_check=True)
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == ("trt_edgellm", "update_ssm_state")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"dt_softplus": 1, "ngroups": G, "chunk_size": 0}

    # A must be fp32: an fp16 A fails the type check.
    g2, ins2 = build_graph()
    g2.inputs[1] = onnx.helper.make_tensor_value_info("A", TensorProto.FLOAT16, [HM])
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(finish(g2, *ssm.emit(g2, ins2, ngroups=G)), full_check=True)


def test_emit_refuses_shapes_the_kernel_lacks():
    assert ssm.check_shape(HM, DM, N, G) is None
    g, ins = build_graph()
    with pytest.raises(ValueError, match="head dim 32"):
        ssm.emit(g, ins, ngroups=G, num_heads=HM, head_dim=32, state_size=N)
    with pytest.raises(ValueError, match="state size 16"):
        ssm.emit(g, ins, ngroups=G, num_heads=HM, head_dim=DM, state_size=16)
    with pytest.raises(ValueError, match="groups"):
        ssm.emit(g, ins, ngroups=3, num_heads=HM, head_dim=DM, state_size=N)


def test_lowering_keeps_the_state_fp32_within_a_call(monkeypatch):
    """The precision rule of test_state_stays_fp32_within_a_call_and_is_rounded_to_fp16_once, in onnxruntime."""
    sess, names = lowered_session(monkeypatch, 0)
    feeds = [np.ones((1, 4, HM, DM), np.float16), np.full(HM, -1e-9, np.float32), np.ones((1, 4, G, N), np.float16),
             np.full((1, 4, G, N), 1 / N, np.float16), np.zeros(HM, np.float16), np.full((1, 4, HM), 0.25, np.float16),
             np.zeros(HM, np.float16), np.full((1, HM, DM, N), 1024.0, np.float16), np.array([4], np.int32)]
    out, state_out = sess.run(None, dict(zip(names, feeds)))
    assert (state_out == 1025).all()
    assert (out[0, 3] == 1025).all()  # C . state with C = 1/N
