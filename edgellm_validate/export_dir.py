"""Finding the LLM component of an export directory: the one place that knows the layout."""

from __future__ import annotations

import os
from pathlib import Path

from edgellm_core.errors import ExportError

GOLDEN_BUNDLE = Path("golden") / "bundle.json"


def find_llm_dir(out_dir: str | os.PathLike, *, need: tuple[str | Path, ...] = ()) -> Path:
    """OUT/llm (or OUT itself when it holds model.onnx directly), checked to hold each file in `need`.

    A missing golden bundle gets its own explanation (the export was made with --no-golden)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise ExportError("does not exist; give the OUT directory written by `edgellm export`", out_dir)
    for cand in (out_dir / "llm", out_dir):
        if (cand / "model.onnx").is_file():
            for name in need:
                if (cand / name).is_file():
                    continue
                if Path(name) == GOLDEN_BUNDLE:
                    raise ExportError("the export has no golden bundle (exported with --no-golden?)", cand / name)
                raise ExportError(f"is not a complete export: {name} is missing next to model.onnx "
                                  "(re-run `edgellm export`)", cand)
            return cand
    raise ExportError("not an export directory: no llm/model.onnx inside (give the OUT directory written by "
                      "`edgellm export`)", out_dir)
