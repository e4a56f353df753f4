"""The quantization ops' faces agree: the torch eager reference (face 1), the standard-ONNX lowering run
by onnxruntime (face 4), and an independent numpy model of each op written here from the contract
(ml_dtypes for the fp4 / fp8 roundings, `quant/int4_pack.py`'s packer for the INT4 layout)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T

from edgellm_core.onnx_graph.builder import GraphBuilder
from edgellm_core.ops import fp4, int4_gemm, mxfp8, register_schemas
from edgellm_export.quant import int4_pack
from edgellm_validate.lowering import lower_custom_ops


def session(g: GraphBuilder, opsets: dict) -> ort.InferenceSession:
    model = g.to_model("unused.data", opsets, 10)
    register_schemas()
    onnx.checker.check_model(model, full_check=True)  # face 2: the nodes type-check against our schemas
    return ort.InferenceSession(lower_custom_ops(model).SerializeToString())


@pytest.mark.parametrize("n,k", [(128, 256), (64, 128), (12, 192)])
def test_int4_gemm_faces_agree_with_the_packed_layout(n, k):
    rng = np.random.default_rng(n + k)
    group = 64 if k % 128 else 128
    u = rng.integers(0, 16, (n, k), dtype=np.uint8)
    packed = int4_pack.pack_plugin(u)  # independent encoder, from the contract's prose
    scales = (rng.random((k // group, n)) * 0.1 + 0.01).astype(np.float16)
    x = rng.standard_normal((2, 3, k)).astype(np.float16)
    want = x.astype(np.float64) @ ((u.astype(np.float64) - 8) * np.repeat(scales.astype(np.float64).T, group, 1)).T

    assert np.array_equal(int4_gemm.unpack_torch(torch.from_numpy(packed), n, k).numpy(), u)
    op = int4_gemm.register_torch_op()
    eager = op(torch.from_numpy(x).float(), torch.from_numpy(packed), torch.from_numpy(scales), n, k, group).numpy()
    assert np.abs(eager - want).max() < 1e-3 * np.abs(want).max()

    g = GraphBuilder("int4")
    xi = g.input("x", T.FLOAT16, ["B", "S", k])
    qw = g.input("qweight", T.INT8, [n // 2, k])
    sc = g.input("scales", T.FLOAT16, [k // group, n])
    g.output(int4_gemm.emit(g, xi, qw, sc, n=n, k=k, group_size=group), "y", T.FLOAT16, ["B", "S", n])
    lowered = session(g, {"": 24, "trt_edgellm": 1}).run(None, {"x": x, "qweight": packed, "scales": scales})[0]
    assert np.abs(lowered.astype(np.float64) - want).max() < 2e-3 * np.abs(want).max()


def test_int4_gemm_shape_limits_are_stated():
    assert "multiple of 4" in int4_gemm.check_shape(130, 128, 128)
    assert "multiple of 64" in int4_gemm.check_shape(128, 96, 32)
    assert int4_gemm.check_shape(128, 256, 128) is None


def nvfp4_reference(x: np.ndarray, global_scale: float) -> np.ndarray:
    """quant.md §3.4 in numpy: block scale fp8(amax / (6 g)), codes e2m1(x / (s_b g)), back to values."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 16)
    amax = np.abs(blocks).max(-1, keepdims=True)
    sb = np.minimum(amax / np.float32(6 * global_scale), 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    denom = sb * np.float32(global_scale)
    scaled = np.where(denom > 0, blocks / np.where(denom > 0, denom, 1), 0)
    q = np.clip(scaled, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)  # RNE, as the runtime
    sb16 = (sb * np.float16(global_scale).astype(np.float32)).astype(np.float16).astype(np.float32)
    return (q * sb16).astype(np.float16).reshape(x.shape)


def test_nvfp4_activation_quantization_faces_agree_with_ml_dtypes():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 64)) * 3).astype(np.float16)
    x[0, 0, :16] = 0  # an all-zero block: scale 0, codes 0, no NaN
    x[0, 1, :4] = [0.25, 0.75, 2.5, 5.0]  # e2m1 ties (with amax 6 in the block the scale is 1 * g)
    x[0, 1, 4] = 6.0
    g_scale = 1.0 / 448.0
    want = nvfp4_reference(x, g_scale)

    quantize, dequantize = fp4.register_torch_op()
    codes, sf = quantize(torch.from_numpy(x), torch.tensor(g_scale, dtype=torch.float32), 16)
    eager = dequantize(codes, dequantize(sf, torch.tensor(g_scale, dtype=torch.float16), 0), 16).numpy()
    assert np.array_equal(eager, want)
    assert eager[0, 0, :16].tolist() == [0.0] * 16

    g = GraphBuilder("nvfp4")
    xi = g.input("x", T.FLOAT16, ["B", "S", 64])
    gs = g.input("gs", T.FLOAT, [])
    gs16 = g.input("gs16", T.FLOAT16, [])
    g.output(fp4.emit_activation_qdq(g, xi, gs, gs16), "y", T.FLOAT16, ["B", "S", 64])
    feeds = {"x": x, "gs": np.array(g_scale, np.float32), "gs16": np.array(g_scale, np.float16)}
    lowered = session(g, {"": 24, "trt": 1}).run(None, feeds)[0]
    assert np.array_equal(lowered, want)


def mxfp8_reference(x: np.ndarray) -> np.ndarray:
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    _, e = np.frexp(amax)  # OCP MX: shared exponent floor(log2 amax) - emax(e4m3) = (e - 1) - 8
    exp = np.where(amax > 0, e - 1 - 8, -127).clip(-127, 127).astype(np.float32)
    q = np.clip(blocks / np.exp2(exp), -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return (q * np.exp2(exp)).astype(np.float16).reshape(x.shape)


def test_mxfp8_faces_agree_with_the_ocp_rule():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 4, 128)) * np.exp2(rng.integers(-6, 6, (3, 4, 1)))).astype(np.float16)
    x[0, 0, :32] = 0
    x[1, 0, :32] = 8.0  # amax an exact power of two: where log2-based exponents go wrong
    want = mxfp8_reference(x)
    quantize, dequantize = mxfp8.register_torch_op()
    q, s = quantize(torch.from_numpy(x), 32)
    assert s.dtype == torch.uint8 and s.shape == (3, 4, 4)
    eager = dequantize(q, s, 32).numpy()
    assert np.array_equal(eager, want)

    g = GraphBuilder("mxfp8")
    xi = g.input("x", T.FLOAT16, ["B", "S", 128])
    g.output(mxfp8.emit_activation_qdq(g, xi), "y", T.FLOAT16, ["B", "S", 128])
    lowered = session(g, {"": 24, "trt": 1}).run(None, {"x": x})[0]
    assert np.array_equal(lowered, want)


def test_fp4_weight_initializers_are_lowered_for_onnxruntime():
    """ONNX packs FLOAT4E2M1 low nibble first; the CPU twin reads the same bytes as uint8 and unpacks."""
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (8, 32), dtype=np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scales = (rng.random((8, 2)) + 0.5).astype(np.float32)
    t = onnx.TensorProto()
    t.name, t.data_type, t.raw_data = "w", T.FLOAT4E2M1, packed.tobytes()
    t.dims.extend([8, 32])
    g = GraphBuilder("w4")
    g.initializers.append(t)
    g.initializers.append(onnx.numpy_helper.from_array(scales, "s"))
    g.output(g.node("DequantizeLinear", ["w", "s"], {"axis": -1, "block_size": 16}), "y", T.FLOAT, [8, 32])
    got = ort.InferenceSession(lower_custom_ops(g.to_model("u", {"": 24}, 10)).SerializeToString()).run(None, {})[0]
    want = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32) * np.repeat(scales, 16, 1)
    assert np.array_equal(got, want)
