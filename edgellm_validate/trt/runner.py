"""Run an Edge-LLM 0.7 engine step by step, with the same feeds the CPU backend takes.

`TrtRunner.run(feeds)` has the CPU backend's contract: a dict of input name -> array in, a
dict of output name -> array out, so the runtime twin (`twin.drive`) drives both alike. What
differs is the KV cache: as in llm_inference, `past_key_values_i` and `present_key_values_i`
are bound to one device buffer and updated in place. The runner hands each present cache back
as a `DeviceTensor` that stays on the GPU; when the twin feeds it in as the next step's past,
it is bound again without a copy. A numpy array fed as a past cache (the twin's zeroed buffers
at the start of a scenario) is uploaded into that layer's buffer.

Per step, like the runtime's engine executor: select the profile (0 = context for a prefill or
chunked prefill, 1 = generation for a decode step), then set *every* input shape and *every*
tensor address again, because TensorRT keeps bindings across profile switches
(`kvcache_start_index` alternates between shape [0] and [B]).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from edgellm_core.bindings import bindings_for
from edgellm_core.errors import ExportError

from ..runtime_rules import RuntimeRefusal
from .profiles import INPUTS_EMBEDS, KVCACHE_START_INDEX, PROFILE_ORDER
from .trt_api import SINK, enum_name, import_tensorrt, numpy_dtype, process_logger

CONTEXT_PROFILE, GENERATION_PROFILE = 0, 1
_BINDINGS = bindings_for("0.7")  # the profiles' release


class EngineRunError(RuntimeRefusal):
    """The engine refused a step (shape outside its profiles, enqueue failure)."""


def _shape(value) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def select_profile(feeds: dict) -> int:
    """0 (context) for a normal or chunked prefill, 1 (generation) for a one-token decode step."""
    if _shape(feeds[KVCACHE_START_INDEX])[0] == 0:
        return CONTEXT_PROFILE  # empty start index: fresh prefill
    if _shape(feeds[INPUTS_EMBEDS])[1] > 1:
        return CONTEXT_PROFILE  # chunked prefill: cache already holds tokens
    return GENERATION_PROFILE


def as_engine_dtype(value, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous array of the engine's dtype. 1-byte float types (FP8) may arrive as their raw
    bytes in uint8 (the twin's convention, numpy has no float8): those are reinterpreted, not converted."""
    arr = np.asarray(value)
    one_byte_float = dtype.itemsize == 1 and dtype not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.bool_))
    if arr.dtype == np.uint8 and one_byte_float:
        return np.ascontiguousarray(arr).view(dtype)
    return np.ascontiguousarray(arr, dtype=dtype)


def alias_map(input_names, output_names) -> dict[str, str]:
    """present -> past for every carried state the engine has both of (present_key_values_i ->
    past_key_values_i; hybrids' present_conv_state_j -> conv_state_j and present_recurrent_state_j ->
    recurrent_state_j), bound to the same device memory, as the runtime does."""
    outputs = set(output_names)
    out = {}
    for past in input_names:
        if past in _BINDINGS.step_inputs:
            continue
        present = next((p for p in _BINDINGS.presents_of(past) if p in outputs), None)
        if present is not None:
            out[present] = past
    return out


class DeviceTensor:
    """A KV cache left on the GPU by the runner; feed it back to bind the same memory in place."""

    def __init__(self, runner: TrtRunner, slot: str, shape: tuple[int, ...], dtype: np.dtype, version: int):
        self._runner, self.slot, self.shape, self.dtype, self.version = runner, slot, shape, dtype, version

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def valid(self) -> bool:
        return self._runner._kv_version.get(self.slot) == self.version and not self._runner.closed

    def numpy(self) -> np.ndarray:
        """Copy to the host (for inspection; the twin never needs it)."""
        if not self.valid:
            raise EngineRunError(f"the device cache {self.slot} was overwritten or released")
        out = np.empty(self.shape, self.dtype)
        return self._runner.device.dtoh(out, self._runner._kv[self.slot])

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a.astype(dtype) if dtype is not None else a

    def __repr__(self) -> str:
        return f"DeviceTensor({self.slot}, shape={self.shape}, dtype={self.dtype})"


class TrtRunner:
    """One engine, one execution context, one device; not thread-safe."""

    name = "tensorrt"

    def __init__(self, engine: str | os.PathLike | bytes, device, *, trt=None, num_profiles: int = len(PROFILE_ORDER),
                 choose_profile=select_profile):
        """`engine`: a serialized engine or its path; the Edge-LLM plugin must already be loaded. An LLM engine has
        the context and generation profiles (`select_profile` picks one per step); a vision encoder's has one
        (`num_profiles=1`, `choose_profile=lambda feeds: 0`)."""
        self.trt = trt or import_tensorrt()
        self.device = device
        self.closed = False
        mark = len(SINK.messages)
        self._runtime = self.trt.Runtime(process_logger(self.trt))
        if isinstance(engine, (bytes, bytearray, memoryview)):
            self.engine = self._runtime.deserialize_cuda_engine(engine)
        else:  # mapped, not read: no engine-sized copy in Python's heap (unified memory on boards)
            with open(engine, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                self.engine = self._runtime.deserialize_cuda_engine(mapped)
        if self.engine is None:
            errors = SINK.errors(mark)
            raise ExportError("TensorRT could not deserialize the engine (built by another TensorRT version, on "
                              "another GPU, or without the plugin library loaded): " + " | ".join(errors[-3:]))
        n_profiles = int(self.engine.num_optimization_profiles)
        if n_profiles != num_profiles:
            raise ExportError(f"the engine has {n_profiles} optimization profiles; this kind of Edge-LLM engine has "
                              f"{num_profiles}" + (" (context, generation)" if num_profiles == 2 else ""))
        self.choose_profile = choose_profile
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ExportError("TensorRT could not create an execution context (out of device memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        input_mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == input_mode]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: numpy_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.aliases = alias_map(self.inputs, self.outputs)
        self._profile: int | None = None
        self._bufs: dict[str, object] = {}  # non-KV inputs and outputs, by tensor name
        self._kv: dict[str, object] = {}  # KV caches, by past input name
        self._kv_version: dict[str, int] = {}

    # -------------------------------------------------------------- buffers

    def _buffer(self, table: dict, key: str, nbytes: int):
        buf = table.get(key)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.device.free(buf)
            buf = self.device.alloc(nbytes)
            table[key] = buf
        return buf

    def _bind_input(self, name: str, value, profile: int):
        if isinstance(value, DeviceTensor):
            if value._runner is not self or not value.valid:
                raise EngineRunError(f"{name}: the device cache passed in is stale (overwritten, or from another "
                                     "runner)")
            buf, shape = self._kv[value.slot], value.shape
        else:
            arr = as_engine_dtype(value, self.dtypes[name])
            shape = _shape(arr)
            if name in self.aliases.values():
                # A cache from the host (a fresh, zeroed one): upload into this layer's buffer.
                buf = self._buffer(self._kv, name, arr.nbytes)
                self._kv_version[name] = self._kv_version.get(name, 0) + 1
            else:
                buf = self._buffer(self._bufs, name, arr.nbytes)
            self.device.htod(buf, arr)
        if not self.context.set_input_shape(name, shape):
            allowed = self.engine.get_tensor_profile_shape(name, profile)
            raise EngineRunError(f"{name} shape {list(shape)} is outside profile {profile} "
                                 f"(min/opt/max {[list(d) for d in allowed]})")
        self.context.set_tensor_address(name, buf.ptr)
        return buf, shape

    # -------------------------------------------------------------- one step

    def run(self, feeds: dict) -> dict:
        if self.closed:
            raise EngineRunError("the runner is closed")
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise EngineRunError(f"missing engine inputs: {', '.join(missing)}")
        profile = self.choose_profile(feeds)
        stream = self.device.stream_handle
        if profile != self._profile:
            if not self.context.set_optimization_profile_async(profile, stream):
                raise EngineRunError(f"TensorRT refused to switch to optimization profile {profile}")
            self._profile = profile
        bound = {name: self._bind_input(name, feeds[name], profile) for name in self.inputs}
        out_shapes = {}
        for name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineRunError(f"output {name} has unresolved shape {list(shape)}")
            if name in self.aliases:
                buf, past_shape = bound[self.aliases[name]]
                if shape != past_shape:
                    raise EngineRunError(f"{name} has shape {list(shape)} but its in-place input "
                                         f"{self.aliases[name]} has {list(past_shape)}")
            else:
                buf = self._buffer(self._bufs, name, int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize)
            self.context.set_tensor_address(name, buf.ptr)
            out_shapes[name] = (buf, shape)
        mark = len(SINK.messages)
        if not self.context.execute_async_v3(stream):
            raise EngineRunError("TensorRT failed to enqueue the step: " + " | ".join(SINK.errors(mark)[-3:]))
        self.device.synchronize()
        result = {}
        for name, (buf, shape) in out_shapes.items():
            if name in self.aliases:
                slot = self.aliases[name]
                result[name] = DeviceTensor(self, slot, shape, self.dtypes[name], self._kv_version[slot])
            else:
                result[name] = self.device.dtoh(np.empty(shape, self.dtypes[name]), buf)
        return result

    def info(self) -> dict:
        mem = getattr(self.engine, "device_memory_size_v2", None)
        if mem is None:
            mem = getattr(self.engine, "device_memory_size", None)
        return {"inputs": {n: enum_name(self.engine.get_tensor_dtype(n)) for n in self.inputs},
                "outputs": {n: enum_name(self.engine.get_tensor_dtype(n)) for n in self.outputs},
                "aliased": dict(self.aliases), "device_memory_bytes": int(mem) if mem is not None else None}

    def close(self) -> None:
        """Release the context and engine, then our buffers (the device itself is the caller's)."""
        if self.closed:
            return
        self.closed = True
        self.context = None
        self.engine = None
        self._runtime = None
        for table in (self._bufs, self._kv):
            for buf in table.values():
                self.device.free(buf)
            table.clear()
