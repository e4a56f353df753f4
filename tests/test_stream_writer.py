"""The background writer: bytes land where they were queued, digests equal the files' sha256 (alignment
gaps and a final extension hashed as the zeros the file holds), and a write error reaches the producer
naming the file, without leaving a thread blocked."""

from __future__ import annotations

import errno
import hashlib

import numpy as np
import pytest

import edgellm_export.stream_writer as sw


def test_files_and_digests(tmp_path):
    w = sw.StreamWriter(depth=1)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    fa, fb = w.open(a), w.open(b, digest=False)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in (100, 4096, 7)]
    w.write(fa, 0, chunks[0])
    w.write(fb, 0, b"header")
    w.write(fa, 128, chunks[1])  # a 28-byte alignment gap
    w.write(fa, 128 + 4096 + 64, chunks[2])
    w.close(fa, 8192)  # extended with zeros
    w.close(fb)
    w.finish()
    want = bytearray(8192)
    want[0:100] = chunks[0].tobytes()
    want[128:128 + 4096] = chunks[1].tobytes()
    want[4288:4295] = chunks[2].tobytes()
    assert a.read_bytes() == bytes(want)
    assert w.digests == {str(a): hashlib.sha256(want).hexdigest()}
    assert b.read_bytes() == b"header"


def test_a_write_error_reaches_the_producer_with_the_path(tmp_path, monkeypatch):
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sw.os, "pwrite", full)
    w = sw.StreamWriter(depth=1)
    fd = w.open(tmp_path / "x.bin")
    w.write(fd, 0, b"abc")
    with pytest.raises(OSError) as e:  # a later write refuses to queue more
        for i in range(100):
            w.write(fd, 3 + i, b"d")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x.bin")
    assert len(calls) == 1  # nothing was written after the failure
    with pytest.raises(OSError, match="No space left"):  # finish drains, stops both threads, raises it too
        w.finish()
    assert not any(t.is_alive() for t in w._threads)


def test_files_opened_one_after_another_keep_their_own_digests(tmp_path):
    """The writer closes a file while the hasher may still be on its last buffers, and the next open()
    gets the same fd number back: the digests must still land on the right paths."""
    w = sw.StreamWriter(depth=1)
    rng = np.random.default_rng(1)
    want = {}
    for k in range(6):
        path = tmp_path / f"f{k}.bin"
        data = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
        h = w.open(path)
        w.write(h, 0, data[: 1 << 15])
        w.write(h, 1 << 15, data[1 << 15:])
        w.close(h)
        want[str(path)] = hashlib.sha256(data.tobytes()).hexdigest()
    w.finish()
    assert w.digests == want
    assert all(hashlib.sha256(open(p, "rb").read()).hexdigest() == d for p, d in want.items())


def test_big_buffers_are_never_held_two_at_a_time_beyond_the_budget(tmp_path, monkeypatch):
    """Buffers queued or in flight stay within the byte budget, or are a single buffer when one is larger:
    while a big tensor (an expert stack) is written the producer converts the next, and no third exists."""
    import time

    real = sw.os.pwrite
    seen = []

    def slow(fd, data, offset):
        seen.append(w._in_flight)
        time.sleep(0.01)
        return real(fd, data, offset)

    monkeypatch.setattr(sw.os, "pwrite", slow)
    w = sw.StreamWriter(depth=1, budget=100)
    h = w.open(tmp_path / "big.bin")
    for k in range(4):
        w.write(h, k * 1000, np.full(1000, k, np.uint8))
    for k in range(6):
        w.write(h, 4000 + k * 30, np.full(30, k, np.uint8))
    w.close(h)
    w.finish()
    assert max(seen[:4]) == 1000 and max(seen[4:]) <= 100
    assert (tmp_path / "big.bin").stat().st_size == 4180 and w._in_flight == 0
