"""Streaming fp16 conversion: exact at every block boundary, loud on values fp16 cannot hold."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from edgellm_core.errors import ExportError
from edgellm_core.safetensors_file import SafetensorsFile
from edgellm_export.checkpoint.reader import TensorRef
from edgellm_export.models import weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [1 << 10, 3000, 1 << 20])
@pytest.mark.parametrize("shape", [(777, 33), (300, 257), (1200, 300), (5,)])  # (1200, 300): blocked transposes
def test_to_fp16_matches_torch(tmp_path, monkeypatch, dtype, chunk_bytes, shape):
    monkeypatch.setattr(weights, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(weights, "_TILE_BYTES", chunk_bytes)
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    ref = TensorRef(SafetensorsFile(tmp_path / "m.safetensors"), "w")
    assert torch.equal(weights.to_fp16(ref), t.to(torch.float16))
    if len(shape) == 2:
        assert torch.equal(weights.to_fp16(ref, transpose=True), t.t().to(torch.float16))
    # A row slice of a fused tensor converts the same way.
    sliced = TensorRef(ref.file, "w", (2, shape[0] - 1))
    assert torch.equal(weights.to_fp16(sliced), t[2 : shape[0] - 1].to(torch.float16))


@pytest.mark.parametrize("value,phrase", [(1e6, "beyond fp16's range"), (float("nan"), "inf or NaN")])
def test_values_fp16_cannot_hold_are_refused(tmp_path, value, phrase):
    t = torch.zeros(4, 8, dtype=torch.bfloat16)
    t[2, 3] = value
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    ref = TensorRef(SafetensorsFile(tmp_path / "m.safetensors"), "w")
    with pytest.raises(ExportError, match=phrase) as e:
        weights.to_fp16(ref, transpose=True)
    assert "m.safetensors" in str(e.value)


@pytest.mark.parametrize("value,finite", [(65519.99, True), (65520.0, False), (-65520.0, False)])
def test_fp16_overflow_edge_is_found_in_blocked_transposes(tmp_path, value, finite):
    """The transposed path checks each source block against 65520 (what rounds to inf), not 65504."""
    t = torch.zeros(1200, 300, dtype=torch.float32)
    t[700, 123] = value
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    ref = TensorRef(SafetensorsFile(tmp_path / "m.safetensors"), "w")
    if finite:
        assert torch.equal(weights.to_fp16(ref, transpose=True), t.t().to(torch.float16))
    else:
        with pytest.raises(ExportError, match="beyond fp16's range"):
            weights.to_fp16(ref, transpose=True)
        clamped = weights.to_fp16(ref, transpose=True, clamp=True)
        assert float(clamped[123, 700]) == (65504.0 if value > 0 else -65504.0)
