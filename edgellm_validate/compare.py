"""Per-step comparison of backend logits with the golden bundle, thresholds per precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The one table of thresholds, per precision part (an export's precision is `+`-joined parts,
# e.g. `nvfp4+fp8_kv`; the strictest bound any part allows is the loosest of its parts):
#   golden: backend vs the golden bundle, i.e. the same quantized numerics computed twice
#     (min cosine per sequence, min top-1 agreement over all sequences and steps);
#   reference: the export vs an independent model on dequantized weights with unquantized
#     activations and cache (min cosine), what the quantization itself costs; tests hold it.
THRESHOLDS = {
    #  part                golden cos, top-1   reference cos
    "fp16":               (0.999, 1.0,        0.999),
    "fp8_embedding":      (0.995, 0.95,       0.99),
    "fp8":                (0.995, 0.9,        0.99),
    "fp8_kv":             (0.995, 0.9,        0.99),
    "int8_sq":            (0.995, 0.9,        0.99),
    "int4_awq_modelopt":  (0.999, 1.0,        0.99),
    "int4_awq_gemm":      (0.999, 1.0,        0.99),
    "int4_gptq":          (0.999, 1.0,        0.99),
    "mxfp8":              (0.99, 0.9,         0.96),
    "nvfp4":              (0.99, 0.9,         0.96),
}


def thresholds(precision: str) -> tuple[float, float, float]:
    """(golden min cosine, golden min top-1, reference min cosine) for a precision label."""
    parts = precision.split("+")
    unknown = [p for p in parts if p not in THRESHOLDS]
    if unknown:
        raise ValueError(f"unknown precision {'+'.join(unknown)!r} in the golden bundle")
    return tuple(min(THRESHOLDS[p][i] for p in parts) for i in range(3))


@dataclass
class StepMetrics:
    scenario: str
    step: int
    phase: str
    max_abs: float
    min_cosine: float
    top1_agree: float  # fraction of sequences whose argmax matches


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return num / np.maximum(den, 1e-30)


def step_metrics(scenario: str, step: int, phase: str, got: np.ndarray, want: np.ndarray) -> StepMetrics:
    finite = bool(np.isfinite(got).all())
    return StepMetrics(
        scenario, step, phase,
        max_abs=float(np.abs(got - want).max()) if finite else float("inf"),
        min_cosine=float(cosine_rows(got, want).min()) if finite else -1.0,
        top1_agree=float((got.argmax(-1) == want.argmax(-1)).mean()),
    )


def verdict(metrics: list[StepMetrics], precision: str) -> dict:
    min_cos, min_top1, _ = thresholds(precision)
    worst_cos = min(m.min_cosine for m in metrics)
    top1 = float(np.mean([m.top1_agree for m in metrics]))
    failures = [f"{m.scenario}[{m.step}] {m.phase}: cosine {m.min_cosine:.6f} < {min_cos}"
                for m in metrics if m.min_cosine < min_cos]
    if top1 < min_top1:
        failures.append(f"top-1 agreement {top1:.3f} < {min_top1}")
    return {
        "passed": not failures,
        "precision": precision,
        "thresholds": {"min_cosine": min_cos, "min_top1_agreement": min_top1},
        "worst_cosine": worst_cos,
        "top1_agreement": top1,
        "max_abs": max(m.max_abs for m in metrics),
        "failures": failures,
        "steps": [asdict(m) for m in metrics],
    }
