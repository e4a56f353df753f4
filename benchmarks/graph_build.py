"""Graph build time against layer count, from config and safetensors headers only.

Writes sparse checkpoints (valid headers, unwritten data: no disk, no RAM) with
Llama-3.1-8B layer shapes at several depths and times building the ONNX graph
(the step before any weight is read). Linear growth means constant time per layer.

    python -m benchmarks.graph_build
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from pathlib import Path

from .make_checkpoint import SHAPES, tensor_shapes


def sparse_checkpoint(path: Path, layers: int) -> Path:
    cfg = {"model_type": "llama", **SHAPES["llama-3.1-8b"], "num_hidden_layers": layers}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    header, offset = {}, 0
    for name, shape in tensor_shapes(cfg):
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path / "model.safetensors", 8 + len(raw) + offset)
    return path


def build_seconds(ckpt: Path) -> tuple[float, int]:
    from edgellm_export.checkpoint import open_checkpoint
    from edgellm_export.contract import v0_7
    from edgellm_export.export import ExportOptions, plan_export

    t0 = time.perf_counter()
    with open_checkpoint(ckpt) as c:
        g = plan_export(c, v0_7, ExportOptions()).graph
        g.layout_weights()
        g.to_model(v0_7.DATA_FILE, v0_7.OPSETS, v0_7.IR_VERSION).SerializeToString()
    return time.perf_counter() - t0, len(g.nodes)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        print("| layers | nodes | build s | ms per layer |\n|---|---|---|---|")
        for layers in (4, 16, 32, 64, 128):
            secs, nodes = build_seconds(sparse_checkpoint(Path(d) / f"l{layers}", layers))
            print(f"| {layers} | {nodes} | {secs:.3f} | {1000 * secs / layers:.2f} |")


if __name__ == "__main__":
    main()
