"""AttentionPlugin: the eager torch op and the ONNX lowering agree, and both match plain attention."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.ops import attention_plugin as ap
from edgellm_validate.lowering import lower_custom_ops

HQ, HKV, D, CAP = 4, 2, 64, 16


def rope(r, cap=CAP, theta=10000.0):
    inv = theta ** (-np.arange(0, r, 2) / r)
    ang = np.arange(cap)[:, None] * inv
    return np.concatenate([np.cos(ang), np.sin(ang)], -1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def lowered_session():
    g = GraphBuilder("t")
    names = ["q", "k", "v", "past", "ctx", "rope", "start"]
    ins = [g.input("q", TensorProto.FLOAT16, ["B", "S", HQ * D]),
           g.input("k", TensorProto.FLOAT16, ["B", "S", HKV * D]),
           g.input("v", TensorProto.FLOAT16, ["B", "S", HKV * D]),
           g.input("past", TensorProto.FLOAT16, ["B", 2, HKV, "C", D]), g.input("ctx", TensorProto.INT32, ["B"]),
           g.input("rope", TensorProto.FLOAT, ["rb", "M", "R"]), g.input("start", TensorProto.INT32, ["kb"])]
    a, p = ap.emit(g, ins, num_q_heads=HQ, num_kv_heads=HKV, head_size=D)
    g.output(a, "attn", TensorProto.FLOAT16, ["B", "S", HQ, D])
    g.output(p, "present", TensorProto.FLOAT16, ["B", 2, HKV, "C", D])
    model = lower_custom_ops(g.to_model("unused.data", {"": 24, "trt_edgellm": 1}, 10))
    assert len(model.functions) == 1
    return ort.InferenceSession(model.SerializeToString()), names


def run_both(sess_names, feeds):
    sess, names = sess_names
    onnx_out = sess.run(None, dict(zip(names, feeds)))
    op = ap.register_torch_op()
    t_out = op(*[torch.from_numpy(x) for x in feeds], HQ, HKV, D, 0, 0, -1, [1.0, 1.0, 1.0])
    return onnx_out, [t.numpy() for t in t_out]


def reference_attention(q, k, v, pos_q, keys_upto, table):
    """Textbook rotate-half RoPE + causal GQA attention for one sequence (float64)."""
    r = table.shape[-1]

    def rot(x, pos):
        x = x.astype(np.float64).copy()
        c, s = table[0, pos, : r // 2], table[0, pos, r // 2 :]
        x1, x2 = x[..., : r // 2].copy(), x[..., r // 2 : r].copy()
        x[..., : r // 2] = x1 * c[:, None] - x2 * s[:, None]
        x[..., r // 2 : r] = x2 * c[:, None] + x1 * s[:, None]
        return x

    qr, kr = rot(q, pos_q), rot(k, np.arange(len(k)))
    out = np.zeros_like(qr)
    for h in range(HQ):
        kv = h // (HQ // HKV)
        sc = qr[:, h] @ kr[:, kv].T / np.sqrt(D)
        sc[np.arange(len(k))[None, :] > keys_upto[:, None]] = -np.inf
        p = np.exp(sc - sc.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kv].astype(np.float64)
    return out


@pytest.mark.parametrize("rotary", [64, 32])
def test_prefill_chunked_decode_agree_and_match_textbook(lowered_session, rotary):
    rng = np.random.default_rng(0)
    table = rope(rotary)
    toks = {b: [] for b in range(2)}  # per-sequence (q, k, v) rows in absolute order
    past = np.zeros((2, 2, HKV, CAP, D), np.float16)
    phases = [(5, [5, 3], []), (3, [3, 2], [5, 3]), (1, [9, 6], [8, 5]), (1, [10, 7], [9, 6])]
    for s, ctx, start in phases:
        q = rng.standard_normal((2, s, HQ * D)).astype(np.float16)
        k = rng.standard_normal((2, s, HKV * D)).astype(np.float16)
        v = rng.standard_normal((2, s, HKV * D)).astype(np.float16)
        feeds = [q, k, v, past, np.array(ctx, np.int32), table, np.array(start, np.int32)]
        (oa, op_), (ta, tp) = run_both(lowered_session, feeds)
        assert np.abs(oa.astype(np.float32) - ta.astype(np.float32)).max() < 2e-3
        assert np.array_equal(op_, tp)  # identical cache writes
        for b in range(2):
            n = ctx[b] if s > 1 else 1
            first = len(toks[b])
            toks[b].extend((q[b, t], k[b, t], v[b, t]) for t in range(n))
            qs, ks, vs = (np.stack([x[j] for x in toks[b]]) for j in range(3))
            pos = np.arange(first, first + n)
            want = reference_attention(qs[pos].reshape(n, HQ, D), ks.reshape(-1, HKV, D), vs.reshape(-1, HKV, D),
                                       pos, pos, table)
            assert np.abs(oa[b, :n].astype(np.float64) - want).max() < 5e-3
        past = op_


def test_decode_position_comes_from_context_lengths(lowered_session):
    """In decode the plugin writes at context_lengths-1, whatever kvcache_start_index says."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, HQ * D)).astype(np.float16)
    k = rng.standard_normal((1, 1, HKV * D)).astype(np.float16)
    v = rng.standard_normal((1, 1, HKV * D)).astype(np.float16)
    past = np.zeros((1, 2, HKV, CAP, D), np.float16)
    (oa, present), (_, tp) = run_both(lowered_session, [q, k, v, past, np.array([7], np.int32), rope(64),
                                                        np.array([2], np.int32)])
    written = np.nonzero(np.abs(present[0, 1]).sum(axis=(0, 2)))[0]
    assert written.tolist() == [6]
    assert np.array_equal(present, tp)


def test_schema_registration_and_node_shape():
    ap.register_schema()
    import onnx

    schema = onnx.defs.get_schema("AttentionPlugin", 1, "trt_edgellm")
    assert [i.name for i in schema.inputs] == list(ap.INPUTS)


def test_fp8_kv_cache_eager_and_lowering_agree_and_quantize_the_cache():
    """FP8 cache: slots hold fp8(x / scale) codes; attention reads codes * scale (quant.md §3.10)."""
    import ml_dtypes

    ks, vs = 0.05, 0.02
    g = GraphBuilder("t8")
    ins = [g.input("q", TensorProto.FLOAT16, ["B", "S", HQ * D]),
           g.input("k", TensorProto.FLOAT16, ["B", "S", HKV * D]),
           g.input("v", TensorProto.FLOAT16, ["B", "S", HKV * D]),
           g.input("past", TensorProto.FLOAT8E4M3FN, ["B", 2, HKV, "C", D]), g.input("ctx", TensorProto.INT32, ["B"]),
           g.input("rope", TensorProto.FLOAT, ["rb", "M", "R"]), g.input("start", TensorProto.INT32, ["kb"])]
    a, p = ap.emit(g, ins, num_q_heads=HQ, num_kv_heads=HKV, head_size=D, enable_fp8_kv_cache=1,
                   qkv_scales=(1.0, ks, vs))
    g.output(a, "attn", TensorProto.FLOAT16, ["B", "S", HQ, D])
    g.output(p, "present", TensorProto.FLOAT8E4M3FN, ["B", 2, HKV, "C", D])
    sess = ort.InferenceSession(lower_custom_ops(g.to_model("u.data", {"": 24, "trt_edgellm": 1}, 10))
                                .SerializeToString())
    op = ap.register_torch_op()
    rng = np.random.default_rng(3)
    table = rope(64)
    past8 = np.zeros((1, 2, HKV, CAP, D), np.uint8)  # raw e4m3 bytes; 0 is +0.0
    toks = []
    for s, ctx, start in [(6, [6], []), (1, [7], [6]), (1, [8], [7])]:
        q = rng.standard_normal((1, s, HQ * D)).astype(np.float16)
        k = (rng.standard_normal((1, s, HKV * D)) * 8).astype(np.float16)  # some beyond 448 * ks: saturate
        v = rng.standard_normal((1, s, HKV * D)).astype(np.float16)
        feeds = {"q": q, "k": k, "v": v, "ctx": np.array(ctx, np.int32), "rope": table,
                 "start": np.array(start, np.int32),
                 "past": ort.OrtValue.ortvalue_from_numpy_with_onnx_type(past8, TensorProto.FLOAT8E4M3FN)}
        oa, present = sess.run(None, feeds)
        ta, tp = op(*[torch.from_numpy(x) for x in (q, k, v)],
                    torch.from_numpy(past8.view(ml_dtypes.float8_e4m3fn).astype(np.float32)).to(torch.float8_e4m3fn),
                    torch.from_numpy(feeds["ctx"]), torch.from_numpy(table), torch.from_numpy(feeds["start"]),
                    HQ, HKV, D, 0, 1, -1, [1.0, ks, vs])
        assert tp.dtype == torch.float8_e4m3fn
        assert np.array_equal(present.view(np.uint8), tp.view(torch.uint8).numpy())  # identical cache bytes
        assert np.abs(oa.astype(np.float32) - ta.float().numpy()).max() < 2e-3
        toks.extend((q[0, t], k[0, t], v[0, t]) for t in range(s))
        past8 = present.view(np.uint8)
    # Independent check of the last decode: textbook attention over fp8-rounded K (rotated) and V.
    cached = past8.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    n = len(toks)
    v_true = np.stack([t[2] for t in toks]).reshape(n, HKV, D).astype(np.float64)
    v_fp8 = np.clip(v_true / vs, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    assert np.array_equal(cached[0, 1, :, :n].transpose(1, 0, 2), v_fp8)
    assert np.abs(cached[0, 0]).max() == 448.0  # large K saturated instead of overflowing to NaN
