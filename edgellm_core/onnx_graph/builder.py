"""A small ONNX graph builder.

Model code emits nodes through this builder instead of being traced: the graph
is a function of the config alone, so building it needs no weights and costs
microseconds per node. Large weights are declared as external initializers
whose bytes export._write_weights appends to one data file afterwards; their offsets
are known in advance from shapes, so the graph can be finalised first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
FLOAT8E4M3FN = TensorProto.FLOAT8E4M3FN
FLOAT4E2M1 = TensorProto.FLOAT4E2M1
INT8 = TensorProto.INT8
UINT8 = TensorProto.UINT8
INT32 = TensorProto.INT32
INT64 = TensorProto.INT64

_ALIGN = 64  # byte alignment of each external tensor (helps mmap-based loaders)


@dataclass
class ExternalWeight:
    """One initializer whose bytes live in the external data file."""

    name: str
    dtype: int  # TensorProto elem type
    shape: tuple[int, ...]
    produce: Callable[[], Any]  # returns a contiguous CPU torch tensor / ndarray of the bytes
    offset: int = 0
    tag: str = ""  # which checkpoint tensor(s) this came from, for messages

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        if self.dtype == FLOAT4E2M1:  # two codes per byte
            return (n + 1) // 2
        return n * helper.tensor_dtype_to_np_dtype(self.dtype).itemsize


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weights: list[ExternalWeight] = []
        self._weight_names: dict[str, str] = {}
        self._const_cache: dict[tuple, str] = {}
        self._counter = 0
        self.scope = ""
        # In a FunctionProto there are no initializers: constants become Constant nodes.
        self.function_mode = False

    # -- naming ----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        prefix = f"{self.scope}/" if self.scope else ""
        return f"{prefix}{hint}_{self._counter}"

    # -- graph I/O -------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        if value != name and not self._rename_output(value, name):
            self.node("Identity", [value], outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def _rename_output(self, value: str, name: str) -> bool:
        """Give the node that produces `value` the graph output's name itself.

        An Identity in front of a graph output is no rename to TensorRT: the
        runtime aliases each AttentionPlugin's KV output to its input buffer, and
        an extra node there can make the engine copy the whole cache every step.
        Returns False when `value` is no node's output (a graph input or constant).
        """
        producer = next((n for n in reversed(self.nodes) if value in n.output), None)
        if producer is None:
            return False
        producer.output[list(producer.output).index(value)] = name
        for n in self.nodes:
            for i, inp in enumerate(n.input):
                if inp == value:
                    n.input[i] = name
        return True

    # -- nodes -----------------------------------------------------------------------------
    def node(
        self,
        op: str,
        inputs: Sequence[str],
        attrs: dict[str, Any] | None = None,
        *,
        n_out: int = 1,
        outputs: Sequence[str] | None = None,
        domain: str = "",
    ):
        outs = list(outputs) if outputs else [self.fresh(op) for _ in range(n_out)]
        node = helper.make_node(op, list(inputs), outs, name=self.fresh(f"n_{op}"), domain=domain)
        for k, v in sorted((attrs or {}).items()):
            node.attribute.append(helper.make_attribute(k, v))
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def const(self, array: np.ndarray, hint: str = "const") -> str:
        """A small inline constant, shared between identical uses."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._const_cache:
            name = f"{hint}_{len(self._const_cache)}"
            if self.function_mode:
                self.node("Constant", [], {"value": numpy_helper.from_array(array, name)}, outputs=[name])
            else:
                self.initializers.append(numpy_helper.from_array(array, name))
            self._const_cache[key] = name
        return self._const_cache[key]

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64), "i64")

    def weight(self, name: str, dtype: int, shape: Sequence[int], produce, tag: str = "") -> str:
        """Declare an external initializer; `produce()` yields its bytes at write time."""
        if name in self._weight_names:
            return self._weight_names[name]
        self.weights.append(ExternalWeight(name, dtype, tuple(int(d) for d in shape), produce, tag=tag))
        self._weight_names[name] = name
        return name

    # -- finishing -------------------------------------------------------------------------
    def layout_weights(self) -> int:
        """Assign each external weight its offset in the data file; returns the file size."""
        offset = 0
        for w in self.weights:
            offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
            w.offset = offset
            offset += w.nbytes
        return offset

    def to_model(
        self,
        data_file: str,
        opsets: dict[str, int],
        ir_version: int,
        functions: Sequence[onnx.FunctionProto] = (),
        producer: tuple[str, str] = ("edgellm-export", ""),
    ) -> onnx.ModelProto:
        inits = list(self.initializers)
        for w in self.weights:
            t = TensorProto()
            t.name = w.name
            t.data_type = w.dtype
            t.dims.extend(w.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_file), ("offset", str(w.offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
            producer_name=producer[0],
            producer_version=producer[1],
            functions=list(functions),
        )
        model.ir_version = ir_version
        return model
