"""A stand-in for the parts of the `tensorrt` module and a CUDA device that our TensorRT path uses.

It lets the build, the runner and `validate --backend trt` run end to end on a CPU: the fake
"engine" executes the exported graph with the onnxruntime backend, reading its inputs from and
writing its outputs to fake device memory at the addresses the runner bound. It enforces what
TensorRT would: every network input needs a shape in every profile, set_input_shape only
accepts shapes inside the active profile, outputs must be given addresses, and aliased KV
outputs are written through the present's address (so in-place binding is really exercised).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

__version__ = "10.99.0-fake"
# Test plumbing, not TensorRT API (tests/test_trt_real_api.py checks everything else against real TensorRT).
FAKE_ONLY = ("FAKE_ONLY", "FakeBuffer", "FakeDevice", "REGISTRY", "CALLS", "STATE", "reset")

TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64 INT4 FP4")
PreviewFeature = enum.Enum("PreviewFeature", "PROFILE_SHARING_0806 ALIASED_PLUGIN_IO_10_03")
BuilderFlag = enum.Enum("BuilderFlag", "DEBUG MONITOR_MEMORY")
ProfilingVerbosity = enum.Enum("ProfilingVerbosity", "LAYER_NAMES_ONLY NONE DETAILED")


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


_ONNX_TO_TRT = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
                onnx.TensorProto.INT32: DataType.INT32, onnx.TensorProto.INT64: DataType.INT64,
                onnx.TensorProto.FLOAT8E4M3FN: DataType.FP8, onnx.TensorProto.INT8: DataType.INT8}


class ILogger:
    Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

    def __init__(self):
        pass


class _Registry:
    FAKE_STATE = ("creators",)  # test plumbing: which (type, version, namespace) "are registered"

    def __init__(self):
        self.creators = {("AttentionPlugin", "1", "")}

    def get_creator(self, type, version, plugin_namespace=""):  # noqa: A002  (TensorRT's parameter name)
        return object() if (type, version, plugin_namespace) in self.creators else None


REGISTRY = _Registry()
CALLS: list[tuple] = []  # what the code under test asked of "TensorRT", in order
STATE: dict = {"device": None, "fail_build": False}


def get_plugin_registry():
    return REGISTRY


def reset(device=None) -> None:
    REGISTRY.creators = {("AttentionPlugin", "1", "")}
    CALLS.clear()
    STATE.update(device=device, fail_build=False)


# ---------------------------------------------------------------- device


@dataclass
class FakeBuffer:
    ptr: int
    nbytes: int
    alloc: object = None


class FakeDevice:
    """The runner's device interface over host memory; addresses are keys into `memory`."""

    def __init__(self, sm: int = 87, name: str = "Fake Orin"):
        self.sm, self.name = sm, name
        self.memory: dict[int, np.ndarray] = {}
        self.stream_handle = 1234
        self.uploads: list[int] = []  # ptr of every host-to-device copy
        self.closed = False
        self._next = 0x1000

    def alloc(self, nbytes):
        ptr = self._next
        self._next += max(int(nbytes), 256) + 256
        self.memory[ptr] = np.zeros(max(int(nbytes), 256), np.uint8)
        return FakeBuffer(ptr, int(nbytes), True)

    def free(self, buf):
        self.memory.pop(buf.ptr, None)

    def htod(self, buf, array):
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.memory[buf.ptr][: raw.size] = raw
        self.uploads.append(buf.ptr)

    def dtoh(self, array, buf):
        raw = array.view(np.uint8).reshape(-1)
        raw[:] = self.memory[buf.ptr][: raw.size]
        return array

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self.memory[ptr][:n].view(dtype).reshape(shape).copy()

    def write(self, ptr, array):
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.memory[ptr][: raw.size] = raw

    def synchronize(self):
        pass

    def used_memory(self):
        return sum(a.nbytes for a in self.memory.values())

    def thread_enter(self):
        pass

    def thread_exit(self):
        pass

    def info(self):
        return {"name": self.name, "sm": self.sm, "total_memory": 1 << 30}

    def close(self):
        self.closed = True


# ---------------------------------------------------------------- build side


@dataclass
class _Tensor:
    name: str
    dtype: object
    shape: tuple


class _Network:
    def __init__(self):
        self._inputs: list[_Tensor] = []
        self._outputs: list[_Tensor] = []
        self._onnx_path: str | None = None

    @property
    def num_inputs(self):
        return len(self._inputs)

    def get_input(self, index):
        return self._inputs[index]


class OnnxParser:
    def __init__(self, network, logger):
        self._network = network
        self._errors: list[str] = []

    def parse_from_file(self, model):
        CALLS.append(("parse_from_file", model))
        onnx_model = onnx.load(model, load_external_data=False)
        locations = {e.value for init in onnx_model.graph.initializer for e in init.external_data
                     if e.key == "location"}
        for location in sorted(locations):  # as the real parser, only the files the graph refers to
            if not (Path(model).parent / location).is_file():
                self._errors.append(f"external data file {location} not found")
                return False

        def t(vi):
            tt = vi.type.tensor_type
            return _Tensor(vi.name, _ONNX_TO_TRT[tt.elem_type],
                           tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim))

        self._network._inputs = [t(i) for i in onnx_model.graph.input]
        self._network._outputs = [t(o) for o in onnx_model.graph.output]
        self._network._onnx_path = model
        return True

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]


class _Profile:
    def __init__(self):
        self._shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002  (TensorRT's parameter names)
        self._shapes[input] = (tuple(min), tuple(opt), tuple(max))


@dataclass
class _Config:
    _preview: dict = field(default_factory=dict)
    _flags: list = field(default_factory=list)  # flag names (real TensorRT's `flags` is a bit mask)
    _profiles: list = field(default_factory=list)
    profiling_verbosity: object = None

    def set_preview_feature(self, feature, enable):
        self._preview[feature.name] = enable

    def set_flag(self, flag):
        self._flags.append(flag.name)

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1


class Builder:
    def __init__(self, logger):
        CALLS.append(("Builder",))

    def create_network(self, flags=0):
        CALLS.append(("create_network", flags))
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        CALLS.append(("build", dict(config._preview), list(config._flags)))
        if STATE["fail_build"]:
            return None
        for p in config._profiles:
            for t in network._inputs:
                if t.name not in p._shapes:
                    return None  # TensorRT: a dynamic input without a profile shape
                mn, opt, mx = p._shapes[t.name]
                if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
                    return None
                if any(s != -1 and not (a == b == c == s) for s, a, b, c in zip(t.shape, mn, opt, mx)):
                    return None  # a static dim must be fixed at its value
        plan = {"onnx": network._onnx_path,
                "io": [(t.name, "INPUT", t.dtype.name) for t in network._inputs]
                + [(t.name, "OUTPUT", t.dtype.name) for t in network._outputs],
                "profiles": [{n: [list(s) for s in v] for n, v in p._shapes.items()} for p in config._profiles]}
        return json.dumps(plan).encode()


# ---------------------------------------------------------------- run side


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, serialized_engine):
        try:
            return _Engine(json.loads(bytes(serialized_engine)))
        except ValueError:
            return None


class _Engine:
    def __init__(self, plan):
        self._plan = plan
        self._io = [(n, TensorIOMode[m], DataType[d]) for n, m, d in plan["io"]]
        self.device_memory_size_v2 = 0

    @property
    def num_io_tensors(self):
        return len(self._io)

    @property
    def num_optimization_profiles(self):
        return len(self._plan["profiles"])

    def get_tensor_name(self, index):
        return self._io[index][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self._io if n == name)

    def get_tensor_dtype(self, name):
        return next(d for n, _, d in self._io if n == name)

    def get_tensor_profile_shape(self, name, profile_index):
        return self._plan["profiles"][profile_index][name]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    FAKE_STATE = ("log", "addresses")  # test plumbing: what was asked of the context, bound addresses

    def __init__(self, engine):
        self._engine = engine
        self._profile = 0
        self._shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.log: list[tuple] = []
        self._cpu = None

    def set_optimization_profile_async(self, profile_index, stream_handle):
        self.log.append(("profile", profile_index))
        self._profile = profile_index
        return True

    def set_input_shape(self, name, shape):
        self.log.append(("shape", name))
        mn, _, mx = self._engine._plan["profiles"][self._profile][name]
        if len(shape) != len(mn) or not all(a <= s <= b for a, s, b in zip(mn, shape, mx)):
            return False
        self._shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, memory):
        self.addresses[name] = memory
        return True

    def get_tensor_shape(self, name):
        if name == "logits":
            b = self._shapes["inputs_embeds"][0]
            vocab = json.loads((Path(self._engine._plan["onnx"]).parent / "config.json").read_text())["vocab_size"]
            return (b, 1, vocab)
        if not name.startswith("present_"):  # a data-dependent output (a vision encoder's): run to learn it
            return tuple(np.asarray(self._run()[name]).shape)
        # A carried state's present has its input's shape: present_key_values_i <- past_key_values_i,
        # present_X <- X (hybrids' conv/recurrent states, native k_cache_i / v_cache_i).
        past = name.replace("present_", "past_")
        return self._shapes[past if past in self._shapes else name[len("present_"):]]

    def _run(self):
        """The graph on the bound inputs, through onnxruntime."""
        from edgellm_validate.cpu_backend import CpuBackend
        from edgellm_validate.trt.trt_api import numpy_dtype

        device = STATE["device"]
        if self._cpu is None:
            self._cpu = CpuBackend(Path(self._engine._plan["onnx"]).parent)
        feeds = {}
        for name, mode, dtype in self._engine._io:
            if mode is TensorIOMode.INPUT:
                feeds[name] = device.read(self.addresses[name], self._shapes[name], numpy_dtype(dtype))
        return self._cpu.run(feeds)

    def execute_async_v3(self, stream_handle):
        from edgellm_validate.trt.trt_api import numpy_dtype

        device = STATE["device"]
        outs = self._run()
        for name, mode, dtype in self._engine._io:
            if mode is TensorIOMode.OUTPUT:
                device.write(self.addresses[name], np.asarray(outs[name], numpy_dtype(dtype)))
        self.log.append(("execute",))
        return True
