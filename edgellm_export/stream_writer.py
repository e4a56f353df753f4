"""Background threads that write and hash the export's large files while the main thread converts.

Writing into the page cache is the kernel's work (pwrite's cost swings with write-back) and sha256 runs
at about 1 GB/s; on the 1B shape each was worth as much as the whole conversion. So both run beside
conversion and the golden pass, each on its own copy of the queue: one thread writes, a second hashes
the same buffers at the same time (in file order, the alignment gaps as the zeros the file holds), and
the main thread only converts. Hashing beside the write rather than after it matters at the end of an
export, where the last (largest: lm_head) tensor would otherwise be written and then hashed while
nothing else runs. Items are written in the order they are queued; each queue holds at most `depth`
buffers, so memory stays at a few blocks or tensors.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
from dataclasses import dataclass

_CLOSE = object()


@dataclass
class _File:
    fd: int
    path: str
    sha: object = None  # hashlib.sha256 while the file is hashed
    hashed: int = 0  # bytes hashed so far


class StreamWriter:
    def __init__(self, depth: int = 1, budget: int = 64 << 20):
        self._writes: queue.Queue = queue.Queue(maxsize=depth)
        self._hashes: queue.Queue = queue.Queue(maxsize=depth)
        self._budget = budget
        self._in_flight = 0  # bytes queued or being written / hashed
        self._done = threading.Condition()
        self._failure: list[tuple[BaseException, str]] = []
        # Handles, not raw fds: the writer closes a file while the hasher may still be on its last
        # buffers, and the next open() can get the same fd number back.
        self._files: dict[int, _File] = {}
        self._handles = itertools.count()
        self.digests: dict[str, str] = {}  # path -> sha256 of the whole file, once closed
        self._threads = [threading.Thread(target=self._write_loop, name="edgellm-writer", daemon=True),
                         threading.Thread(target=self._hash_loop, name="edgellm-hasher", daemon=True)]
        for t in self._threads:
            t.start()

    def open(self, path, *, digest: bool = True) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        handle = next(self._handles)
        self._files[handle] = _File(fd, str(path), hashlib.sha256() if digest else None)
        return handle

    def write(self, handle: int, offset: int, data) -> None:
        """Queue `data` (a buffer kept alive until written and hashed) for `handle` at `offset`; offsets
        of one file must increase. Raises an earlier write's error instead of queueing more."""
        self.raise_failure()
        view = memoryview(data).cast("B")
        with self._done:
            while self._in_flight and self._in_flight + len(view) > self._budget and not self._failure:
                self._done.wait()
            self._in_flight += len(view)
        self._put((handle, offset, view, [2 if self._files[handle].sha is not None else 1]))

    def close(self, handle: int, size: int | None = None) -> None:
        """Close the file after everything queued for it (truncated or extended to `size`, if given)."""
        self._put((handle, size, _CLOSE, [2]))

    def _put(self, item) -> None:
        self._writes.put(item)
        if self._files[item[0]].sha is not None:
            self._hashes.put(item)

    def _release(self, item) -> None:
        """One of the (one or two) threads using `item`'s buffer is done with it."""
        view, users = item[2], item[3]
        with self._done:
            users[0] -= 1
            if users[0] == 0 and view is not _CLOSE:
                self._in_flight -= len(view)
                self._done.notify_all()

    def finish(self) -> None:
        """Wait for every queued write and hash, close what is still open, raise the first error."""
        self._writes.put(None)
        self._hashes.put(None)
        for t in self._threads:
            t.join()
        for f in self._files.values():
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
        self.raise_failure()

    def raise_failure(self) -> None:
        if self._failure:
            e, path = self._failure[0]
            if isinstance(e, OSError) and not e.filename:
                raise OSError(e.errno, e.strerror, path) from e  # say which file
            raise e

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            try:
                self._write(item)
            finally:
                self._release(item)
        with self._done:
            self._done.notify_all()  # a producer waiting on the budget sees a failure

    def _write(self, item) -> None:
        handle, offset, view, _ = item
        if self._failure:
            return  # drain after an error so the producer never blocks
        f = self._files[handle]
        try:
            if view is _CLOSE:
                if offset is not None:
                    os.ftruncate(f.fd, offset)
                os.close(f.fd)
                f.fd = -1
            else:
                done, at = view, offset
                while done:
                    n = os.pwrite(f.fd, done, at)
                    done, at = done[n:], at + n
        except BaseException as e:  # noqa: BLE001  (re-raised in the producer)
            self._failure.append((e, f.path))

    def _hash_loop(self) -> None:
        while (item := self._hashes.get()) is not None:
            try:
                self._hash(item)
            finally:
                self._release(item)

    def _hash(self, item) -> None:
        handle, offset, view, _ = item
        if self._failure:
            return  # keep draining: the producer must never block on this queue
        f = self._files[handle]
        try:
            if offset is not None and offset > f.hashed:
                f.sha.update(bytes(offset - f.hashed))  # an alignment gap: zeros in the file
                f.hashed = offset
            if view is _CLOSE:
                self.digests[f.path] = f.sha.hexdigest()
            else:
                f.sha.update(view)
                f.hashed += len(view)
        except BaseException as e:  # noqa: BLE001  (re-raised in the producer)
            self._failure.append((e, f.path))
