"""File digests: sha256, and a cache that skips re-reading files whose stat() has not changed.

A cached digest is trusted while the file's (dev, inode, size, mtime_ns, ctime_ns) is unchanged. ctime is
in the key because nobody can set it: any write, and os.utime itself, move it to "now". "Racy" entries, a
file changed within RACY_WINDOW_NS of the moment it was hashed, could change again within the same
timestamp tick without their key changing (ext4 ticks are a few ms, FAT's 2 s), so such an entry is never
trusted and the file is hashed again on the next check (once; then it is old enough). Filesystems that
renumber inodes or devices miss the cache and re-hash: slow, never wrong. Torch-free (devices use it).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from edgellm_core.errors import ExportError

RACY_WINDOW_NS = 2_000_000_000
_KEY = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}



class DigestCache:
    """sha256 of files, reused while the file's (dev, inode, size, mtime_ns, ctime_ns) is unchanged and the
    entry is not racy. `hashed` lists the files actually read (for logs and tests)."""

    def __init__(self, entries: Mapping | None = None, *, racy_window_ns: int = RACY_WINDOW_NS,
                 clock: Callable[[], int] = time.time_ns):
        self.entries: dict[str, dict] = {}
        for path, e in (entries or {}).items():
            if isinstance(e, dict) and all(isinstance(e.get(k), int) for k in (*_KEY, "hashed_at_ns")) \
                    and isinstance(e.get("sha256"), str):
                self.entries[path] = dict(e)
        self.racy_window_ns = racy_window_ns
        self.clock = clock
        self.used: set[str] = set()
        self.hashed: list[str] = []

    def _trusted(self, entry: dict, key: dict) -> bool:
        if any(entry[k] != key[k] for k in _KEY):
            return False
        return max(entry["mtime_ns"], entry["ctime_ns"]) < entry["hashed_at_ns"] - self.racy_window_ns

    def digest(self, path: str | Path, *, known: str | None = None) -> str:
        """The file's sha256. `known`: a digest computed while the file was written (e.g. manifest.json's),
        taken instead of a read now; its entry is marked racy, so the next check reads the file once."""
        p = os.path.abspath(path)
        self.used.add(p)
        key = _stat_key(os.stat(p))
        entry = self.entries.get(p)
        if entry is not None and self._trusted(entry, key):
            return entry["sha256"]
        started = self.clock()
        if known is not None:  # not read: mark the entry racy so that the next check reads the file once
            digest, started = known, max(key["mtime_ns"], key["ctime_ns"])
        else:
            digest = sha256_file(Path(p))
            self.hashed.append(p)
            if _stat_key(os.stat(p)) != key:
                raise ExportError("changed while it was being hashed; wait until whatever writes it is done",
                                  p)
        self.entries[p] = {**key, "sha256": digest, "hashed_at_ns": started}
        return digest

    def to_json(self, only_used: bool = True) -> dict:
        keep = self.used if only_used else self.entries.keys()
        return {p: self.entries[p] for p in sorted(keep) if p in self.entries}
