"""INT4 repacks (contract quant.md §3.5-§3.8): independent encoders, a slow reference packer, round trips.

The checkpoint encoders and the element-by-element plugin packer below are written from the contract's
prose, not from the module under test, so a layout mistake on either side shows up as a mismatch.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm_export.errors import ExportError
from edgellm_export.quant.int4_pack import (
    Int4LayoutError,
    Int4RangeError,
    dequant_plugin,
    fold_zero_points,
    gptq_perm,
    pack_plugin,
    repack_autoawq,
    repack_gptq,
    repack_modelopt_w4a16,
    unpack_autoawq,
    unpack_gptq,
    unpack_plugin,
)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# --------------------------------------------------------------------------- independent encoders

def _to_int32(words: np.ndarray) -> np.ndarray:
    """uint32 values held in int64 -> the int32 a checkpoint stores (wraps above 2**31)."""
    return words.astype(np.uint32).view(np.int32)


def encode_autoawq(q: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q [K, N], z [K/g, N] -> AutoAWQ GEMM qweight [K, N/8], qzeros [K/g, N/8]: field f = channel 8c+ORDER[f]."""
    def pack(a):
        rows, n = a.shape
        out = np.zeros((rows, n // 8), dtype=np.int64)
        for c in range(n // 8):
            for f in range(8):
                out[:, c] |= a[:, 8 * c + AWQ_ORDER[f]].astype(np.int64) << (4 * f)
        return _to_int32(out)
    return pack(q), pack(z)


def encode_gptq(q: np.ndarray, z_stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q [K, N] -> qweight [K/8, N] (8 input channels per word); z_stored [G, N] -> qzeros [G, N/8]."""
    k, n = q.shape
    qweight = np.zeros((k // 8, n), dtype=np.int64)
    for r in range(k // 8):
        for f in range(8):
            qweight[r] |= q[8 * r + f].astype(np.int64) << (4 * f)
    g = z_stored.shape[0]
    qzeros = np.zeros((g, n // 8), dtype=np.int64)
    for c in range(n // 8):
        for f in range(8):
            qzeros[:, c] |= z_stored[:, 8 * c + f].astype(np.int64) << (4 * f)
    return _to_int32(qweight), _to_int32(qzeros)


def encode_modelopt_w4a16(s: np.ndarray) -> np.ndarray:
    """signed int4 s [N, K] -> uint8 [N/2, K]: low nibble = even row, two's complement."""
    n, k = s.shape
    out = np.zeros((n // 2, k), dtype=np.uint8)
    for i in range(n // 2):
        out[i] = (s[2 * i] & 0xF) | ((s[2 * i + 1] & 0xF) << 4)
    return out


def reference_pack_plugin(u: np.ndarray) -> np.ndarray:
    """§3.8 element by element: 32-block 4x8 transpose, 4-row groups x 64-K stripes, int16 LE words."""
    n, k = u.shape
    permuted = np.zeros_like(u)
    for row in range(n):
        for block in range(k // 32):
            for p in range(32):
                permuted[row, 32 * block + p] = u[row, 32 * block + 8 * (p % 4) + p // 4]
    words = np.zeros((n // 4, k), dtype=np.uint16)
    for nb in range(n // 4):
        for t in range(k // 64):
            for r in range(64):
                word = 0
                for s in range(4):
                    word |= int(permuted[4 * nb + r // 16, 64 * t + 4 * (r % 16) + s]) << (4 * s)
                words[nb, 64 * t + r] = word
    out = np.zeros((n // 2, k), dtype=np.uint8)
    for nb in range(n // 4):
        for j in range(k):
            lo, hi = int(words[nb, j]) & 0xFF, int(words[nb, j]) >> 8
            for byte_index, value in ((2 * j, lo), (2 * j + 1, hi)):  # little-endian
                out[2 * nb + byte_index // k, byte_index % k] = value
    return out.view(np.int8)


# --------------------------------------------------------------------------- helpers

def random_q_z(rng, k: int, n: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Random asymmetric q [K, N], z [K/g, N] in [0, 15] with q - z inside [-8, 7] (representable)."""
    z = rng.integers(0, 16, (k // group, n))
    zk = np.repeat(z, group, axis=0)
    lo, hi = np.maximum(-8, -zk), np.minimum(7, 15 - zk)
    q = zk + rng.integers(lo, hi + 1)
    return q.astype(np.uint8), z.astype(np.uint8)


def fp16_scales(rng, shape) -> np.ndarray:
    return rng.uniform(0.001, 0.05, shape).astype(np.float16)


# --------------------------------------------------------------------------- plugin layout

@pytest.mark.parametrize("shape", [(8, 64), (16, 128), (32, 192), (128, 256)])
def test_pack_plugin_matches_slow_reference(shape):
    rng = np.random.default_rng(sum(shape))
    u = rng.integers(0, 16, shape, dtype=np.uint8)
    packed = pack_plugin(u)
    assert packed.dtype == np.int8 and packed.shape == (shape[0] // 2, shape[1])
    np.testing.assert_array_equal(packed, reference_pack_plugin(u))
    np.testing.assert_array_equal(unpack_plugin(packed, *shape), u)


def test_pack_plugin_single_nibble_positions():
    """Hand-derived from §3.8 so a transposed/shifted layout cannot pass by symmetry."""
    u = np.zeros((8, 128), dtype=np.uint8)
    u[0, 1] = 1  # offset 1 -> p = 4 -> word 1, nibble 0 of int16 row 0 -> byte 2 of row 0
    u[5, 72] = 3  # nb 1, rr 1, stripe 1, offset 8 -> p = 1 -> r = 16, nibble 1 -> word 80 -> byte 160
    packed = pack_plugin(u).view(np.uint8)
    expected = np.zeros_like(packed)
    expected[0, 2] = 0x01
    expected[3, 160 - 128] = 0x30
    np.testing.assert_array_equal(packed, expected)


@settings(max_examples=60, deadline=None)
@given(a=st.integers(1, 12), b=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_inverse_property(a, b, seed):
    n, k = 4 * a, 64 * b
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 16, (n, k), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_plugin(pack_plugin(u), n, k), u)
    # and the other way: the layout is a bijection on all int8 buffers
    raw = rng.integers(-128, 128, (n // 2, k), dtype=np.int8)
    np.testing.assert_array_equal(pack_plugin(unpack_plugin(raw, n, k)), raw)


@pytest.mark.parametrize("shape", [(6, 64), (2, 64), (8, 96), (8, 32), (0, 64)])
def test_plugin_shape_violations_raise(shape):
    u = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(ValueError, match="N % 4 == 0 and K % 64 == 0"):
        pack_plugin(u)
    with pytest.raises(ValueError, match="N % 4 == 0 and K % 64 == 0"):
        unpack_plugin(np.zeros((max(shape[0] // 2, 1), shape[1]), dtype=np.int8), *shape)


def test_pack_plugin_rejects_non_nibbles():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_plugin(np.full((4, 64), 16, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_plugin(np.full((4, 64), -1, dtype=np.int16))
    with pytest.raises(ValueError, match="int8"):
        unpack_plugin(np.zeros((4, 64), dtype=np.int8), 4, 64)  # wrong row count


def test_dequant_plugin_semantics():
    rng = np.random.default_rng(3)
    n, k, g = 8, 256, 128
    u = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scales = fp16_scales(rng, (k // g, n))
    w = dequant_plugin(pack_plugin(u), scales, n, k, g)
    assert w.dtype == np.float32 and w.shape == (n, k)
    for row in range(n):
        for col in range(0, k, 37):
            assert w[row, col] == (int(u[row, col]) - 8) * np.float32(scales[col // g, row])
    with pytest.raises(ValueError, match="scales"):
        dequant_plugin(pack_plugin(u), scales.T, n, k, g)


# --------------------------------------------------------------------------- AutoAWQ

def test_autoawq_unpack_and_round_trip():
    rng = np.random.default_rng(10)
    k, n, g = 256, 32, 64
    q, z = random_q_z(rng, k, n, g)
    qweight, qzeros = encode_autoawq(q, z)
    assert (qweight < 0).any()  # high nibble >= 8 in the last field: sign handling is exercised
    uq, uz = unpack_autoawq(qweight, qzeros)
    np.testing.assert_array_equal(uq, q)
    np.testing.assert_array_equal(uz, z)

    u = repack_autoawq(qweight, qzeros, g)
    assert u.shape == (n, k) and u.dtype == np.uint8
    decoded = unpack_plugin(pack_plugin(u), n, k).astype(np.int64) - 8
    true_int = q.astype(np.int64) - np.repeat(z, g, axis=0).astype(np.int64)
    np.testing.assert_array_equal(decoded, true_int.T)
    np.testing.assert_array_equal(repack_autoawq(qweight, qzeros), u)  # group derived from K / rows

    scales = fp16_scales(rng, (k // g, n))  # AutoAWQ scales are already [K/g, N]
    w_true = true_int * np.repeat(scales.astype(np.float64), g, axis=0)  # [K, N]
    w_plugin = dequant_plugin(pack_plugin(u), scales, n, k, g)
    np.testing.assert_array_equal(w_plugin.astype(np.float64), w_true.T)


def test_autoawq_order_is_not_sequential():
    """One channel set in the qweight: only the [0,2,4,6,1,3,5,7] order puts it at the right N."""
    q = np.zeros((64, 8), dtype=np.uint8)
    q[0, 1] = 5  # channel 1 lives in bit field 4
    qweight, qzeros = encode_autoawq(q, np.zeros((1, 8), dtype=np.uint8))
    assert int(qweight.view(np.uint32)[0, 0]) == 5 << 16
    uq, _ = unpack_autoawq(qweight, qzeros)
    np.testing.assert_array_equal(uq, q)


def test_autoawq_out_of_range_refused():
    rng = np.random.default_rng(11)
    k, n, g = 128, 16, 64
    q, z = random_q_z(rng, k, n, g)
    z[0, :3] = 0
    q[:g, :3] = 0
    q[5, 0] = 15  # 15 - 0 = 15 > 7
    q[7, 2] = 9   # 9 > 7
    z[1, 4] = 15
    q[g:2 * g, 4] = 15
    q[g + 2, 4] = 0  # 0 - 15 = -15 < -8
    qweight, qzeros = encode_autoawq(q, z)
    with pytest.raises(Int4RangeError) as info:
        repack_autoawq(qweight, qzeros, g, name="layers.0.mlp.down_proj")
    err = info.value
    assert (err.count, err.total) == (3, k * n)
    assert isinstance(err, ValueError) and isinstance(err, ExportError)
    assert "3 of 2048" in str(err) and "layers.0.mlp.down_proj" in str(err) and "[-8, 7]" in str(err)
    # the low-level fold reports the same count and what clamping would give
    folded, outside = fold_zero_points(np.array([15, 0, 3]), np.array([0, 15, 3]))
    assert outside == 2
    np.testing.assert_array_equal(folded, [15, 0, 8])


def test_autoawq_bad_shapes_raise():
    qweight = np.zeros((128, 2), dtype=np.int32)
    with pytest.raises(ValueError, match="group size"):
        repack_autoawq(qweight, np.zeros((2, 2), dtype=np.int32), 32)
    with pytest.raises(ValueError, match="N/8"):
        repack_autoawq(qweight, np.zeros((2, 3), dtype=np.int32), 64)
    with pytest.raises(ValueError, match="int32"):
        repack_autoawq(qweight.astype(np.int64), np.zeros((2, 2), dtype=np.int32), 64)


# --------------------------------------------------------------------------- GPTQ

def make_gptq(rng, k, n, g, shuffle=True):
    """Random GPTQ v1 tensors with a desc_act-style shuffled g_idx; returns encoded + truth."""
    g_idx = np.repeat(np.arange(k // g), g)
    if shuffle:
        rng.shuffle(g_idx)
    z_true = rng.integers(1, 16, (k // g, n))  # stored zero - 1 must be a nibble
    zk = z_true[g_idx]
    q = zk + rng.integers(np.maximum(-8, -zk), np.minimum(7, 15 - zk) + 1)
    z_stored = (z_true - 1).astype(np.uint8)
    qweight, qzeros = encode_gptq(q.astype(np.uint8), z_stored)
    return qweight, qzeros, g_idx.astype(np.int32), q.astype(np.uint8), z_stored


def test_gptq_unpack():
    rng = np.random.default_rng(20)
    qweight, qzeros, _, q, z_stored = make_gptq(rng, 256, 16, 64)
    uq, uz = unpack_gptq(qweight, qzeros)
    np.testing.assert_array_equal(uq, q)
    np.testing.assert_array_equal(uz, z_stored)


def test_gptq_desc_act_round_trip():
    rng = np.random.default_rng(21)
    k, n, g = 512, 32, 128
    qweight, qzeros, g_idx, q, z_stored = make_gptq(rng, k, n, g)
    u, perm = repack_gptq(qweight, qzeros, g_idx, g)
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(k))
    assert not np.array_equal(perm, np.arange(k))
    # groups are contiguous after perm, matching the plugin's k // g
    np.testing.assert_array_equal(g_idx[perm], np.arange(k) // g)

    true_int = q.astype(np.int64) - (z_stored.astype(np.int64)[g_idx] + 1)  # [K, N]
    decoded = unpack_plugin(pack_plugin(u), n, k).astype(np.int64) - 8
    np.testing.assert_array_equal(decoded, true_int[perm].T)

    scales = fp16_scales(rng, (k // g, n))
    w_true = (true_int * scales.astype(np.float64)[g_idx]).T  # [N, K]
    w_plugin = dequant_plugin(pack_plugin(u), scales, n, k, g).astype(np.float64)
    x = rng.standard_normal((5, k))
    y_true = x @ w_true.T
    y_plugin = x[:, perm] @ w_plugin.T
    assert np.max(np.abs(y_plugin - y_true)) <= 1e-12 * np.max(np.abs(y_true))
    np.testing.assert_array_equal(w_plugin, w_true[:, perm])


def test_gptq_without_g_idx_is_identity_perm():
    rng = np.random.default_rng(22)
    k, n, g = 256, 16, 128
    qweight, qzeros, g_idx, q, z_stored = make_gptq(rng, k, n, g, shuffle=False)
    u, perm = repack_gptq(qweight, qzeros, None, g)
    np.testing.assert_array_equal(perm, np.arange(k))
    np.testing.assert_array_equal(u.astype(np.int64) - 8, (q.astype(np.int64) - z_stored[g_idx] - 1).T)
    u_derived, _ = repack_gptq(qweight, qzeros, None)  # group = K / G
    np.testing.assert_array_equal(u_derived, u)


def test_gptq_zero_offset_and_refusal():
    k, n, g = 128, 8, 64
    q = np.full((k, n), 8, dtype=np.uint8)
    z_stored = np.full((k // g, n), 7, dtype=np.uint8)
    qweight, qzeros = encode_gptq(q, z_stored)
    u1, _ = repack_gptq(qweight, qzeros, None, g)  # v1: zero = 8
    assert (u1 == 8).all()
    u0, _ = repack_gptq(qweight, qzeros, None, g, zero_offset=0)  # v2: zero = 7
    assert (u0 == 9).all()

    z_stored[1, 3] = 15  # v1 zero 16
    q[g:, 3] = 0          # 0 - 16 = -16, for the g channels of group 1
    q[0, 0] = 15          # 15 - 8 = 7: still fine
    qweight, qzeros = encode_gptq(q, z_stored)
    with pytest.raises(Int4RangeError, match=f"{g} of {k * n}") as info:
        repack_gptq(qweight, qzeros, None, g)
    assert info.value.count == g


@pytest.mark.parametrize("g_idx, message", [
    (np.array([0, 0, 0, 1, 1, 1, 1, 1]), "exactly 4"),   # unequal group sizes
    (np.array([0, 0, 0, 0, 2, 2, 2, 2]), r"\[0, 2\)"),    # value >= G
    (np.array([0, 0, 0, 0, 1, 1, 1, -1]), r"\[0, 2\)"),   # negative
    (np.array([0, 0, 0, 1, 1, 1]), "does not divide"),   # K not a multiple of group
    (np.zeros((2, 4), dtype=np.int64), "1-D"),
    (np.zeros(8), "integer"),
])
def test_gptq_perm_validation(g_idx, message):
    with pytest.raises(ValueError, match=message):
        gptq_perm(g_idx, 4)


def test_gptq_perm_is_grouped_ascending():
    g_idx = np.array([1, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(gptq_perm(g_idx, 3), [1, 3, 4, 0, 2, 5])


def test_repack_gptq_bad_g_idx_raises():
    rng = np.random.default_rng(23)
    qweight, qzeros, g_idx, _, _ = make_gptq(rng, 128, 8, 64)
    bad = g_idx.copy()
    bad[np.flatnonzero(bad == 0)[0]] = 1  # group 0 has 63 members, group 1 has 65
    with pytest.raises(Int4LayoutError, match="exactly 64"):
        repack_gptq(qweight, qzeros, bad, 64)
    with pytest.raises(ValueError, match=r"shape \[128\]"):
        repack_gptq(qweight, qzeros, g_idx[:64], 64)
    with pytest.raises(ValueError, match="group size"):
        repack_gptq(qweight, qzeros, g_idx, 32)


# --------------------------------------------------------------------------- ModelOpt W4A16

def test_modelopt_w4a16_round_trip():
    rng = np.random.default_rng(30)
    n, k, g = 16, 256, 128
    s = rng.integers(-8, 8, (n, k)).astype(np.int8)
    weight = encode_modelopt_w4a16(s)
    u = repack_modelopt_w4a16(weight)
    assert u.shape == (n, k) and u.dtype == np.uint8
    np.testing.assert_array_equal(u.astype(np.int64) - 8, s)
    np.testing.assert_array_equal(unpack_plugin(pack_plugin(u), n, k).astype(np.int64) - 8, s)

    weight_scale = fp16_scales(rng, (n, k // g))  # ModelOpt: [N, K/g]; the plugin wants [K/g, N]
    w_true = s.astype(np.float64) * np.repeat(weight_scale.astype(np.float64), g, axis=1)
    w_plugin = dequant_plugin(pack_plugin(u), weight_scale.T, n, k, g)
    np.testing.assert_array_equal(w_plugin.astype(np.float64), w_true)


def test_modelopt_w4a16_every_byte_value():
    weight = np.arange(256, dtype=np.uint8).reshape(2, 128)
    u = repack_modelopt_w4a16(weight)
    signed = lambda v: v - 16 if v >= 8 else v  # noqa: E731
    for i in range(2):
        for col in range(128):
            b = int(weight[i, col])
            assert int(u[2 * i, col]) - 8 == signed(b & 0xF)
            assert int(u[2 * i + 1, col]) - 8 == signed(b >> 4)


def test_modelopt_w4a16_bad_dtype():
    with pytest.raises(ValueError, match="uint8"):
        repack_modelopt_w4a16(np.zeros((4, 64), dtype=np.int32))


# --------------------------------------------------------------------------- speed

def test_pack_plugin_is_vectorised():
    """An 8B down_proj-sized weight must pack in well under the time a per-element loop would need."""
    u = np.random.default_rng(40).integers(0, 16, (4096, 14336), dtype=np.uint8)
    start = time.perf_counter()
    packed = pack_plugin(u)
    assert time.perf_counter() - start < 5.0
    assert packed.shape == (2048, 14336)
