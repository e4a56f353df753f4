"""embedding.safetensors: the token-embedding table the runtime looks tokens up in.

fp16 `embedding [V, H]` by default; with fp8, `embedding` F8_E4M3 plus
`embedding_scale` F32 `[V, H/128]`, one scale per row and block of 128
channels: scale = max(amax, 1e-4) / 448, value = clamp(x / scale, +-448).
Rows are converted and written in slices, never the whole table at once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edgellm_core.errors import ExportError
from edgellm_core.ops.schemas import FP8_E4M3_MAX

from .. import interrupts
from ..checkpoint.reader import TensorRef
from ..models.weights import check_fp16_range
from ..stream_writer import StreamWriter

FP8_BLOCK = 128
_ROWS_PER_SLICE = 4096


def _header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    meta, offset = {}, 0
    for name, dtype, shape, nbytes in entries:
        meta[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_embedding(ref: TensorRef, path: Path, *, writer: StreamWriter, fp8: bool = False,
                    clamp: bool = False) -> None:
    """Write the sidecar; the fp16 table goes through `writer` (written and hashed beside the
    conversion of the next rows; its digest lands in `writer.digests`)."""
    import torch

    vocab, hidden = ref.shape
    src = ref.view()
    if not fp8:
        fd = writer.open(path)
        header = _header([("embedding", "F16", [vocab, hidden], vocab * hidden * 2)])
        writer.write(fd, 0, header)
        offset = len(header)
        for r0 in range(0, vocab, _ROWS_PER_SLICE):
            interrupts.check()
            block = src[r0 : r0 + _ROWS_PER_SLICE]
            half = block.to(torch.float16)
            check_fp16_range(ref, block, half, clamp)
            data = half.view(-1).view(torch.uint8).numpy()
            writer.write(fd, offset, data)
            offset += data.nbytes
            ref.release_rows(r0, r0 + block.shape[0])
        writer.close(fd, offset)
        return
    with open(path, "wb") as f:
        if hidden % FP8_BLOCK:
            raise ExportError(
                f"--fp8-embedding needs hidden_size divisible by {FP8_BLOCK} (the runtime's "
                f"scale block); this model has {hidden}",
                ref.file.path,
            )
        groups = hidden // FP8_BLOCK
        f.write(_header([
            ("embedding_scale", "F32", [vocab, groups], vocab * groups * 4),
            ("embedding", "F8_E4M3", [vocab, hidden], vocab * hidden),
        ]))
        scale_pos = f.tell()
        data_pos = scale_pos + vocab * groups * 4
        for r0 in range(0, vocab, _ROWS_PER_SLICE):
            interrupts.check()
            block = src[r0 : r0 + _ROWS_PER_SLICE].float().view(-1, groups, FP8_BLOCK)
            scale = block.abs().amax(dim=-1).clamp_min(1e-4) / FP8_E4M3_MAX
            q = (block / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
            f.seek(scale_pos + r0 * groups * 4)
            f.write(scale.numpy().astype("<f4").tobytes())
            f.seek(data_pos + r0 * hidden)
            f.write(q.view(torch.uint8).numpy().tobytes())
            ref.release_rows(r0, r0 + block.shape[0])
