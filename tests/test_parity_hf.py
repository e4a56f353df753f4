"""The export, run by the CPU runtime twin, computes what HF transformers computes.

For every supported family: plain prefill, chunked prefill and 4 teacher-forced
decode steps, batch 2 with ragged prompts; cosine >= 0.999 and identical top-1
at every step against transformers on the same checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LLAMA3_ROPE, hf_reference_logits

from edgellm_export.export import ExportOptions, export_checkpoint
from edgellm_validate.compare import cosine_rows
from edgellm_validate.cpu_backend import CpuBackend
from edgellm_validate.twin import run_twin
from edgellm_validate.validate import validate_export


def twin_vs_hf(ckpt, model, out, **opts):
    export_checkpoint(ckpt, out, ExportOptions(**opts))
    llm = out / "llm"
    ref = hf_reference_logits(model, llm)
    run = run_twin(llm, CpuBackend(llm))
    rows = []
    for s in run.steps:
        want = ref[(s.scenario, s.index)]
        rows.append((s.scenario, s.index, s.phase, float(cosine_rows(s.logits, want).min()),
                     bool((s.logits.argmax(-1) == want.argmax(-1)).all())))
    return rows


def assert_parity(rows):
    phases = {r[2] for r in rows}
    assert phases == {"prefill", "chunked_prefill", "decode"}
    assert sum(r[2] == "decode" for r in rows) >= 8  # 4+ per scenario
    for scenario, k, phase, cos, top1 in rows:
        assert cos >= 0.999, f"{scenario}[{k}] {phase}: cosine {cos}"
        assert top1, f"{scenario}[{k}] {phase}: top-1 differs from transformers"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_family_matches_transformers(family, hf_checkpoints, tmp_path):
    ckpt, model = hf_checkpoints(family)
    assert_parity(twin_vs_hf(ckpt, model, tmp_path / "out"))
    # The golden bundle agrees too, so `edgellm validate` passes on its own.
    assert validate_export(tmp_path / "out")["passed"]


def test_qwen2_biases_and_qwen3_qk_norm_are_detected(hf_checkpoints):
    from edgellm_export.checkpoint import open_checkpoint
    from edgellm_export.config import build_model_config

    for fam, flag in (("qwen2", "qkv_bias"), ("qwen3", "has_qk_norm")):
        ckpt, _ = hf_checkpoints(fam)
        with open_checkpoint(ckpt) as c:
            cfg = build_model_config(c.config, c.has_layer_tensor, c.config_path)
        assert getattr(cfg, flag)


def test_llama3_rope_scaling_is_rewritten_exactly(hf_checkpoints, tmp_path):
    ckpt, model = hf_checkpoints("llama3rope", "llama", rope_parameters=LLAMA3_ROPE)
    assert_parity(twin_vs_hf(ckpt, model, tmp_path / "out"))


def test_llama3_rope_passthrough_would_be_wrong(hf_checkpoints, tmp_path):
    """What the reference exporter does (llama3 dict verbatim) fails the same check."""
    ckpt, model = hf_checkpoints("llama3rope", "llama", rope_parameters=LLAMA3_ROPE)
    rows = twin_vs_hf(ckpt, model, tmp_path / "out", unsafe_rope_passthrough=True)
    worst = min(r[3] for r in rows)
    assert worst < 0.99, f"passthrough unexpectedly close to HF (worst cosine {worst})"
    assert not all(r[4] for r in rows)
    assert not validate_export(tmp_path / "out")["passed"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fp16_and_fp32_checkpoints(dtype, hf_checkpoints, tmp_path):
    ckpt, model = hf_checkpoints(f"llama_{dtype}", "llama", dtype=dtype)
    rows = twin_vs_hf(ckpt, model, tmp_path / "out")
    assert_parity(rows)
    assert np.isfinite([r[3] for r in rows]).all()
