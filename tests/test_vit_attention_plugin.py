"""trt_edgellm::ViTAttentionPlugin's faces: the eager reference against per-sequence float64 attention, the
lowering (onnxruntime on an unmodified node) against the eager reference, the schema, and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgellm_core.ops import vit_attention_plugin as vit
from edgellm_core.ops.schemas import ONNX_OPSET

HEADS, D = 3, 16


def packed(lengths, seed=0):
    rng = np.random.default_rng(seed)
    t = sum(lengths)
    q, k, v = (rng.standard_normal((t, HEADS, D)).astype(np.float16) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return q, k, v, cu


def reference(q, k, v, cu):
    """float64, one sequence at a time."""
    out = np.zeros(q.shape, np.float64)
    for a, b in zip(cu, cu[1:]):
        if a == b:
            continue
        qs, ks, vs = (x[a:b].astype(np.float64).transpose(1, 0, 2) for x in (q, k, v))
        s = qs @ ks.transpose(0, 2, 1) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[a:b] = ((p / p.sum(-1, keepdims=True)) @ vs).transpose(1, 0, 2)
    return out


def run_lowered(q, k, v, cu, carrier_len):
    import onnxruntime as ort

    from edgellm_validate.lowering import lower_custom_ops

    node = helper.make_node(vit.OP_TYPE, list(vit.INPUTS), ["out"], domain=vit.DOMAIN, num_heads=HEADS, head_size=D)
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT16, ["t", HEADS, D]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT16, ["t", HEADS, D]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT16, ["t", HEADS, D]),
        helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["n"]),
        helper.make_tensor_value_info("max_seqlen_carrier", TensorProto.INT32, ["m"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["t", HEADS, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                    helper.make_opsetid(vit.DOMAIN, 1)])
    vit.register_schema()
    onnx.checker.check_model(model, full_check=True)  # the node as exported, against our schema
    lower_custom_ops(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"q": q, "k": k, "v": v, "cu_seqlens": cu,
                           "max_seqlen_carrier": np.zeros(carrier_len, np.int32)})[0]


@pytest.mark.parametrize("lengths", [[16], [4, 9, 1, 12], [7, 0, 5]])
def test_eager_and_lowering_match_per_sequence_attention(lengths):
    import torch

    q, k, v, cu = packed(lengths)
    want = reference(q, k, v, cu)
    op = vit.register_torch_op()
    eager = op(*(torch.from_numpy(x) for x in (q, k, v, cu)), torch.zeros(max(lengths), dtype=torch.int32),
               HEADS, D).float().numpy()
    lowered = run_lowered(q, k, v, cu, max(lengths)).astype(np.float64)
    for got in (eager, lowered):
        assert np.abs(got - want).max() < 2e-3  # one fp16 rounding of values around 1
    assert np.abs(eager - lowered).max() <= 1e-3


def test_sequences_never_see_each_other():
    """Changing the second sequence's keys and values leaves the first one's output bit for bit."""
    q, k, v, cu = packed([5, 6])
    a = run_lowered(q, k, v, cu, 6)
    k2, v2 = k.copy(), v.copy()
    k2[5:] *= -3
    v2[5:] += 1
    b = run_lowered(q, k2, v2, cu, 6)
    assert np.array_equal(a[:5], b[:5]) and not np.array_equal(a[5:], b[5:])


def test_refusals():
    import torch

    q, k, v, cu = packed([4, 8])
    op = vit.register_torch_op()
    t = [torch.from_numpy(x) for x in (q, k, v)]
    with pytest.raises(ValueError, match="exceeds the max_seqlen_carrier length 4"):
        op(*t, torch.from_numpy(cu), torch.zeros(4, dtype=torch.int32), HEADS, D)
    with pytest.raises(ValueError, match="must start at 0"):
        op(*t, torch.tensor([1, 12], dtype=torch.int32), torch.zeros(12, dtype=torch.int32), HEADS, D)
    with pytest.raises(ValueError, match="num_heads 2"):
        op(*t, torch.from_numpy(cu), torch.zeros(8, dtype=torch.int32), 2, D)
    assert vit.check_lengths([0, 3, 3, 9], 6) is None
