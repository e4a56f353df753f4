"""Atomic output directories: build in a temporary sibling, rename into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import ExportError


@contextlib.contextmanager
def atomic_output_dir(final: Path):
    """Yield a fresh temporary sibling of `final`; on success it replaces `final`.

    On any error (or Ctrl-C) the temporary directory is removed and an existing
    `final` is left untouched.
    """
    final = Path(final).absolute()
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output's parent directory ({e.strerror})", parent) from None
    if final.exists() and not final.is_dir():
        raise ExportError("the output path exists and is not a directory", final)
    # Replacing OUT deletes what was there: only ever an earlier export (it has
    # llm/) or an empty directory, never e.g. the checkpoint itself or its parent.
    if final.is_dir() and not (final / "llm").is_dir() and any(final.iterdir()):
        raise ExportError(
            "the output directory exists, is not empty and does not look like an earlier export "
            "(no llm/ inside); refusing to replace it. Choose a new or empty directory.",
            final,
        )
    tmp = parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"cannot create a directory next to the output ({e.strerror})", tmp) from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = parent / f".{final.name}.old-{os.getpid()}"
    moved = False
    try:
        if final.exists():
            os.rename(final, old)
            moved = True
        os.rename(tmp, final)
    except OSError as e:  # put the previous output back; leave no partial sibling
        if moved:
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot move the finished export into place ({e.strerror})", final) from None
    shutil.rmtree(old, ignore_errors=True)
