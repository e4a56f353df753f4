"""The floor: read every tensor of a checkpoint, convert it to fp16, append it to one file.

What any exporter must at least do; `benchmarks.run` times it in the same run as
the tools it compares, so machine noise hits both.

    python -m benchmarks.floor CHECKPOINT_DIR OUT_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(ckpt: Path, out: Path) -> None:
    import torch
    from safetensors import safe_open

    index = ckpt / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    with open(out, "wb") as f:
        for shard in shards:
            with safe_open(str(ckpt / shard), framework="pt") as st:
                for name in st.keys():
                    f.write(st.get_tensor(name).to(torch.float16).contiguous().numpy().tobytes())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
