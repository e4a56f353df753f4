"""Atomic output directories: build in a temporary sibling, rename into place at the end."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from edgellm_core.errors import EnvironmentProblem, ExportError

from . import interrupts


def lock_path_for(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def output_lock(final: Path):
    """Hold an exclusive lock on `final` for the whole export; a second exporter fails clearly.

    The lock file exists only while it is held: it is unlinked (still locked)
    on release. A process that opened the path just before that unlink and
    locks the orphaned inode afterwards sees that the path no longer names its
    file and starts over, so two holders can never coexist. A SIGKILLed
    holder's file stays, unlocked, until the next run on OUT takes and removes it.
    """
    lock_path = lock_path_for(final)
    fd = _acquire(lock_path, final)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # while still locked: nobody can hold this inode after us
        os.close(fd)  # closing releases the lock


def _acquire(lock_path: Path, final: Path) -> int:
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ExportError(f"cannot create the output lock file ({e.strerror})", lock_path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise EnvironmentProblem(
                f"another export (pid {holder}) is writing to this output right now; wait for it to "
                "finish or choose another directory", final) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            here, held = os.stat(lock_path), os.fstat(fd)
            same = (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder had just removed: lock the path anew


def _clean_stale(final: Path) -> None:
    """Remove what a killed export left behind (called under the lock, so nothing is live)."""
    parent = final.parent
    for p in parent.glob(f".{final.name}.old-*"):
        if not final.exists():  # killed between the two renames: the old export is the output
            os.rename(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(p, ignore_errors=True)


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
    with output_lock(final):
        _clean_stale(final)
        tmp = parent / f".{final.name}.partial-{os.getpid()}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise EnvironmentProblem(f"cannot create a directory next to the output ({e.strerror})", tmp) from None
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            interrupts.check()  # a signal during the last steps: abort rather than publish
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap_into_place(tmp, final)


def _swap_into_place(tmp: Path, final: Path) -> None:
    parent = final.parent
    old = parent / f".{final.name}.old-{os.getpid()}"
    with interrupts.deferred():
        _rename_pair(tmp, final, old)
    shutil.rmtree(old, ignore_errors=True)


def _rename_pair(tmp: Path, final: Path, old: Path) -> None:
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
        raise EnvironmentProblem(f"cannot move the finished export into place ({e.strerror})", final) from None
