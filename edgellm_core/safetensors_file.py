"""One safetensors file, read lazily: header parsed up front, tensors mapped on demand.

The file is memory-mapped once. A tensor is returned as a zero-copy torch view
of the mapping; callers convert it (fp16, transpose) into their own buffer and
then call `release()` so the kernel drops the mapped pages from our resident
set. Without that, reading a whole shard through one mapping shows up as RSS.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgellm_core.errors import ExportError

# safetensors dtype string -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
_MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsFile:
    """Header of one .safetensors file plus on-demand mapped access."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._stat = self._identity()
        self.tensors = self._read_header()

    def _identity(self):
        try:
            st = self.path.stat()
        except OSError:
            return None  # reported by _read_header with a proper message
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def check_unchanged(self) -> None:
        if self._identity() != self._stat:
            raise ExportError("changed while it was being read (modified, replaced or truncated); "
                              "the export would mix two versions of the weights, so it was discarded",
                              self.path)

    def _fail(self, problem: str) -> ExportError:
        return ExportError(f"is not a valid safetensors file: {problem}", self.path)

    def _read_header(self) -> dict[str, TensorInfo]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise self._fail("the file is shorter than its 8-byte header length")
                (hlen,) = struct.unpack("<Q", raw_len)
                if hlen > _MAX_HEADER or 8 + hlen > size:
                    raise self._fail(f"header length {hlen} does not fit in a {size}-byte file")
                header = json.loads(f.read(hlen))
        except FileNotFoundError:
            raise ExportError("safetensors file is missing", self.path) from None
        except OSError as e:
            raise ExportError(f"cannot read safetensors file ({e.strerror})", self.path) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"its JSON header does not parse ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("its header is not a JSON object")
        base = 8 + hlen
        out: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"entry {name!r} lacks dtype/shape/data_offsets") from None
            if dtype not in DTYPES:
                raise self._fail(f"tensor {name!r} has unsupported dtype {dtype}")
            info = TensorInfo(name, dtype, shape, base + begin, base + end)
            if begin < 0 or any(d < 0 for d in shape):  # would read the header, or break view()
                raise self._fail(f"tensor {name!r} has a negative offset or dimension")
            if info.nbytes != info.numel * DTYPES[dtype][1] or begin > end:
                raise self._fail(f"tensor {name!r}: byte range does not match shape {list(shape)}")
            if info.end > size:
                raise self._fail(
                    f"tensor {name!r} ends at byte {info.end} but the file has {size} bytes "
                    "(truncated download?)"
                )
            out[name] = info
        # Tensors may not share bytes: an overlap means a crafted or corrupt header.
        spans = sorted((t.start, t.end, t.name) for t in out.values() if t.nbytes)
        for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise self._fail(f"tensors {n0!r} and {n1!r} overlap (bytes {s1}..{e0})")
        return out

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return self._map

    def view(self, name: str):
        """Zero-copy torch tensor over the mapped bytes (read-only: do not modify)."""
        import torch

        info = self.tensors[name]
        dtype = getattr(torch, DTYPES[info.dtype][0])
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._mapping()
        # A file shrunk under us would turn reads of the mapping into SIGBUS.
        if os.fstat(self._fd).st_size < info.end:
            raise ExportError("was truncated while it was being read", self.path)
        with warnings.catch_warnings():
            # The mapping is read-only on purpose; we never write through the view.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start)
        return t.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of one tensor from our resident set."""
        info = self.tensors[name]
        self.release_range(info.start, info.end)

    def release_range(self, start: int, end: int) -> None:
        """Drop mapped pages covering bytes [start, end) (rounded out to pages)."""
        if self._map is None or end <= start or not hasattr(self._map, "madvise"):
            return
        first = (start // _PAGE) * _PAGE
        # Pages are file-backed and read-only: dropping them only costs a re-read.
        self._map.madvise(mmap.MADV_DONTNEED, first, min(end, len(self._map)) - first)

    def close(self) -> None:
        # Views into the mapping may still be alive (e.g. held by a caller); in
        # that case the mapping is closed when they are collected.
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
