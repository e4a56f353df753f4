"""Shared fixtures: tiny random HF checkpoints made with transformers (the independent reference)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_option import pytest_addoption  # noqa: E402,F401  (--require-gpu)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """`validate`'s verification record goes to a per-run cache, not the user's ~/.cache (subprocesses
    inherit it through the environment)."""
    import os

    os.environ["EDGELLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("edgellm-cache"))

# Small but kernel-legal shapes: head_dim 64, GQA 2:1.
BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
            initializer_range=0.05)

FAMILIES = {
    "llama": dict(),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),  # Qwen2 always has q/k/v biases
    "qwen3": dict(head_dim=64, tie_word_embeddings=True),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def make_hf_model(model_type: str, seed: int = 0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = {**BASE, **FAMILIES.get(model_type, {}), **overrides}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        # Random biases and norm weights so every optional path carries signal.
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        # Sharper logits keep top-1 well separated from fp16 noise.
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.mul_(4.0)
        else:
            model.get_input_embeddings().weight.mul_(4.0)
    return model


def save_checkpoint(model, path: Path, dtype: str = "bfloat16", **save_kwargs) -> Path:
    import torch

    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, **save_kwargs)
    model.float()  # the reference then runs on exactly the stored values
    return path


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Cache of (checkpoint dir, fp32 HF model) per key, built once per session."""
    cache = {}

    def get(key: str, model_type: str | None = None, dtype: str = "bfloat16", **overrides):
        if key not in cache:
            model = make_hf_model(model_type or key, **overrides)
            path = save_checkpoint(model, tmp_path_factory.mktemp(key) / "ckpt", dtype)
            cache[key] = (path, model)
        return cache[key]

    return get


def hf_reference_logits(model, llm_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    """Logits HF transformers computes for every golden step, one full sequence at a time."""
    import torch

    meta = json.loads((llm_dir / "golden" / "bundle.json").read_text())
    out = {}
    for sc in meta["scenarios"]:
        batch = len(sc["steps"][0]["context_lengths"])
        seqs: list[list[int]] = [[] for _ in range(batch)]
        wanted: list[list[tuple[int, int]]] = [[] for _ in range(batch)]  # (step, position)
        for k, st in enumerate(sc["steps"]):
            for b in range(batch):
                n = st["context_lengths"][b] if st["phase"] != "decode" else 1
                seqs[b].extend(st["token_ids"][b][:n])
                wanted[b].append((k, len(seqs[b]) - 1))
        rows = {}
        with torch.no_grad():
            for b in range(batch):
                logits = model(torch.tensor([seqs[b]])).logits[0].float().numpy()
                for k, pos in wanted[b]:
                    rows.setdefault(k, [None] * batch)[b] = logits[pos]
        for k, per_b in rows.items():
            out[(sc["name"], k)] = np.stack(per_b)
    return out
