"""Declaring checkpoint tensors as graph initializers, checked against the config up front.

A `WeightSource` validates names and shapes from safetensors headers only, so a
missing or mis-shaped tensor is reported before anything is written. The bytes
are produced later, one tensor at a time, when the weight writer asks.
"""

from __future__ import annotations

import logging

from edgellm_core.errors import ExportError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, GraphBuilder

from ..checkpoint.reader import Checkpoint, TensorRef

log = logging.getLogger(__name__)
FP16_MAX = 65504.0
_FP16_OVERFLOW = 65520.0  # the smallest magnitude that rounds to inf in fp16


_CHUNK_BYTES = 32 << 20  # convert big tensors in slices so source pages never pile up
_TILE_BYTES = 4 << 20  # transposing conversion: a row block and its transpose stay in L2/L3
# ATen transposes a 2-D tensor into a contiguous one of the same dtype with a blocked, cache-friendly
# loop only from this many elements on (copy_transpose_valid); below it a strided copy is used, which is
# fine for small tensors.
_BLOCKED_TRANSPOSE_MIN = 360 * 360


def to_fp16(ref: TensorRef, transpose: bool = False, clamp: bool = False):
    """Read one tensor from the mapping into a new contiguous fp16 torch tensor (`transpose`: `[in, out]`).

    Works in row blocks and drops each block's mapped pages right after use, so
    the resident cost is the fp16 result plus one block, not result + source.
    """
    import torch

    src = ref.view()
    if src.dim() == 0:
        src = src.reshape(1)
    if transpose:
        return _to_fp16_transposed(ref, src, clamp)
    out = torch.empty(tuple(src.shape), dtype=torch.float16)
    rows = src.shape[0]
    step = max(1, _CHUNK_BYTES // max(1, ref.nbytes // max(rows, 1)))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out[r0:r1].copy_(src[r0:r1])
        if src.dtype != torch.float16 and src.is_floating_point():
            check_fp16_range(ref, src[r0:r1], out[r0:r1], clamp)
        ref.release_rows(r0, r1)
    return out.reshape(ref.shape)


def _word_dtype(src):
    """The widest integer type whose elements pack whole source elements along a row (8, else 4
    bytes), or None: transposing w-element words moves w values per ATen transpose step."""
    import torch

    cols, size = src.shape[1], src.element_size()
    offset = src.storage_offset() * size  # safetensors only promises 2-byte alignment of bf16 data
    for word, dtype in ((8, torch.int64), (4, torch.int32)):
        if word > size and cols % (word // size) == 0 and offset % word == 0:
            return dtype, word // size
    return None, 1


def _to_fp16_transposed(ref: TensorRef, src, clamp: bool):
    """`[out, in]` -> contiguous fp16 `[in, out]`, a block of rows at a time.

    A cast through a transposed view walks the source column by column (cache-hostile,
    4x the cost of a plain cast). Instead each row block is transposed as words of w
    elements (w = 4 for bf16: an int64 holds 4 neighbouring columns) into a cache-sized tile
    with ATen's blocked transpose, then cast into the result while the w columns of each
    word are pulled apart. Both passes stay in cache; the range check reads the tile there too.
    Measured against the floor's plain cast (benchmarks/convert.py): within ~1.2x.
    """
    import torch

    rows, cols = src.shape
    out = torch.empty((cols, rows), dtype=torch.float16)
    word, w = _word_dtype(src)
    step = max(8, _TILE_BYTES // max(1, cols * src.element_size()), -(-_BLOCKED_TRANSPOSE_MIN * w // max(cols, 1)))
    tile = torch.empty(cols * min(step, rows), dtype=src.dtype)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        if word is not None:
            words = tile.view(word)[: cols // w * n].view(cols // w, n)
            words.copy_(src[r0:r1].view(word).t())  # words[j, r] = src[r0 + r, w*j : w*j + w]
            block = tile[: cols * n]
            parts = block.view(cols // w, n, w).permute(0, 2, 1)  # [cols/w, w, n]
            dst = out.view(cols // w, w, rows)[:, :, r0:r1]
            dst.copy_(parts)
            dst = out[:, r0:r1]
        else:
            block = tile[: cols * n].view(cols, n)
            block.copy_(src[r0:r1].t())
            dst = out[:, r0:r1]
            dst.copy_(block)
        if src.dtype != torch.float16 and src.is_floating_point():
            # On the cache-hot tile: a value casts to a finite fp16 iff it is finite and
            # |x| < 65520 (round-to-nearest-even sends 65520 up to inf). NaN fails both tests.
            lo, hi = torch.aminmax(block)
            if not (float(lo) > -_FP16_OVERFLOW and float(hi) < _FP16_OVERFLOW):
                check_fp16_range(ref, src[r0:r1], dst, clamp)  # names the problem, or clamps
        ref.release_rows(r0, r1)
    return out


def check_fp16_range(ref: TensorRef, src, converted, clamp: bool = False) -> None:
    import torch

    # min/max is one fast pass; inf or nan in either means the cast went wrong
    # (bf16/fp32 beyond fp16's range become inf) or the checkpoint holds them.
    lo, hi = torch.aminmax(converted)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    if not bool(torch.isfinite(src).all()):
        raise ExportError(f"tensor {ref.key!r} contains inf or NaN values", ref.file.path)
    big = float(src.float().abs().max())
    if clamp:
        converted.clamp_(-FP16_MAX, FP16_MAX)
        log.warning("%s: tensor %r holds values up to %g; clamped to +-%g (--clamp-fp16)",
                    ref.file.path, ref.key, big, FP16_MAX)
        return
    raise ExportError(
        f"tensor {ref.key!r} holds values up to {big:g}, beyond fp16's range "
        f"(+-{FP16_MAX:g}); the Edge-LLM runtime needs fp16 weights and a plain cast "
        "would turn them into inf (pass --clamp-fp16 to clamp them with a warning)",
        ref.file.path,
    )


class WeightSource:
    def __init__(self, ckpt: Checkpoint, g: GraphBuilder, clamp: bool = False):
        self.ckpt = ckpt
        self.g = g
        self.clamp = clamp
        self.used: set[str] = set()  # checkpoint tensor names the graph reads

    def ref(self, name: str, shape: tuple[int, ...]) -> TensorRef:
        ref = self.ckpt.ref(name)
        self.used.add(name)
        if ref.dtype not in ("F16", "BF16", "F32"):
            raise ExportError(
                f"tensor {ref.key!r} has dtype {ref.dtype}; an unquantized export needs "
                "F16, BF16 or F32 weights (is the checkpoint quantized without metadata?)",
                ref.file.path,
            )
        if tuple(ref.shape) != tuple(shape):
            raise ExportError(
                f"tensor {ref.key!r} has shape {list(ref.shape)} but the config implies "
                f"{list(shape)} for {name}",
                ref.file.path,
            )
        return ref

    def linear_weight(self, name: str, out_features: int, in_features: int) -> str:
        """`[out, in]` checkpoint weight as a pre-transposed `[in, out]` fp16 initializer."""
        ref = self.ref(name, (out_features, in_features))
        return self.g.weight(f"{name}.T", FLOAT16, (in_features, out_features),
                             lambda: to_fp16(ref, transpose=True, clamp=self.clamp), tag=ref.where())

    def stacked_linear_weights(self, name: str, parts: list[str], out_features: int, in_features: int) -> str:
        """`[out, in]` weights of E experts as one `[E, in, out]` fp16 initializer `name` (each part
        converted and transposed as linear_weight does, then stacked at write time)."""
        import torch

        refs = [self.ref(p, (out_features, in_features)) for p in parts]

        def produce():
            out = torch.empty((len(refs), in_features, out_features), dtype=torch.float16)
            for e, ref in enumerate(refs):
                out[e] = to_fp16(ref, transpose=True, clamp=self.clamp)
            return out

        return self.g.weight(name, FLOAT16, (len(refs), in_features, out_features), produce,
                             tag=f"{refs[0].where()} .. {refs[-1].where()}")

    def vector(self, name: str, size: int, *, plus_one: bool = False) -> str:
        """An fp16 vector; `plus_one`: the checkpoint stores w of a norm applied as (1 + w) (Qwen3.5), so
        the initializer holds 1 + w, added in fp32 before the one rounding to fp16."""
        ref = self.ref(name, (size,))
        if not plus_one:
            return self.g.weight(name, FLOAT16, (size,), lambda: to_fp16(ref, clamp=self.clamp), tag=ref.where())

        def produce():
            out = (ref.view().float() + 1.0).half()
            check_fp16_range(ref, ref.view(), out, self.clamp)
            return out

        return self.g.weight(f"{name}+1", FLOAT16, (size,), produce, tag=ref.where())

    def tensor(self, name: str, shape: tuple[int, ...]) -> str:
        """Any checkpoint tensor as an fp16 initializer of the same shape (e.g. a conv weight)."""
        ref = self.ref(name, shape)
        return self.g.weight(name, FLOAT16, shape, lambda: to_fp16(ref, clamp=self.clamp).reshape(shape),
                             tag=ref.where())

    def vector_f32(self, name: str, size: int, transform=None, as_name: str | None = None) -> str:
        """An fp32 vector, for the inputs the runtime's kernels read in fp32 (A_log; Mamba2's A, which is
        `transform`ed from A_log in fp32 and named `as_name`)."""
        ref = self.ref(name, (size,))

        def produce():
            t = ref.view().float().clone()
            return transform(t) if transform is not None else t

        return self.g.weight(as_name or name, FLOAT, (size,), produce, tag=ref.where())

    # -- quantized tensors: passed through or repacked, never silently reinterpreted -----------
    def quant_ref(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None, what: str) -> TensorRef:
        """A checkpoint tensor of a quantized layer, checked for dtype and shape from its header.

        Scalars may be stored 0-D or with one element; `shape=()` accepts both.
        """
        if not self.ckpt.has(name):
            raise ExportError(f"tensor {name!r} ({what}) is missing from the checkpoint", self.ckpt.path)
        ref = self.ckpt.ref(name)
        self.used.add(name)
        if ref.dtype not in dtypes:
            raise ExportError(f"tensor {ref.key!r} ({what}) has dtype {ref.dtype}; expected "
                              f"{' or '.join(dtypes)}", ref.file.path)
        ok = tuple(ref.shape) in ((), (1,)) if shape == () else shape is None or tuple(ref.shape) == tuple(shape)
        if not ok:
            raise ExportError(f"tensor {ref.key!r} ({what}) has shape {list(ref.shape)}; expected "
                              f"{list(shape)}", ref.file.path)
        return ref

    def passthrough(self, name: str, dtype: int, shape: tuple[int, ...], ref: TensorRef, transform=None) -> str:
        """An initializer holding the checkpoint tensor's bytes (optionally transformed), read at write time."""
        def produce():
            t = ref.view().clone()
            ref.release()
            return transform(t) if transform else t
        return self.g.weight(name, dtype, shape, produce, tag=ref.where())
