"""What Edge-LLM 0.7's llm_inference derives from the export directory, re-implemented.

Written from the runtime's behaviour (contract text.md §4, §6), not from the
exporter: the RoPE table is built the way the runtime builds it, including the
scaling types it silently treats as default, so a CPU pass predicts what the
engine will compute.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

RUNTIME_DEFAULT_THETA = 100000.0
RUNTIME_DEFAULT_MAX_POS = 32768


class RuntimeRefusal(Exception):
    """The runtime itself would refuse this export (it errors at load)."""


def rope_table(config: dict, capacity: int) -> np.ndarray:
    """`[1, capacity, R]` fp32 cos|sin table exactly as the 0.7 runtime fills it."""
    head_dim = config["head_dim"]
    r = int(head_dim * config.get("partial_rotary_factor", 1.0))
    pos = np.arange(capacity, dtype=np.float32)[:, None]
    if config.get("use_rope") is False:
        return np.concatenate([np.ones((capacity, r // 2)), np.zeros((capacity, r // 2))], -1)[None].astype(
            np.float32)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    theta = np.float32(config.get("rope_theta", RUNTIME_DEFAULT_THETA))
    max_pos = config.get("max_position_embeddings", RUNTIME_DEFAULT_MAX_POS)
    exps = np.arange(0, r, 2, dtype=np.float32) / np.float32(r)
    if kind == "longrope":
        orig = config.get("original_max_position_embeddings")
        if orig is None:
            raise RuntimeRefusal("longrope needs a top-level original_max_position_embeddings")
        if r not in (32, 64, 96, 128):
            raise RuntimeRefusal(f"longrope table kernel does not support rotary dim {r}")
        factors = np.asarray(scaling["long_factor"] if capacity > orig else scaling["short_factor"],
                             dtype=np.float32)
        inv = (np.float32(1.0) / (factors * theta**exps)).astype(np.float32)
        scale = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig)) if max_pos > orig else 1.0
    else:
        # default, dynamic, and every type the runtime does not know (llama3,
        # linear, yarn in 0.7) all get the plain table.
        if kind == "dynamic" and capacity > max_pos:
            raise RuntimeRefusal("dynamic RoPE with KV capacity above max_position_embeddings")
        if r not in (64, 128):
            raise RuntimeRefusal(f"default RoPE table kernel does not support rotary dim {r}")
        inv = (np.float32(1.0) / theta**exps).astype(np.float32)
        scale = 1.0
    ang = (pos * inv[None, :]).astype(np.float32)
    table = np.concatenate([np.cos(ang), np.sin(ang)], axis=-1) * np.float32(scale)
    return table[None].astype(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a memory-mapped numpy array (header checked by the one
    safetensors reader, `SafetensorsFile`)."""
    import ml_dtypes

    from edgellm_core.safetensors_file import SafetensorsFile

    dtypes = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "BF16": ml_dtypes.bfloat16, "U8": np.uint8}
    tensors = SafetensorsFile(path).tensors
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, t in tensors.items():
        if t.dtype not in dtypes:
            raise RuntimeRefusal(f"{path}: tensor {name!r} has dtype {t.dtype}, which the runtime does not read")
        out[name] = data[t.start:t.end].view(dtypes[t.dtype]).reshape(t.shape)
    return out


class EmbeddingTable:
    """Token lookup from embedding.safetensors, fp16 or FP8 with per-128 block scales."""

    def __init__(self, path: Path):
        tensors = read_safetensors(path)
        self.table = tensors["embedding"]
        self.scale = tensors.get("embedding_scale")
        if self.table.dtype != np.float16 and self.scale is None:
            raise RuntimeRefusal(f"{path}: embedding must be F16, or F8_E4M3 with embedding_scale")

    def lookup(self, token_ids: np.ndarray) -> np.ndarray:
        rows = self.table[token_ids]
        if self.scale is None:
            return rows.astype(np.float16)
        groups = self.scale.shape[-1]
        vals = rows.astype(np.float32).reshape(*rows.shape[:-1], groups, -1)
        vals = vals * self.scale[token_ids][..., None]
        return vals.reshape(rows.shape).astype(np.float16)
