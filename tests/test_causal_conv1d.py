"""causal_conv1d: the eager op matches a float64 conv and transformers, the ONNX lowering matches the eager op."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.ops import CUSTOM_OPS
from edgellm_core.ops import causal_conv1d as cc
from edgellm_validate.lowering import lower_custom_ops

D, K = 6, 4


def build_model(k=K, d=D, x_type=TensorProto.FLOAT16):
    g = GraphBuilder("t")
    ins = [g.input("x", x_type, ["B", "S", d]), g.input("w", TensorProto.FLOAT16, [d, 1, k]),
           g.input("bias", TensorProto.FLOAT16, [d]), g.input("state", TensorProto.FLOAT16, ["B", d, k]),
           g.input("ctx", TensorProto.INT32, ["B"])]
    out, state = cc.emit(g, ins, conv_dim=d, kernel_size=k)
    g.output(out, "out", TensorProto.FLOAT16, ["B", "S", d])
    g.output(state, "state_out", TensorProto.FLOAT16, ["B", d, k])
    return g.to_model("unused.data", {"": 24, "trt_edgellm": 1}, 10)


@pytest.fixture(scope="module")
def sessions():
    """k -> onnxruntime session of the lowered graph."""
    with pytest.MonkeyPatch.context() as mp:  # until the op is listed in CUSTOM_OPS
        mp.setitem(CUSTOM_OPS, (cc.DOMAIN, cc.OP_TYPE), cc)
        models = {k: lower_custom_ops(build_model(k)) for k in (K, 2)}
    return {k: ort.InferenceSession(m.SerializeToString()) for k, m in models.items()}


def run_both(sess, x, w, bias, state, ctx):
    """Eager op and lowered graph on the same inputs; asserts they agree bitwise and inputs stay unchanged."""
    feeds = [x, w, bias, state, np.asarray(ctx, np.int32)]
    onnx_out = sess.run(None, dict(zip(["x", "w", "bias", "state", "ctx"], feeds)))
    tensors = [torch.from_numpy(a.copy()) for a in feeds]
    op = cc.register_torch_op()
    t_out = [t.numpy() for t in op(*tensors, 1, w.shape[-1] - 1, 1, x.shape[-1], 0)]
    for t, a in zip(tensors, feeds):
        assert np.array_equal(t.numpy(), a)  # the op must not write its inputs
    for o, t in zip(onnx_out, t_out):
        assert o.dtype == t.dtype == np.float16 and o.shape == t.shape
        assert np.array_equal(o.view(np.uint16), t.view(np.uint16)), np.abs(o.astype(np.float32) - t).max()
    return t_out


def reference_conv(seq, w, bias):
    """Causal depthwise conv of one sequence [L, D] (float64, zero left context): np.convolve per channel."""
    seq = seq.astype(np.float64)
    w2 = w.reshape(seq.shape[1], -1).astype(np.float64)
    cols = [np.convolve(seq[:, c], w2[c, ::-1])[: len(seq)] for c in range(seq.shape[1])]
    return np.stack(cols, axis=1) + bias.astype(np.float64)


def within_one_ulp(got, want):
    """|got - want| <= one fp16 ulp at the reference's magnitude; returns the max abs error."""
    err = np.abs(got.astype(np.float64) - want)
    ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    assert (err <= ulp).all(), err.max()
    return err.max()


def weights(rng, k=K, bias_scale=1.0):
    w = (rng.standard_normal((D, 1, k)) * 0.5).astype(np.float16)
    b = (rng.standard_normal(D) * bias_scale).astype(np.float16)
    return w, b


@pytest.mark.parametrize("k, lens", [(K, [7, 2]), (K, [0, 7]), (2, [5, 1])])
def test_ragged_prefill_then_decode_matches_full_sequence_conv(sessions, k, lens):
    rng = np.random.default_rng(k + lens[0])
    w, bias = weights(rng, k)
    s = max(lens)
    x = rng.standard_normal((2, s, D)).astype(np.float16)
    x[0, lens[0]:] = 100.0  # padding tokens: must not leak into outputs or state
    state0 = np.zeros((2, D, k), np.float16)
    out, state = run_both(sessions[k], x, w, bias, state0, lens)
    seqs = [list(x[b, : lens[b]]) for b in range(2)]
    for b in range(2):
        n = lens[b]
        if n:
            within_one_ulp(out[b, :n], reference_conv(x[b, :n], w, bias))
        assert (out[b, n:] == 0).all()  # the kernel stores exact zeros past context_lengths
        want_state = np.zeros((k, D), np.float16)  # zero-left-padded tail of the valid tokens
        tail = x[b, max(0, n - k) : n]
        want_state[k - len(tail) :] = tail
        assert np.array_equal(state[b], want_state.T)

    worst = 0.0
    for _ in range(5):  # decode continues from the captured state
        xt = rng.standard_normal((2, 1, D)).astype(np.float16)
        total = [len(sq) + 1 for sq in seqs]
        out, state = run_both(sessions[k], xt, w, bias, state, total)
        for b in range(2):
            seqs[b].append(xt[b, 0])
            full = np.stack(seqs[b])
            worst = max(worst, within_one_ulp(out[b, 0], reference_conv(full, w, bias)[-1]))
            padded = np.concatenate([np.zeros((k, D), np.float16), full])
            assert np.array_equal(state[b], padded[-k:].T)
    assert worst > 0  # the check compares real numbers, not a trivially zero pair


def test_matches_transformers_qwen3_5_conv_and_update():
    """transformers' torch path of Qwen3.5 (conv with padding K-1 over the prompt, then per-token update)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    rng = np.random.default_rng(7)
    w, bias = weights(rng)
    lens = [7, 3]
    x = rng.standard_normal((2, 7, D)).astype(np.float16)
    op = cc.register_torch_op()
    t = torch.from_numpy
    out, state = op(t(x), t(w), t(bias), torch.zeros(2, D, K, dtype=torch.float16), t(np.array(lens, np.int32)),
                    1, K - 1, 1, D, 0)
    wf, bf = t(w).float().squeeze(1), t(bias).float()
    errs = []
    for b, n in enumerate(lens):
        prompt = t(x[b : b + 1, :n]).float().transpose(1, 2)  # [1, D, n]
        hf_out = hf.causal_conv1d_fn(prompt, wf, bf, activation=None)[0].T.numpy()
        errs.append(within_one_ulp(out[b, :n].numpy(), hf_out.astype(np.float64)))
        hf_state = torch.zeros(1, D, K)
        hf.causal_conv1d_update(prompt, hf_state, wf, bf)  # fills the state as a cache would
        assert torch.equal(state[b].float(), hf_state[0])
        silu_ours = torch.nn.functional.silu(out[b, :n].float())
        silu_hf = hf.causal_conv1d_fn(prompt, wf, bf, activation="silu")[0].T
        assert (silu_ours - silu_hf).abs().max() < 4e-3
        cur = state[b : b + 1]
        for _ in range(3):
            xt = t(rng.standard_normal((1, 1, D)).astype(np.float16))
            o, cur = op(xt, t(w), t(bias), cur, torch.tensor([n + 1], dtype=torch.int32), 1, K - 1, 1, D, 0)
            hf_o = hf.causal_conv1d_update(xt.float().transpose(1, 2), hf_state, wf, bf)[0, :, 0]
            errs.append(within_one_ulp(o[0, 0].numpy(), hf_o.double().numpy()))
            assert torch.equal(cur[0].float(), hf_state[0])
    assert 0 < max(errs) < 4e-3


def test_prefill_ignores_incoming_state(sessions):
    # 0.7.1 kernel behaviour: the S > 1 path never reads conv_state (a chunked prefill starts from zeros).
    rng = np.random.default_rng(3)
    w, bias = weights(rng)
    x = rng.standard_normal((2, 5, D)).astype(np.float16)
    lens = [5, 4]
    zero = run_both(sessions[K], x, w, bias, np.zeros((2, D, K), np.float16), lens)
    busy = run_both(sessions[K], x, w, bias, rng.standard_normal((2, D, K)).astype(np.float16) * 3, lens)
    for a, b in zip(zero, busy):
        assert np.array_equal(a, b)
    within_one_ulp(busy[0][0], reference_conv(x[0], w, bias))  # no left context from the state


def test_decode_ignores_context_lengths(sessions):
    rng = np.random.default_rng(4)
    w, bias = weights(rng)
    x = rng.standard_normal((2, 1, D)).astype(np.float16)
    state = rng.standard_normal((2, D, K)).astype(np.float16)
    a = run_both(sessions[K], x, w, bias, state, [9, 3])
    b = run_both(sessions[K], x, w, bias, state, [0, 1])
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    want = np.concatenate([state[:, :, 1:], x.transpose(0, 2, 1)], axis=2)
    assert np.array_equal(a[1], want)
    expect = (want.astype(np.float64) * w.reshape(1, D, K)).sum(-1) + bias
    within_one_ulp(a[0][:, 0], expect)


def test_eager_honours_padding_attribute_in_prefill():
    """The prefill kernel reads x[t + j - padding]; with padding = K the window lags one more token."""
    rng = np.random.default_rng(5)
    w, bias = weights(rng)
    x = rng.standard_normal((1, 6, D)).astype(np.float16)
    op = cc.register_torch_op()
    t = torch.from_numpy
    out, _ = op(t(x), t(w), t(bias), torch.zeros(1, D, K, dtype=torch.float16), torch.tensor([6], dtype=torch.int32),
                1, K, 1, D, 0)
    lagged = np.concatenate([np.zeros((1, D)), x[0, :-1].astype(np.float64)])
    within_one_ulp(out[0].numpy(), reference_conv(lagged, w, bias))


def test_schema_checks_node_and_rejects_wrong_type():
    cc.register_schema()
    schema = onnx.defs.get_schema(cc.OP_TYPE, 1, cc.DOMAIN)
    assert [i.name for i in schema.inputs] == list(cc.INPUTS)
    model = build_model()
    node = model.graph.node[0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == {
        "stride": 1, "padding": K - 1, "dilation": 1, "groups": D, "use_mtp": 0}
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(build_model(x_type=TensorProto.FLOAT), full_check=True)


def test_mtp_and_unsupported_attributes_refused():
    g = GraphBuilder("r")
    with pytest.raises(NotImplementedError):
        cc.emit(g, ["x", "w", "b", "s", "c"], conv_dim=D, kernel_size=K, use_mtp=1)
    with pytest.raises(ValueError):
        cc.emit(g, ["x", "w", "b", "s", "c"], conv_dim=D, kernel_size=9)
    node = onnx.helper.make_node(cc.OP_TYPE, list(cc.INPUTS), list(cc.OUTPUTS), domain=cc.DOMAIN,
                                 stride=1, padding=K - 1, dilation=1, groups=D, use_mtp=1)
    with pytest.raises(NotImplementedError):
        cc.lowering(node)
    op = cc.register_torch_op()
    args = (torch.zeros(1, 2, D, dtype=torch.float16), torch.zeros(D, 1, K, dtype=torch.float16),
            torch.zeros(D, dtype=torch.float16), torch.zeros(1, D, K, dtype=torch.float16),
            torch.tensor([2], dtype=torch.int32))
    with pytest.raises(NotImplementedError):
        op(*args, 1, K - 1, 1, D, 1)
    with pytest.raises(NotImplementedError):
        op(*args, 2, K - 1, 1, D, 0)
