"""Opt-in conversion of pickled `.bin` / `.pt` weights, with torch's weights-only unpickler.

Never used unless asked for (`--convert-pickle`). `torch.load(weights_only=True)`
only rebuilds tensors and plain containers; a pickle that asks for anything else
(e.g. a callable, the classic code-execution trick) is rejected by torch before
it runs. Each file becomes a temporary safetensors file, one at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgellm_core.errors import ExportError

log = logging.getLogger(__name__)


def convert_pickled(files: list[Path], scratch: Path) -> dict[str, Path]:
    """Convert each pickled file to `scratch/<name>.safetensors`; returns name -> new path."""
    import torch
    from safetensors.torch import save_file

    out = {}
    for path in files:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001  (the unpickler's refusals come in many types)
            raise ExportError(f"refused by the weights-only unpickler: {str(e).splitlines()[0][:300]}",
                              path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ExportError("does not hold a flat name -> tensor dictionary", path)
        target = scratch / (path.name + ".safetensors")
        # Tied or shared storages must be separate for safetensors.
        save_file({k: v.contiguous().clone() for k, v in obj.items()}, str(target))
        del obj
        log.warning("%s: converted pickled weights with torch's weights-only loader", path)
        out[target.name] = target
    return out
