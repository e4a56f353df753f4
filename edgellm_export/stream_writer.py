"""Background threads that write and hash the export's large files while the main thread converts.

Writing into the page cache is the kernel's work (pwrite's cost swings with write-back) and sha256 runs
at about 1 GB/s; on the 1B shape each was worth as much as the whole conversion. So both run beside
conversion and the golden pass: one thread writes, a second hashes what was written (in file order,
the alignment gaps as the zeros the file holds), and the main thread only converts. Items are written
in the order they are queued; each queue holds at most `depth` buffers, so memory stays at a few blocks
or tensors.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading

_CLOSE = object()


class StreamWriter:
    def __init__(self, depth: int = 1):
        self._writes: queue.Queue = queue.Queue(maxsize=depth)
        self._hashes: queue.Queue = queue.Queue(maxsize=depth)
        self._failure: list[tuple[BaseException, str]] = []
        self._paths: dict[int, str] = {}
        self._hashing: dict[int, list] = {}  # fd -> [sha256, bytes hashed so far]
        self.digests: dict[str, str] = {}  # path -> sha256 of the whole file, once closed
        self._threads = [threading.Thread(target=self._write_loop, name="edgellm-writer", daemon=True),
                         threading.Thread(target=self._hash_loop, name="edgellm-hasher", daemon=True)]
        for t in self._threads:
            t.start()

    def open(self, path, *, digest: bool = True) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._paths[fd] = str(path)
        if digest:
            self._hashing[fd] = [hashlib.sha256(), 0]
        return fd

    def write(self, fd: int, offset: int, data) -> None:
        """Queue `data` (a buffer kept alive until written and hashed) for `fd` at `offset`; offsets of
        one file must increase. Raises an earlier write's error instead of queueing more."""
        self.raise_failure()
        self._writes.put((fd, offset, memoryview(data).cast("B")))

    def close(self, fd: int, size: int | None = None) -> None:
        """Close `fd` after everything queued for it (truncated or extended to `size`, if given)."""
        self._writes.put((fd, size, _CLOSE))

    def finish(self) -> None:
        """Wait for every queued write and hash, close what is still open, raise the first error."""
        self._writes.put(None)
        for t in self._threads:
            t.join()
        for fd in list(self._paths):
            os.close(fd)
        self._paths.clear()
        self.raise_failure()

    def raise_failure(self) -> None:
        if self._failure:
            e, path = self._failure[0]
            if isinstance(e, OSError) and not e.filename:
                raise OSError(e.errno, e.strerror, path) from e  # say which file
            raise e

    def _write_loop(self) -> None:
        try:
            while (item := self._writes.get()) is not None:
                fd, offset, view = item
                if self._failure:
                    continue  # drain after an error so the producer never blocks
                try:
                    if view is _CLOSE:
                        if offset is not None:
                            os.ftruncate(fd, offset)
                    else:
                        done, at = view, offset
                        while done:
                            n = os.pwrite(fd, done, at)
                            done, at = done[n:], at + n
                except BaseException as e:  # noqa: BLE001  (re-raised in the producer)
                    self._failure.append((e, self._paths.get(fd, "")))
                    continue
                if fd in self._hashing:
                    self._hashes.put(item)
                elif view is _CLOSE:
                    self._close(fd)
        finally:
            self._hashes.put(None)

    def _hash_loop(self) -> None:
        while (item := self._hashes.get()) is not None:
            fd, offset, view = item
            if self._failure:
                continue  # keep draining: the writer must never block on this queue
            try:
                self._hash(fd, offset, view)
            except BaseException as e:  # noqa: BLE001  (re-raised in the producer)
                self._failure.append((e, self._paths.get(fd, "")))

    def _hash(self, fd: int, offset, view) -> None:
        h = self._hashing[fd]
        if view is _CLOSE:
            if offset is not None and offset > h[1]:
                h[0].update(bytes(offset - h[1]))
            self.digests[self._paths[fd]] = h[0].hexdigest()
            self._close(fd)
            return
        if offset > h[1]:
            h[0].update(bytes(offset - h[1]))  # an alignment gap: zeros in the file
        h[0].update(view)
        h[1] = offset + len(view)

    def _close(self, fd: int) -> None:
        self._paths.pop(fd, None)
        os.close(fd)
