"""INT4 checkpoint layouts -> the Int4GroupwiseGemmPlugin weight layout (contract quant.md §3.5-§3.8).

Every INT4 format ends in the same place: biased nibbles ``U[N, K]`` in ``[0, 15]`` (weight value
``U - 8``), packed by :func:`pack_plugin` into the plugin's int8 ``[N/2, K]`` buffer. The plugin has
no zero-point input, so asymmetric formats (AutoAWQ, GPTQ) are split exactly
(:func:`split_zero_points`): ``q - z = (U - 8) + d`` per group, ``U`` for the plugin and the small
integer ``d`` for a dense correction term (:func:`zero_correction`). Where every group already fits
``[-8, 7]``, ``d`` is zero and ``U = q - z + 8``, the plain fold. The reference clamps silently.

Plain numpy, one tensor at a time, so a streaming exporter can call it per linear.
"""

from __future__ import annotations

import numpy as np

from edgellm_core.errors import ExportError

# AutoAWQ GEMM: bit field f (bits 4f..4f+3) of a packed int32 holds channel 8c + AWQ_ORDER[f].
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
_AWQ_INVERSE = np.argsort(AWQ_ORDER)  # channel j within 8 lives in bit field _AWQ_INVERSE[j]


class Int4LayoutError(ExportError, ValueError):
    """An INT4 tensor has a shape/dtype the format or the plugin cannot take."""


def _fail(message: str, name: str | None) -> Int4LayoutError:
    return Int4LayoutError(f"{name}: {message}" if name else message)


def _check_plugin_shape(n: int, k: int, name: str | None = None) -> None:
    """The plugin packs 4 output rows x 64-wide K stripes: anything else has no layout."""
    if n <= 0 or k <= 0 or n % 4 or k % 64:
        raise _fail(f"INT4 plugin layout needs N % 4 == 0 and K % 64 == 0, got N={n}, K={k}", name)


def _as_u32(a: np.ndarray, what: str, name: str | None) -> np.ndarray:
    """Packed int32 words as uint32, so shifts of negative words do not sign-extend."""
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype not in (np.int32, np.uint32):
        raise _fail(f"{what} must be a 2-D int32 array, got {a.dtype} {list(a.shape)}", name)
    return a.view(np.uint32)


def _nibbles(words: np.ndarray) -> np.ndarray:
    """uint32 [..., C] -> uint8 [..., C, 8]; entry f = bit field f (bits 4f..4f+3)."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    return ((words[..., None] >> shifts) & 0xF).astype(np.uint8)


# --------------------------------------------------------------------------- plugin layout (§3.8)

def pack_plugin(u: np.ndarray, name: str | None = None) -> np.ndarray:
    """Biased nibbles ``U[N, K]`` (uint8 in [0, 15]) -> int8 ``[N/2, K]`` in the plugin layout.

    §3.8 in index form, per 4-row group ``nb`` and 64-wide K stripe ``t``:
    the stripe is two 32-blocks ``bb``; inside a block the column at offset ``8c + a`` goes to
    position ``4a + c`` (4x8 -> 8x4 transpose); int16 word ``r = 16*rr + 8*bb + a`` of the stripe
    holds row ``4nb + rr`` with nibble ``s = c``. Little-endian: byte 0 of a word is nibbles
    0|1<<4, byte 1 is 2|3<<4, so the bytes are built directly (no int16 round trip).
    All of it is one reshape/transpose, so an 8B model's weights pack in well under a second each.
    """
    u = np.asarray(u)
    if u.ndim != 2:
        raise _fail(f"INT4 nibbles must be 2-D [N, K], got shape {list(u.shape)}", name)
    n, k = u.shape
    _check_plugin_shape(n, k, name)
    if u.dtype != np.uint8:
        if not np.issubdtype(u.dtype, np.integer):
            raise _fail(f"INT4 nibbles must be integers, got {u.dtype}", name)
        if u.size and (u.min() < 0 or u.max() > 15):
            raise _fail("INT4 nibbles must lie in [0, 15]", name)
        u = u.astype(np.uint8)
    elif u.size and u.max() > 15:
        raise _fail("INT4 nibbles must lie in [0, 15]", name)
    # c = 2h + e: nibble pair (e = 0 low, 1 high) of byte h. Pair up first (contiguous, halves the
    # data), then one transpose: nb, rr, t, bb, h, a  ->  nb, t, rr, bb, a, h.
    v = u.reshape(n // 4, 4, k // 64, 2, 2, 2, 8)
    pairs = v[..., 0, :] | (v[..., 1, :] << 4)
    return np.ascontiguousarray(pairs.transpose(0, 2, 1, 3, 5, 4)).reshape(n // 2, k).view(np.int8)


def _plugin_source_index(k: int) -> tuple[np.ndarray, np.ndarray]:
    """For word ``j`` of a 4-row group and nibble ``s``: (row within the group, original K column).

    Straight from the §3.8 prose: word ``j = 64t + r`` takes row ``r // 16`` at permuted position
    ``64t + 4(r mod 16) + s``; permuted position ``p`` of a 32-block holds original offset
    ``8(p mod 4) + p // 4``.
    """
    j = np.arange(k)[:, None]
    s = np.arange(4)[None, :]
    t, r = j // 64, j % 64
    permuted = 64 * t + 4 * (r % 16) + s
    block, p = permuted // 32, permuted % 32
    original = 32 * block + 8 * (p % 4) + p // 4
    return np.broadcast_to(r // 16, original.shape), original


def unpack_plugin(packed: np.ndarray, n: int, k: int, name: str | None = None) -> np.ndarray:
    """Inverse of :func:`pack_plugin`: int8 ``[N/2, K]`` -> biased nibbles ``U[N, K]`` (uint8).

    Derived separately from the prose (index scatter, not the packer's transposes) so that tests
    comparing the two catch a mistake in either.
    """
    _check_plugin_shape(n, k, name)
    packed = np.asarray(packed)
    if packed.shape != (n // 2, k) or packed.dtype not in (np.int8, np.uint8):
        raise _fail(f"plugin INT4 weight must be int8 [{n // 2}, {k}], got {packed.dtype} {list(packed.shape)}",
                    name)
    # int8 [N/2, K] -> the int16 array [N/4, K] as little-endian byte pairs.
    pairs = packed.view(np.uint8).reshape(n // 4, k, 2)
    nib = np.empty((n // 4, k, 4), dtype=np.uint8)
    nib[..., 0], nib[..., 1] = pairs[..., 0] & 0xF, pairs[..., 0] >> 4
    nib[..., 2], nib[..., 3] = pairs[..., 1] & 0xF, pairs[..., 1] >> 4
    row, col = _plugin_source_index(k)
    u = np.empty((n // 4, 4, k), dtype=np.uint8)
    u[:, row, col] = nib
    return u.reshape(n, k)


# --------------------------------------------------------------------------- zero points

def split_zero_points(q: np.ndarray, z: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact split of asymmetric INT4 weights: ``(U [K, N] uint8, d [K/group, N] int8)``.

    ``q [K, N]`` holds contiguous groups of ``group`` rows, ``z [K/group, N]`` their zeros (any small
    integers: GPTQ v1 zeros reach 16). Per group and column, ``c`` is the value nearest ``z`` that
    keeps every ``q - c`` in the plugin's [-8, 7], i.e. in ``[qmax - 7, qmin + 8]`` (which always
    holds 8, so ``|d| <= |8 - z| <= 8``); ``U = q - c + 8`` and ``d = c - z``, hence
    ``q - z = (U - 8) + d`` exactly. ``d`` is zero wherever the group fits: there ``U`` is the
    plain fold, and a layer that fits everywhere needs no correction at all.
    """
    k, n = q.shape
    qg = q.astype(np.int16).reshape(k // group, group, n)
    z = np.asarray(z, dtype=np.int16)
    c = np.clip(z, qg.max(1) - 7, qg.min(1) + 8)
    u = (qg - c[:, None, :] + 8).astype(np.uint8).reshape(k, n)
    return u, (c - z).astype(np.int8)


def zero_correction(d: np.ndarray, scales: np.ndarray, group: int, name: str | None = None) -> np.ndarray:
    """fp16 ``[K/g, N]`` = ``group * d * scales``: what the graph multiplies the group *means* of x by.

    ``scales`` are the plugin's fp16 scales, so the term matches the plugin's weights; ``group * d *
    s`` is exact in fp32 (a power of two times at most 4 + 11 bits) and rounded once to fp16. Means
    rather than sums keep the activation side within fp16 (a mean never exceeds max |x|); the
    factor ``group`` moves to this side, which refuses when that overflows (scales beyond ~64).
    """
    c = np.float32(group) * d.astype(np.float32) * np.asarray(scales).astype(np.float32)
    with np.errstate(over="ignore"):
        out = c.astype(np.float16)
    if not np.isfinite(out).all():
        raise _fail(f"the zero-point correction (group size x (c - zero) x scale) exceeds fp16 "
                    f"(largest {float(np.abs(c).max()):g}); the scales are beyond any real checkpoint's", name)
    return out


def zeros_are_eight(qzeros: np.ndarray, zero_offset: int = 0) -> bool:
    """True when every packed zero is 8 (stored ``8 - zero_offset``), whatever the nibble order:
    then every ``q - z`` fits and the qweight need not be read to know it."""
    word = np.uint32((8 - zero_offset) * 0x11111111)
    return bool(np.all(np.asarray(qzeros).view(np.uint32) == word))


def _group_size(k: int, rows: int, group: int | None, what: str, name: str | None) -> int:
    """Check ``group`` against K and the zero/scale row count; derive it (K / rows) when None."""
    if rows <= 0 or k % rows:
        raise _fail(f"{what} has {rows} group rows, which does not divide K={k}", name)
    if group is None:
        return k // rows
    if group <= 0 or group * rows != k:
        raise _fail(f"group size {group} x {rows} {what} rows != K={k}", name)
    return group


# --------------------------------------------------------------------------- AutoAWQ GEMM (§3.6)

def _unpack_awq_words(words: np.ndarray) -> np.ndarray:
    """uint32 [R, N/8] in AutoAWQ order -> uint8 [R, N]."""
    nib = _nibbles(words)  # [R, C, field]
    return nib[..., _AWQ_INVERSE].reshape(words.shape[0], -1)


def unpack_autoawq(qweight: np.ndarray, qzeros: np.ndarray, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AutoAWQ GEMM ``qweight [K, N/8]``, ``qzeros [K/g, N/8]`` (int32) -> ``q [K, N]``, ``z [K/g, N]`` uint8.

    Eight nibbles per word along N, bit field f = channel ``8c + [0,2,4,6,1,3,5,7][f]`` for both.
    """
    qw, qz = _as_u32(qweight, "AutoAWQ qweight", name), _as_u32(qzeros, "AutoAWQ qzeros", name)
    if qz.shape[1] != qw.shape[1]:
        raise _fail(f"AutoAWQ qzeros {list(qz.shape)} and qweight {list(qw.shape)} disagree on N/8", name)
    return _unpack_awq_words(qw), _unpack_awq_words(qz)


def repack_autoawq(qweight: np.ndarray, qzeros: np.ndarray, group: int | None = None,
                   name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AutoAWQ GEMM -> (biased nibbles ``U[N, K]``, zero correction ``d [K/g, N]`` int8).

    ``U - 8 + d[k // g] == q - z`` exactly (:func:`split_zero_points`); ``d`` is all zero when every
    ``q - z`` fits [-8, 7]. ``group`` defaults to ``K / qzeros.shape[0]`` (what the reference uses);
    if given it must agree.
    """
    q, z = unpack_autoawq(qweight, qzeros, name)
    g = _group_size(q.shape[0], z.shape[0], group, "AutoAWQ qzeros", name)
    u, d = split_zero_points(q, z, g)
    return u.T.copy(), d


# --------------------------------------------------------------------------- GPTQ (§3.7)

def unpack_gptq(qweight: np.ndarray, qzeros: np.ndarray, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ ``qweight [K/8, N]``, ``qzeros [G, N/8]`` (int32) -> ``q [K, N]``, stored ``z [G, N]`` uint8.

    Sequential nibbles: qweight packs 8 input channels (along K), qzeros 8 output channels (along N).
    The zeros are returned as stored (v1 files hold ``zero - 1``; :func:`repack_gptq` adds it back).
    """
    qw, qz = _as_u32(qweight, "GPTQ qweight", name), _as_u32(qzeros, "GPTQ qzeros", name)
    if qz.shape[1] * 8 != qw.shape[1]:
        raise _fail(f"GPTQ qzeros {list(qz.shape)} does not cover the N={qw.shape[1]} of qweight", name)
    q = _nibbles(qw).transpose(0, 2, 1).reshape(qw.shape[0] * 8, qw.shape[1])
    z = _nibbles(qz).reshape(qz.shape[0], qz.shape[1] * 8)
    return q, z


def gptq_perm(g_idx: np.ndarray, group: int, name: str | None = None) -> np.ndarray:
    """Input-channel order that makes every group contiguous: int64 ``[K]``.

    The concatenation over groups 0..G-1 (G = K / group) of the ascending channel indices with that
    group id, i.e. a stable argsort. The plugin then reads group ``k // group`` for position k, which
    is only the checkpoint's group when every group has exactly ``group`` members: checked here
    (the reference does not), as is ``0 <= g_idx < G``.
    """
    g_idx = np.asarray(g_idx)
    if g_idx.ndim != 1 or not np.issubdtype(g_idx.dtype, np.integer):
        raise _fail(f"GPTQ g_idx must be a 1-D integer array, got {g_idx.dtype} {list(g_idx.shape)}", name)
    k = g_idx.shape[0]
    if group <= 0 or k == 0 or k % group:
        raise _fail(f"GPTQ group size {group} does not divide K={k}", name)
    n_groups = k // group
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise _fail(f"GPTQ g_idx values must lie in [0, {n_groups}), got [{g_idx.min()}, {g_idx.max()}]", name)
    sizes = np.bincount(g_idx, minlength=n_groups)
    bad = np.flatnonzero(sizes != group)
    if bad.size:
        raise _fail(f"GPTQ g_idx must give every group exactly {group} channels; {bad.size} groups do not "
                    f"(group {bad[0]} has {sizes[bad[0]]})", name)
    return np.argsort(g_idx, kind="stable").astype(np.int64)


def repack_gptq(qweight: np.ndarray, qzeros: np.ndarray, g_idx: np.ndarray | None, group: int | None = None,
                zero_offset: int = 1, name: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ -> (biased nibbles ``U[N, K]`` in permuted K order, ``perm`` int64 ``[K]``, ``d [G, N]`` int8).

    ``U[:, j] - 8 + d[j // group] == q[perm[j]] - (z_stored[g_idx[perm[j]]] + zero_offset)``: the graph
    gathers the activation as ``x[..., perm]``, after which every group is contiguous and group
    ``j // group`` is the checkpoint's group (:func:`gptq_perm`). ``zero_offset`` is 1 for GPTQ v1
    files (stored ``zero - 1``), 0 for v2. ``g_idx=None`` means ``arange(K) // group``. ``d`` is all
    zero when every ``q - z`` fits [-8, 7].
    """
    q, z = unpack_gptq(qweight, qzeros, name)
    k = q.shape[0]
    g = _group_size(k, z.shape[0], group, "GPTQ qzeros", name)
    if g_idx is None:
        g_idx = np.arange(k) // g
    elif np.asarray(g_idx).shape != (k,):
        raise _fail(f"GPTQ g_idx must have shape [{k}], got {list(np.asarray(g_idx).shape)}", name)
    perm = gptq_perm(g_idx, g, name)
    u, d = split_zero_points(q[perm], z.astype(np.int16) + np.int16(zero_offset), g)
    return u.T.copy(), perm, d


# --------------------------------------------------------------------------- ModelOpt W4A16 (§3.5)

def repack_modelopt_w4a16(weight: np.ndarray, name: str | None = None) -> np.ndarray:
    """ModelOpt ``weight [N/2, K]`` uint8 -> biased nibbles ``U[N, K]``; lossless.

    Byte ``[i, k]`` holds two's-complement nibbles of rows 2i (low) and 2i+1 (high). For a nibble
    ``u`` with signed value ``s``, ``(u + 8) mod 16 == s + 8``, i.e. flip bit 3.
    """
    w = np.asarray(weight)
    if w.ndim != 2 or w.dtype not in (np.uint8, np.int8):
        raise _fail(f"ModelOpt W4A16 weight must be uint8 [N/2, K], got {w.dtype} {list(w.shape)}", name)
    w = w.view(np.uint8)
    u = np.empty((w.shape[0], 2, w.shape[1]), dtype=np.uint8)
    u[:, 0], u[:, 1] = w & 0xF, w >> 4
    return (u ^ 8).reshape(2 * w.shape[0], w.shape[1])
