"""The CPU backend's fp16 arithmetic rounds like IEEE (as TensorRT's does), not like onnxruntime's CPU
kernels: fp16 Mul, MatMul and DequantizeLinear results are the correctly rounded fp16 of the exact value,
and QuantizeLinear on fp16 rounds the exact quotient x / s once."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgellm_validate.cpu_precision import widen_fp16_arithmetic


def test_fp16_ops_round_once_after_widening():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((4, 256)) * 0.05).astype(np.float16)
    w = (1 + 0.1 * rng.standard_normal(256)).astype(np.float16)
    m = (rng.standard_normal((256, 64)) * 0.05).astype(np.float16)
    s = np.float16(4 / 448)
    nodes = [helper.make_node("Mul", ["a", "w"], ["prod"]), helper.make_node("MatMul", ["prod", "m"], ["mm"]),
             helper.make_node("QuantizeLinear", ["prod", "s"], ["q"], output_dtype=T.FLOAT8E4M3FN),
             helper.make_node("DequantizeLinear", ["q", "s"], ["dq"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", T.FLOAT16, [4, 256])],
                          [helper.make_tensor_value_info(n, T.FLOAT16, None) for n in ("prod", "mm", "dq")],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(m, "m"),
                           numpy_helper.from_array(np.array(s), "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    assert widen_fp16_arithmetic(model) == 4
    prod, mm, dq = ort.InferenceSession(model.SerializeToString()).run(None, {"a": a})
    want_prod = (a.astype(np.float64) * w).astype(np.float16)
    assert np.array_equal(prod, want_prod)
    want_mm = (want_prod.astype(np.float64) @ m.astype(np.float64)).astype(np.float16)
    assert (mm != want_mm).mean() < 0.005  # fp32 accumulation only; onnxruntime's own path misses ~half
    codes = np.clip(want_prod.astype(np.float32) / np.float32(s), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(dq, (codes.astype(np.float32) * np.float32(s)).astype(np.float16))
