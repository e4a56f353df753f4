"""The streamed weight writer produces exactly what a plain load-everything path would.

The reference here is deliberately naive and independent of the exporter's
reader: load every shard whole with safetensors, apply the layout the
contract describes (linear weights transposed to [in, out], fp16), and write
each initializer at the offset model.onnx declares.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from safetensors.torch import load_file

from edgellm_export.export import export_checkpoint


def reference_data(ckpt, model: onnx.ModelProto, size: int) -> bytes:
    state = {}
    index = ckpt / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    for shard in shards:
        state.update(load_file(str(ckpt / shard)))
    # Canonical names: without the `model.` wrapper.
    state = {k.removeprefix("model."): v for k, v in state.items()}
    out = bytearray(size)
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        name = init.name
        if name.endswith(".T"):
            t = state[name[:-2]].t()
        else:
            t = state[name]
        raw = t.to(torch.float16).contiguous().numpy().tobytes()
        off = int(ext["offset"])
        assert len(raw) == int(ext["length"])
        out[off : off + len(raw)] = raw
    return bytes(out)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_streamed_equals_reference(family, hf_checkpoints, tmp_path):
    ckpt, _ = hf_checkpoints(family)
    export_checkpoint(ckpt, tmp_path / "out")
    llm = tmp_path / "out" / "llm"
    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    data = (llm / "model.onnx.data").read_bytes()
    assert data == reference_data(ckpt, model, len(data))


def test_streamed_equals_reference_sharded(tmp_path):
    from conftest import make_hf_model, save_checkpoint

    ckpt = save_checkpoint(make_hf_model("llama"), tmp_path / "ckpt", "bfloat16", max_shard_size="300KB")
    assert (ckpt / "model.safetensors.index.json").exists()
    export_checkpoint(ckpt, tmp_path / "out")
    llm = tmp_path / "out" / "llm"
    model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    data = (llm / "model.onnx.data").read_bytes()
    assert data == reference_data(ckpt, model, len(data))
