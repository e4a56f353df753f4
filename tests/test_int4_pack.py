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

from edgellm_core.errors import ExportError
from edgellm_export.quant.int4_pack import (
    Int4LayoutError,
    gptq_perm,
    pack_plugin,
    repack_autoawq,
    repack_gptq,
    repack_modelopt_w4a16,
    split_zero_points,
    unpack_autoawq,
    unpack_gptq,
    unpack_plugin,
    zero_correction,
    zeros_are_eight,
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


def dequant_plugin(packed: np.ndarray, scales: np.ndarray, n: int, k: int, group: int) -> np.ndarray:
    """The plugin's semantics (quant.md §3.8) in float32: ``W[n, k] = (U[n, k] - 8) * scales[k // group, n]``,
    read back from a packed buffer with the exporter's unpacking (itself held against packing above)."""
    scales = np.asarray(scales)
    if scales.shape != (k // group, n):
        raise ValueError(f"INT4 scales must be [K/g, N] = [{k // group}, {n}], got {list(scales.shape)}")
    u = unpack_plugin(packed, n, k).astype(np.float32) - 8.0
    return u * np.repeat(scales.astype(np.float32).T, group, axis=1)


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

    u, d = repack_autoawq(qweight, qzeros, g)
    assert u.shape == (n, k) and u.dtype == np.uint8
    assert d.shape == (k // g, n) and not d.any()  # every q - z fits: the plain fold
    decoded = unpack_plugin(pack_plugin(u), n, k).astype(np.int64) - 8
    true_int = q.astype(np.int64) - np.repeat(z, g, axis=0).astype(np.int64)
    np.testing.assert_array_equal(decoded, true_int.T)
    np.testing.assert_array_equal(repack_autoawq(qweight, qzeros)[0], u)  # group derived from K / rows

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


def exact_weights(q, z, scales, group):
    """(q - z) * s in float64, [N, K]: what an asymmetric checkpoint means."""
    return ((q.astype(np.int64) - np.repeat(z, group, 0)) * np.repeat(scales.astype(np.float64), group, 0)).T


def test_autoawq_beyond_the_signed_range_splits_exactly():
    """Zeros of 0 and 15 with q at the far end: U stays a nibble, d carries the rest, nothing is lost."""
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
    u, d = repack_autoawq(qweight, qzeros, g, name="layers.0.mlp.down_proj")
    assert d.dtype == np.int8 and d.shape == (k // g, n)
    # Only the three groups that do not fit get a correction: c = 8 (q spans 0..15), c = 2 (q in 0..9,
    # nearest to 0 in [9 - 7, 0 + 8]), c = 8.
    want_d = np.zeros((k // g, n), np.int64)
    want_d[0, 0], want_d[0, 2], want_d[1, 4] = 8, 2, 8 - 15
    np.testing.assert_array_equal(d, want_d)
    decoded = unpack_plugin(pack_plugin(u), n, k).astype(np.int64) - 8
    np.testing.assert_array_equal(decoded + np.repeat(d, g, 0).T, (q.astype(np.int64) - np.repeat(z, g, 0)).T)
    # In weights: plugin dequant plus the correction term, exact in float64 with fp16 scales.
    scales = fp16_scales(rng, (k // g, n))
    w = dequant_plugin(pack_plugin(u), scales, n, k, g).astype(np.float64)
    w += np.repeat(d * scales.astype(np.float64), g, 0).T
    np.testing.assert_array_equal(w, exact_weights(q, z, scales, g))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), top=st.integers(15, 16), span=st.integers(0, 15))
def test_split_zero_points_property(seed, top, span):
    """Any zeros (GPTQ v1 reaches 16), any group ranges: U in [0, 15], q - z = (U - 8) + d, and d is the
    smallest correction possible, zero exactly where the group fits."""
    rng = np.random.default_rng(seed)
    k, n, g = 64, 8, 16
    lo = rng.integers(0, 16 - span, (k // g, 1, n))
    q = (lo + rng.integers(0, span + 1, (k // g, g, n))).reshape(k, n)
    z = rng.integers(0, top + 1, (k // g, n))
    u, d = split_zero_points(q.astype(np.uint8), z, g)
    assert u.dtype == np.uint8 and u.max() <= 15
    diff = q - np.repeat(z, g, 0)
    np.testing.assert_array_equal(u.astype(np.int64) - 8 + np.repeat(d, g, 0), diff)
    qg = q.reshape(k // g, g, n)
    fits = (qg.max(1) - z <= 7) & (qg.min(1) - z >= -8)
    np.testing.assert_array_equal(d == 0, fits)
    # minimal: moving c one step towards z would push some q - c out of [-8, 7]
    c = z + d
    toward = c - np.sign(d)
    ok = (qg.max(1) - toward <= 7) & (qg.min(1) - toward >= -8)
    assert not (ok & (d != 0)).any()
    assert (np.abs(d) <= np.abs(8 - z)).all()


def test_zero_correction_values_and_fp16_limit():
    d = np.array([[0, 1, -3], [8, -8, 5]], np.int8)
    s = np.array([[0.01, 0.02, 0.0123], [0.5, 0.25, 0.003]], np.float16)
    got = zero_correction(d, s, 128)
    assert got.dtype == np.float16
    want = [[0.0, 128 * float(s[0, 1]), -384 * float(s[0, 2])], [512.0, -256.0, 640 * float(s[1, 2])]]
    np.testing.assert_array_equal(got, np.array(want, np.float64).astype(np.float16))
    with pytest.raises(ExportError, match="layers.0.o_proj: .* exceeds fp16"):  # 128 * 8 * 64.5 > 65504
        zero_correction(np.array([[8]], np.int8), np.array([[64.5]], np.float16), 128, name="layers.0.o_proj")


def test_zeros_are_eight_reads_only_the_packed_zeros():
    assert zeros_are_eight(np.full((2, 4), 0x88888888, np.uint32).view(np.int32))
    assert zeros_are_eight(np.full((2, 4), 0x77777777, np.int32), zero_offset=1)  # GPTQ v1 stores zero - 1
    words = np.full((2, 4), 0x88888888, np.uint32)
    words[1, 3] = 0x88888788
    assert not zeros_are_eight(words.view(np.int32))


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
    u, perm, d = repack_gptq(qweight, qzeros, g_idx, g)
    assert not d.any()
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
    u, perm, _ = repack_gptq(qweight, qzeros, None, g)
    np.testing.assert_array_equal(perm, np.arange(k))
    np.testing.assert_array_equal(u.astype(np.int64) - 8, (q.astype(np.int64) - z_stored[g_idx] - 1).T)
    u_derived, _, _ = repack_gptq(qweight, qzeros, None)  # group = K / G
    np.testing.assert_array_equal(u_derived, u)


def test_gptq_zero_offset_and_split():
    k, n, g = 128, 8, 64
    q = np.full((k, n), 8, dtype=np.uint8)
    z_stored = np.full((k // g, n), 7, dtype=np.uint8)
    qweight, qzeros = encode_gptq(q, z_stored)
    u1, _, d1 = repack_gptq(qweight, qzeros, None, g)  # v1: zero = 8
    assert (u1 == 8).all() and not d1.any()
    u0, _, d0 = repack_gptq(qweight, qzeros, None, g, zero_offset=0)  # v2: zero = 7
    assert (u0 == 9).all() and not d0.any()

    z_stored[1, 3] = 15  # v1 zero 16, beyond any nibble
    q[g:, 3] = 0          # 0 - 16 = -16, for the g channels of group 1
    q[0, 0] = 15          # 15 - 8 = 7: still fits
    qweight, qzeros = encode_gptq(q, z_stored)
    u, _, d = repack_gptq(qweight, qzeros, None, g)
    assert np.count_nonzero(d) == 1 and d[1, 3] == 8 - 16  # c = 8: q - c = -8 fits
    assert (u[3, g:] == 0).all() and u[0, 0] == 15


def test_gptq_desc_act_split_follows_the_permuted_groups():
    """Zeros far from 8 with a shuffled g_idx: the correction rows are the checkpoint's groups, and
    x[perm] through plugin + correction equals x through the exact weights."""
    rng = np.random.default_rng(24)
    k, n, g = 256, 16, 64
    g_idx = np.repeat(np.arange(k // g), g)
    rng.shuffle(g_idx)
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    z_stored = rng.integers(0, 16, (k // g, n)).astype(np.uint8)
    qweight, qzeros = encode_gptq(q, z_stored)
    u, perm, d = repack_gptq(qweight, qzeros, g_idx.astype(np.int32), g)
    assert d.any()
    scales = fp16_scales(rng, (k // g, n))
    w_true = ((q.astype(np.int64) - (z_stored.astype(np.int64)[g_idx] + 1)) * scales.astype(np.float64)[g_idx]).T
    w = dequant_plugin(pack_plugin(u), scales, n, k, g).astype(np.float64)
    w += np.repeat(d * scales.astype(np.float64), g, 0).T  # rows in the permuted order's groups
    np.testing.assert_array_equal(w, w_true[:, perm])


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
