"""Scale tensors the runtime wants in a narrower dtype than the checkpoint stores them."""

from __future__ import annotations

import logging

from edgellm_core.errors import ExportError

log = logging.getLogger(__name__)


def to_fp16_scale(ref, what: str):
    """fp32 scale(s) -> fp16, as the runtime's graphs carry them (quant.md §3.2, §3.5).

    Refused when a scale is not finite and positive or does not survive the cast (0 or inf in
    fp16); a warning when fp16 subnormals cost more than 0.1% of its value.
    """
    import torch

    src = ref.view().float().clone()
    ref.release()
    if not bool(torch.isfinite(src).all()) or bool((src <= 0).any()):
        raise ExportError(f"{what} {ref.key!r} holds a non-positive or non-finite scale", ref.file.path)
    out = src.half()
    if not bool(torch.isfinite(out).all()) or bool((out == 0).any()):
        raise ExportError(f"{what} {ref.key!r} holds scales outside fp16's range (min {float(src.min()):g}, "
                          f"max {float(src.max()):g}); the runtime needs them in fp16", ref.file.path)
    rel = float(((out.float() - src).abs() / src).max())
    if rel > 1e-3:
        log.warning("%s: %s %r loses up to %.2g%% of its value in fp16 (the runtime's scale dtype)",
                    ref.file.path, what, ref.key, rel * 100)
    return out


def checked_fp32(ref, what: str):
    import torch

    src = ref.view().float().clone()
    ref.release()
    if not bool(torch.isfinite(src).all()) or bool((src < 0).any()):
        raise ExportError(f"{what} {ref.key!r} holds a negative or non-finite scale", ref.file.path)
    return src
