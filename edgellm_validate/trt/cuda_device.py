"""Device memory through pycuda, and peak-memory sampling for build records.

pycuda is imported only when a `PycudaDevice` is created. It uses the device's *primary*
context (not `pycuda.autoinit`'s private one), which is the context TensorRT's runtime API
uses too, so engines, plugin kernels and our copies share one context.
The runner talks to the small interface of `PycudaDevice` only, so tests can hand it a fake.
"""

from __future__ import annotations

import resource
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm_core.errors import EnvironmentProblem


def import_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise EnvironmentProblem(
            f"the TensorRT backend needs pycuda for device buffers, which cannot be imported ({e}); "
            "`pip install pycuda` compiles it against the local CUDA toolkit (nvcc and headers needed, "
            "also on Jetson)") from None
    return cuda


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int
    alloc: object = field(repr=False, default=None)  # keeps the allocation alive


class PycudaDevice:
    """One GPU: allocations, synchronous copies, one stream. Close it after the engine is released."""

    def __init__(self, ordinal: int = 0):
        cuda = import_pycuda()
        self.cuda = cuda
        try:
            cuda.init()
            if cuda.Device.count() <= ordinal:
                raise EnvironmentProblem(f"no CUDA device {ordinal} (found {cuda.Device.count()})")
            self.device = cuda.Device(ordinal)
            self.context = self.device.retain_primary_context()
        except cuda.Error as e:
            raise EnvironmentProblem(f"CUDA is not usable here ({e}); the TensorRT backend needs a GPU") from None
        self.context.push()
        self.stream = cuda.Stream()
        major, minor = self.device.compute_capability()
        self.sm = major * 10 + minor
        self.name = self.device.name()
        self.total_memory = int(self.device.total_memory())
        self._buffers: list[DeviceBuffer] = []
        self._closed = False

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def alloc(self, nbytes: int) -> DeviceBuffer:
        # A zero-length binding still needs a valid address.
        a = self.cuda.mem_alloc(max(int(nbytes), 256))
        buf = DeviceBuffer(int(a), int(nbytes), a)
        self._buffers.append(buf)
        return buf

    def free(self, buf: DeviceBuffer) -> None:
        if buf.alloc is not None:
            buf.alloc.free()
            buf.alloc = None
        if buf in self._buffers:
            self._buffers.remove(buf)

    def htod(self, buf: DeviceBuffer, array: np.ndarray) -> None:
        # Synchronous copies on the legacy default stream, which orders them with our
        # (blocking) stream: no pinned memory needed.
        if array.nbytes:
            self.cuda.memcpy_htod(buf.ptr, np.ascontiguousarray(array))

    def dtoh(self, array: np.ndarray, buf: DeviceBuffer) -> np.ndarray:
        if array.nbytes:
            self.cuda.memcpy_dtoh(array, buf.ptr)
        return array

    def synchronize(self) -> None:
        self.stream.synchronize()

    def used_memory(self) -> int:
        free, total = self.cuda.mem_get_info()
        return int(total - free)

    def thread_enter(self) -> None:
        """Make the context current in another thread (the memory sampler's)."""
        self.context.push()

    def thread_exit(self) -> None:
        self.cuda.Context.pop()

    def info(self) -> dict:
        return {"name": self.name, "sm": self.sm, "total_memory": self.total_memory}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for buf in list(self._buffers):
            self.free(buf)
        self.stream = None
        self.cuda.Context.pop()
        self.context.detach()


def host_memory() -> dict[str, int]:
    """Current and peak resident set of this process, in bytes (Linux /proc, else getrusage)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak_rss"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "peak_rss" not in out:
        out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


class PeakSampler:
    """Polls probes (name -> callable returning bytes) in a thread; `peaks` and `baseline` after exit."""

    def __init__(self, probes: dict, interval: float = 0.05, enter=None, exit=None):
        self.probes = probes
        self.interval = interval
        self._enter, self._exit = enter, exit
        self.baseline: dict[str, int] = {}
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        for name, probe in self.probes.items():
            try:
                value = int(probe())
            except Exception:  # a probe failing must never fail the build it watches
                continue
            self.baseline.setdefault(name, value)
            self.peaks[name] = max(self.peaks.get(name, value), value)

    def _loop(self) -> None:
        entered = False
        try:
            if self._enter:
                self._enter()
                entered = True
            while not self._stop.is_set():
                self._sample()
                self._stop.wait(self.interval)
            self._sample()
        except Exception:
            pass
        finally:
            if entered and self._exit:
                self._exit()

    def __enter__(self) -> PeakSampler:
        self._sample()  # baseline, in the caller's thread (its CUDA context is current)
        self._thread = threading.Thread(target=self._loop, name="edgellm-mem-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
