"""The runtime twin: drives a backend through the golden scenarios the way llm_inference does.

Per step it embeds tokens from embedding.safetensors, builds the RoPE table from
config.json by the runtime's rules, feeds context_lengths / kvcache_start_index /
last_token_ids with their per-phase meanings, and feeds the full-capacity KV
buffers returned by the previous step back in (the runtime binds them in place).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runtime_rules import EmbeddingTable, read_safetensors, rope_table

BUNDLE = Path("golden") / "bundle.json"
LOGITS = Path("golden") / "logits.safetensors"


@dataclass
class StepResult:
    scenario: str
    index: int
    phase: str
    logits: np.ndarray  # [B, V] from the backend
    expected: np.ndarray  # [B, V] from the bundle


@dataclass
class TwinRun:
    steps: list[StepResult] = field(default_factory=list)


def load_bundle(llm_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((llm_dir / BUNDLE).read_text())
    return meta, read_safetensors(llm_dir / LOGITS)


def run_twin(llm_dir: Path, backend) -> TwinRun:
    """Replay the golden bundle's scenarios through `backend`, paired with expected logits."""
    meta, expected = load_bundle(llm_dir)
    run = TwinRun()
    for sc, k, step, logits in drive(llm_dir, backend, meta["scenarios"], int(meta["kv_capacity"])):
        run.steps.append(StepResult(sc, k, step["phase"], logits, np.asarray(expected[step["logits"]], np.float32)))
    return run


def drive(llm_dir: Path, backend, scenarios: list[dict], capacity: int):
    """Run scenarios (bundle format) like llm_inference; yields (scenario, index, step, logits [B, V])."""
    config = json.loads((llm_dir / "config.json").read_text())
    table = rope_table(config, capacity)
    emb = EmbeddingTable(llm_dir / "embedding.safetensors")
    n_layers, hkv, d = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    kv_dtype = backend.kv_cache_dtype() if hasattr(backend, "kv_cache_dtype") else np.float16
    for sc in scenarios:
        batch = len(sc["steps"][0]["context_lengths"])
        # Full-capacity buffers, fed back in place as the runtime binds them (zero bytes are
        # +0.0 in fp16 and in fp8 alike).
        kv = [np.zeros((batch, 2, hkv, capacity, d), kv_dtype) for _ in range(n_layers)]
        for k, st in enumerate(sc["steps"]):
            tokens = np.asarray(st["token_ids"], dtype=np.int64)
            feeds = {
                "inputs_embeds": emb.lookup(tokens),
                "rope_rotary_cos_sin": table,
                "context_lengths": np.asarray(st["context_lengths"], np.int32),
                "kvcache_start_index": np.asarray(st["kvcache_start_index"], np.int32).reshape(-1),
                "last_token_ids": np.asarray(st["last_token_ids"], np.int64).reshape(batch, 1),
            }
            for i in range(n_layers):
                feeds[f"past_key_values_{i}"] = kv[i]
            out = backend.run(feeds)
            kv = [out[f"present_key_values_{i}"] for i in range(n_layers)]
            yield sc["name"], k, st, out["logits"][:, 0, :].astype(np.float32)
