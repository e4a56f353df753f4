"""qualification.json: what was qualified, where, against which thresholds, and the verdicts.

The report is the source of truth; junit.xml and summary.md are rendered from it alone. One report holds
one or many cases (a suite aggregates single-case reports into the same schema). A case has an `outcome`
(what happened: pass / fail / error / skipped) and a `verdict` (the outcome judged against what the case
`expect`s, so a negative control that is expected to fail passes when it fails).

Numbers are written as strict JSON: a non-finite metric (NaN or inf logits) is written as null and is
rendered as "n/a"; such a case has already failed its cosine check.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import platform
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from edgellm_core import __version__
from edgellm_core.digests import sha256_file
from edgellm_core.errors import ExportError
from edgellm_core.manifest import MANIFEST
from edgellm_core.schema import StrictModel, case_label, explain, no_default

SCHEMA = "edgellm-qualification"
SCHEMA_VERSION = 1
REPORT_FILE = "qualification.json"
VERDICTS = ("pass", "fail", "error", "skipped")
OVERALL_VERDICTS = ("pass", "fail", "error")
EXPECTATIONS = ("pass", "fail", "error")
# threshold name -> (metric it bounds, comparison that passes)
THRESHOLD_CHECKS = {
    "min_cosine": ("worst_cosine", ">="),
    "min_top1_agreement": ("top1_agreement", ">="),
    "max_abs": ("max_abs", "<="),
}
# Distributions recorded in the environment; null means "not installed" (itself worth recording: a device
# image without torch proves that validation did not need it).
PACKAGES = ("edgellm-export", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "safetensors", "ml_dtypes",
            "jinja2", "PyYAML", "pydantic", "torch", "tensorrt", "pycuda", "cuda-python", "polygraphy")
_TENSORRT_DISTS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12")


class ReportError(ExportError):
    """A qualification report that is missing, malformed, foreign or inconsistent (exit code 2)."""


# ---------------------------------------------------------------- environment and artifacts


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken dist-info must not break a report
        return None


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    return {n: _dist_version(n) for n in names}


def tensorrt_version() -> str | None:
    """TensorRT's version without importing it where package metadata says it (pip, NGC images); JetPack's
    apt package may lack metadata, so then the module itself is imported and asked."""
    for dist in _TENSORRT_DISTS:
        if v := _dist_version(dist):
            return v
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return None
        import tensorrt  # noqa: PLC0415  (optional, device images only)

        return str(getattr(tensorrt, "__version__", "unknown"))
    except Exception:
        return None


def collect_environment(*, device: str | None = None, tensorrt: str | None = None,
                        extra: Mapping | None = None) -> dict:
    """Where the report was produced. `device`: a platform-matrix label (e.g. "jetson-orin-jp6"), if known;
    `tensorrt`: the version the backend actually loaded (beats probing); `extra`: e.g. plugin library path
    and sha256, CUDA version, builder workaround flags."""
    return {
        "host": {
            "hostname": socket.gethostname(),
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "tool": {"name": "edgellm-export", "version": __version__},
        "device": device,
        "tensorrt": tensorrt if tensorrt is not None else tensorrt_version(),
        "packages": package_versions(),
        "extra": dict(extra or {}),
    }


def _find_manifest(export_dir: Path) -> Path:
    for cand in (export_dir / MANIFEST, export_dir.parent / MANIFEST):  # OUT or OUT/llm
        if cand.is_file():
            return cand
    raise ReportError("has no manifest.json (in it or its parent), so the qualified artifact cannot be "
                      "identified; re-export it", export_dir)


def artifact_hashes(export_dir: str | Path) -> dict:
    """The export's identity from its manifest.json (written at export time, verified by `edgellm validate`
    before validating): per-file sha256 and size, plus the manifest's own sha256, one digest for the whole
    artifact. Files are not re-hashed here."""
    path = _find_manifest(Path(export_dir))
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        listed = {str(rel): {"sha256": str(m["sha256"]), "size": int(m["size"])} for rel, m in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReportError(f"manifest.json is unreadable ({e}); re-export", path) from None
    return {
        "manifest": str(path),
        "manifest_sha256": sha256_file(path),
        "manifest_format": manifest.get("format"),
        "exported_by": manifest.get("tool"),
        "files": dict(sorted(listed.items())),
    }


# ---------------------------------------------------------------- cases


def _num(x) -> float | None:
    """Strict-JSON number: non-finite (and non-numbers) become None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt_metric(value, metric: str | None = None) -> str:
    """A metric for people: cosines with 6 decimals (0.9999996 must not read as 1), top-1 with 3."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    if metric in ("worst_cosine", "min_cosine"):
        return f"{value:.6f}"
    if metric in ("top1_agreement", "min_top1_agreement"):
        return f"{value:.3f}"
    return f"{value:.4g}"


def check_message(check: Mapping) -> str:
    """'worst_cosine 0.998100 (required >= 0.999) FAILED'; the threshold as written, the value by metric."""
    status = "ok" if check["passed"] else "FAILED"
    thr = check["threshold"]
    thr = f"{thr:g}" if isinstance(thr, float) else fmt_metric(thr)
    return f"{check['metric']} {fmt_metric(check['value'], check['metric'])} (required {check['op']} {thr}) {status}"


def _case(name: str, *, outcome: str, reason: str, expect: str, target, backend, release, checkpoint,
          precision, export=None, backend_details=None, thresholds=None, thresholds_source=None, metrics=None,
          checks=None, failures=None, steps=None, artifacts=None, seconds=None, stage=None, judge: bool = True,
          checkpoint_hub=None, runtime_limits=None, components=None) -> dict:
    if expect not in EXPECTATIONS:
        raise ValueError(f"expect must be one of {EXPECTATIONS}, not {expect!r}")
    verdict, reason = _judge(outcome, expect, reason) if judge else (outcome, reason)
    return {
        "name": str(name),
        "target": None if target is None else str(target),
        "backend": None if backend is None else str(backend),
        "edgellm_release": None if release is None else str(release),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_hub": dict(checkpoint_hub) if checkpoint_hub else None,
        "export": None if export is None else str(export),
        "precision": precision,
        "expect": expect,
        "outcome": outcome,
        "verdict": verdict,
        "reason": reason,
        "stage": stage,
        "thresholds": dict(thresholds or {}),
        "thresholds_source": thresholds_source,
        "metrics": dict(metrics or {}),
        "checks": list(checks or []),
        "failures": [str(f) for f in failures or []],
        "steps": list(steps or []),
        "artifacts": artifacts,
        "backend_details": json.loads(json.dumps(backend_details, default=str)) if backend_details else None,
        "seconds": _num(seconds),
        "runtime_limits": [str(x) for x in runtime_limits] if runtime_limits else None,
        "components": json.loads(json.dumps(components, default=str)) if components else None,
    }


def _judge(outcome: str, expect: str, reason: str) -> tuple[str, str]:
    if outcome == "skipped" or expect == "pass":
        return outcome, reason
    if outcome == expect:
        how = "failed" if expect == "fail" else "refused"
        return "pass", f"{how} as expected: {reason}" if reason else f"{how} as expected"
    if outcome == "error" and expect == "fail":
        return "error", f"expected validation to fail, but it could not run: {reason}"
    return "fail", f"expected {expect}, got {outcome}" + (f": {reason}" if reason else "")


def _identity(target, backend, release, checkpoint, precision, expect):
    return dict(target=target, backend=backend, release=release, checkpoint=checkpoint, precision=precision,
                expect=expect)


def case_from_validation(name: str, validation: Mapping, *, target: str | None, release: str | None = None,
                         export_dir: str | Path | None = None, artifacts: dict | None = None,
                         checkpoint: str | Path | None = None, expect: str = "pass",
                         thresholds: Mapping | None = None, precision: str | None = None,
                         checkpoint_hub: Mapping | None = None) -> dict:
    """One case from `edgellm validate`'s result (the dict it returns, or OUT/validation.json loaded).

    `target` is the platform-matrix target the case ran on (edgellm_validate/data/platforms.json, e.g. "x86-cpu",
    "orin-jp6"); `release` the Edge-LLM release exported for (`edgellm export --target`). The backend is
    the one the validation names (what actually ran).

    `thresholds` overrides the precision's defaults key by key (min_cosine, min_top1_agreement, max_abs); the
    steps are then judged again by the same rules as compare.verdict. `precision`, when given, is what the
    case expects the export to be: a different precision fails the case (a checkpoint that silently stayed
    fp16 is not what was meant to be qualified). Artifact hashes come from the export's manifest.json
    (`export_dir`, else the validation's `export` path); an unidentifiable artifact is an error."""
    # The case's precision: what the suite expects, else what the export is (e.g. "fp16"), never blank.
    ident = _identity(target, validation.get("backend"), release, checkpoint,
                      precision if precision is not None else validation.get("precision"), expect)
    ident["checkpoint_hub"] = checkpoint_hub  # a hub checkpoint: repo_id, revision, commit, snapshot
    export = export_dir if export_dir is not None else validation.get("export")
    if artifacts is None:
        try:
            if export is None:
                raise ReportError("the validation result names no export directory")
            artifacts = artifact_hashes(export)
        except ReportError as e:
            return _case(name, outcome="error", reason=e.paragraph(), stage="report", export=export, **ident)
    steps = [_clean_step(s) for s in validation.get("steps") or []]
    defaults = dict(validation.get("thresholds") or {})
    effective = {**defaults, **dict(thresholds or {})}
    unknown = sorted(set(thresholds or {}) - set(THRESHOLD_CHECKS))  # validation's own extra keys are kept
    if unknown:
        raise ValueError(f"unknown threshold(s) {', '.join(unknown)}; known: {', '.join(THRESHOLD_CHECKS)}")
    source = "override" if thresholds else "default"
    common = dict(export=export, thresholds=effective, thresholds_source=source, steps=steps, artifacts=artifacts,
                  seconds=validation.get("seconds"), backend_details=validation.get("backend_details"),
                  runtime_limits=validation.get("runtime_limits"), components=validation.get("components"),
                  **ident)
    # The encoders' verdicts stand whatever the LLM thresholds are (an override judges the language model's steps).
    component_failures = [f"{comp}: " + str(c.get("reason") or "its output differs from its golden")
                          for comp, c in (validation.get("components") or {}).items() if not c.get("passed")]
    actual_precision = validation.get("precision")
    checks = []
    if precision is not None:
        checks.append({"metric": "precision", "value": actual_precision, "op": "==", "threshold": precision,
                       "passed": actual_precision == precision})
    if not steps:  # the twin never ran a step: e.g. the runtime would refuse the export
        failures = [str(f) for f in validation.get("failures") or []]
        if validation.get("passed"):
            return _case(name, outcome="error", reason="validation reported success without running any step",
                         stage="validate", checks=checks, **common)
        failures += [check_message(c) for c in checks if not c["passed"]]
        failures += [f for f in component_failures if f not in failures]
        return _case(name, outcome="fail", reason="; ".join(failures) or "validation failed", stage="validate",
                     checks=checks, failures=failures, **common)
    metrics = _aggregate_steps(steps)
    for key, (metric, op) in THRESHOLD_CHECKS.items():
        if key in effective and effective[key] is not None:
            value, thr = metrics.get(metric), float(effective[key])
            ok = value is not None and (value >= thr if op == ">=" else value <= thr)
            checks.append({"metric": metric, "value": value, "op": op, "threshold": thr, "passed": ok})
    failed_checks = [c for c in checks if not c["passed"]]
    failures = [check_message(c) for c in failed_checks] + _step_failures(steps, effective) + component_failures
    if source == "default" and not validation.get("passed", False) and not failed_checks and not component_failures:
        # Without an override, validation's own verdict stands: it may judge more than is re-checked here.
        failures += [str(f) for f in validation.get("failures") or []] or ["validation failed"]
    outcome = "fail" if failures else "pass"
    reason = "; ".join(check_message(c) for c in failed_checks) or "; ".join(failures)
    return _case(name, outcome=outcome, reason=reason, stage="validate", metrics=metrics, checks=checks,
                 failures=failures, **common)


def _clean_step(step: Mapping) -> dict:
    out = {}
    for k, v in step.items():
        out[k] = _num(v) if isinstance(v, float) else v
    return out


def _aggregate_steps(steps: list[dict]) -> dict:
    """worst cosine (min over steps), top-1 agreement (mean over steps), max |diff| (max over steps), as in
    compare.verdict. A non-finite value anywhere makes the aggregate null (unknown), never optimistic."""
    cos = [s.get("min_cosine") for s in steps]
    top1 = [s.get("top1_agree") for s in steps]
    mab = [s.get("max_abs") for s in steps]
    return {
        "worst_cosine": None if None in cos else min(cos),
        "top1_agreement": None if None in top1 else sum(top1) / len(top1),
        "max_abs": None if None in mab else max(mab),
        "steps": len(steps),
        "scenarios": len({s.get("scenario") for s in steps}),
    }


def _step_failures(steps: list[dict], thresholds: Mapping) -> list[str]:
    """Per-step lines in compare.verdict's words (kept in step by a test)."""
    out = []
    min_cos = thresholds.get("min_cosine")
    max_abs = thresholds.get("max_abs")
    for s in steps:
        where = f"{s.get('scenario')}[{s.get('step')}] {s.get('phase')}"
        c = s.get("min_cosine")
        if min_cos is not None and (c is None or c < min_cos):
            out.append(f"{where}: cosine {c:.6f} < {min_cos}" if c is not None else f"{where}: cosine n/a (non-finite)")
        m = s.get("max_abs")
        if max_abs is not None and (m is None or m > max_abs):
            out.append(f"{where}: max |diff| {fmt_metric(m)} > {max_abs}")
    return out


def case_error(name: str, message: str, *, stage: str | None = None, target: str | None = None,
               backend: str | None = None, release: str | None = None,
               checkpoint: str | Path | None = None, precision: str | None = None,
               expect: str = "pass", export: str | Path | None = None, artifacts: dict | None = None,
               seconds: float | None = None, checkpoint_hub: Mapping | None = None) -> dict:
    """A case that could not be judged: export refused the checkpoint, the backend is missing, ...
    With expect="error" (a checkpoint that must be refused) it is a pass."""
    return _case(name, outcome="error", reason=" ".join(str(message).split()), stage=stage, export=export,
                 artifacts=artifacts, seconds=seconds, checkpoint_hub=checkpoint_hub,
                 **_identity(target, backend, release, checkpoint, precision, expect))


def case_missing(name: str, *, target: str | None = None, backend: str | None = None,
                 release: str | None = None,
               checkpoint: str | Path | None = None, precision: str | None = None, expect: str = "pass") -> dict:
    """A case that should have been run but left no report (crashed or interrupted run). Always an error,
    even where the case expects one: a missing report proves nothing."""
    return _case(name, outcome="error", reason="no report was produced for this case (the run crashed or was "
                 "interrupted before writing it)", judge=False,
                 **_identity(target, backend, release, checkpoint, precision, expect))


def case_skipped(name: str, reason: str, *, target: str | None = None, backend: str | None = None,
                 release: str | None = None,
               checkpoint: str | Path | None = None, precision: str | None = None, expect: str = "pass") -> dict:
    """A case deliberately not run (the suite says so, or the target cannot run its precision)."""
    return _case(name, outcome="skipped", reason=" ".join(str(reason).split()),
                 **_identity(target, backend, release, checkpoint, precision, expect))


# ---------------------------------------------------------------- reports


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def overall(cases: list[Mapping]) -> tuple[str, str, dict]:
    """(verdict, reason, counts). Any failure fails the qualification; then any error; a report in which
    nothing passed (empty, or every case skipped) fails too: a green build must have qualified something."""
    counts = {v: 0 for v in VERDICTS}
    for c in cases:
        counts[c["verdict"]] += 1
    counts["total"] = len(cases)

    def names(v):
        picked = [c["name"] for c in cases if c["verdict"] == v]
        return ", ".join(picked[:5]) + (f" and {len(picked) - 5} more" if len(picked) > 5 else "")

    if not cases:
        return "fail", "the report has no cases", counts
    if counts["fail"]:
        return "fail", f"{counts['fail']} of {len(cases)} case(s) failed: {names('fail')}", counts
    if counts["error"]:
        return "error", f"{counts['error']} of {len(cases)} case(s) could not be judged: {names('error')}", counts
    if not counts["pass"]:
        return "fail", f"no case ran: all {len(cases)} skipped", counts
    skipped = f", {counts['skipped']} skipped" if counts["skipped"] else ""
    return "pass", f"{counts['pass']} of {len(cases)} case(s) passed{skipped}", counts


def new_report(cases: Iterable[Mapping], *, environment: Mapping | None = None, suite: Mapping | None = None,
               created: str | None = None) -> dict:
    """A qualification report over `cases` (from case_from_validation / case_error / case_skipped)."""
    cases = [dict(c) for c in cases]
    seen = set()
    for c in cases:
        if c["name"] in seen:
            raise ReportError(f"two cases are named {c['name']!r}; case names must be unique")
        seen.add(c["name"])
    verdict, reason, counts = overall(cases)
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": created or _now(),
        "suite": dict(suite) if suite else None,
        "environment": dict(environment) if environment is not None else collect_environment(),
        "verdict": verdict,
        "verdict_reason": reason,
        "summary": counts,
        "cases": cases,
    }
    validate_qualification(doc, "<new report>")
    return doc


def merge_reports(reports: Iterable[Mapping], *, environment: Mapping | None = None, suite: Mapping | None = None,
                  order: list[str] | None = None) -> dict:
    """One report with the cases of many. Cases whose report came from another environment than the merged
    report's (`environment`, else the first report's) keep theirs under the case's `environment` key.
    `order` lists case names to put first, in that order."""
    reports = [validate_qualification(r, f"<report {i + 1}>") for i, r in enumerate(reports)]
    env = dict(environment) if environment is not None else (reports[0]["environment"] if reports else None)
    cases, where = [], {}
    for i, r in enumerate(reports):
        for c in r["cases"]:
            if c["name"] in where:
                raise ReportError(f"case {c['name']!r} appears in reports {where[c['name']] + 1} and {i + 1}; "
                                  "each case must be reported once")
            where[c["name"]] = i
            c = dict(c)
            if "environment" not in c and r["environment"] != env:
                c["environment"] = r["environment"]
            cases.append(c)
    if order:
        rank = {n: k for k, n in enumerate(order)}
        cases.sort(key=lambda c: rank.get(c["name"], len(rank)))
    return new_report(cases, environment=env, suite=suite)


# ---------------------------------------------------------------- schema check, load, dump


class Check(StrictModel):
    """One threshold (or precision) check of a case: `value op threshold` passed or not."""

    metric: str
    value: float | str | None = Field(description="the measured value; null: not finite or not measured")
    op: Literal[">=", "<=", "=="]
    threshold: float | str
    passed: bool


class SuiteMeta(StrictModel):
    """The suite a report qualifies (edgellm qualify), as the report's `suite` object."""

    name: str
    file: str | None = Field(None, json_schema_extra=no_default)
    sha256: str | None = Field(None, json_schema_extra=no_default)
    format: int | None = Field(None, json_schema_extra=no_default)
    cases: list[str] | None = Field(None, description="the suite's case names, in order",
                                    json_schema_extra=no_default)


class Summary(StrictModel):
    """Cases per verdict."""

    pass_: int = Field(alias="pass", ge=0)
    fail: int = Field(ge=0)
    error: int = Field(ge=0)
    skipped: int = Field(ge=0)
    total: int = Field(ge=0)


class ReportCase(StrictModel):
    """One qualified case: what ran where, its outcome, and the verdict against what it expects."""

    name: str = Field(min_length=1)
    target: str | None = Field(None, description="platform-matrix target")
    backend: str | None = None
    edgellm_release: str | None = None
    checkpoint: str | None = None
    checkpoint_hub: dict[str, str | None] | None = Field(
        None, description="a checkpoint named by hub id: repo_id, revision asked for, commit, snapshot path")
    export: str | None = None
    precision: str | None = None
    expect: Literal[EXPECTATIONS]
    outcome: Literal[VERDICTS] = Field(description="what happened")
    verdict: Literal[VERDICTS] = Field(description="the outcome judged against `expect`")
    reason: str
    stage: str | None = None
    thresholds: dict[str, float | None]
    thresholds_source: Literal["default", "override"] | None = None
    metrics: dict[str, float | None]
    checks: list[Check]
    failures: list[str]
    steps: list[dict[str, Any]]
    artifacts: dict[str, Any] | None = Field(None, description="the export's identity from its manifest.json")
    backend_details: dict[str, Any] | None = None
    seconds: float | None = None
    runtime_limits: list[str] | None = Field(
        None, description="what the Edge-LLM runtime does to this export that no export can change (not failures)")
    components: dict[str, dict[str, Any]] | None = Field(
        None, description="the export's encoders (e.g. visual), each validated on its golden inputs")
    environment: dict[str, Any] | None = Field(None, description="where the case ran, when not where the report "
                                                                 "was merged", json_schema_extra=no_default)


class QualificationReport(StrictModel):
    """qualification.json, schema version 1."""

    model_config = {"title": "edgellm qualification report"}

    schema_: Literal[SCHEMA] = Field(alias="schema")
    schema_version: int = Field(ge=1, le=SCHEMA_VERSION)
    created: str = Field(description="UTC, ISO 8601")
    suite: SuiteMeta | None = None
    environment: dict[str, Any] = Field(description="host, python, tool, device, tensorrt, packages, extra")
    verdict: Literal[OVERALL_VERDICTS]
    verdict_reason: str
    summary: Summary
    cases: list[ReportCase]


def validate_qualification(doc, source: str | Path = REPORT_FILE) -> dict:
    """Return `doc` if it is a qualification report this version can read, else raise ReportError.

    The schema is the QualificationReport model (`edgellm schema report`); beyond it, case names must be
    unique and the verdict and summary must be the ones the cases give."""

    def bad(msg: str):
        raise ReportError(f"is not a valid qualification report: {msg}", source)

    if not isinstance(doc, dict):
        bad(f"expected a JSON object, found {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        bad(f"'schema' is {doc.get('schema')!r}, expected {SCHEMA!r} (a foreign JSON file?)")
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        bad(f"'schema_version' must be a positive integer, found {version!r}")
    if version > SCHEMA_VERSION:
        raise ReportError(f"was written with qualification schema version {version}, newer than this "
                          f"edgellm-export {__version__} reads (up to {SCHEMA_VERSION}); upgrade edgellm-export",
                          source)
    try:
        QualificationReport.model_validate(doc)
    except ValidationError as e:
        bad(explain(e, QualificationReport, doc, label=case_label))
    names: dict[str, int] = {}
    for i, c in enumerate(doc["cases"]):
        if c["name"] in names:
            bad(f"cases[{i}]: duplicate case name {c['name']!r} (also cases[{names[c['name']]}])")
        names[c["name"]] = i
    verdict, _, counts = overall(doc["cases"])
    if doc["verdict"] != verdict or doc["summary"] != counts:
        bad(f"its verdict {doc['verdict']!r} / summary disagree with its cases (they give {verdict!r}, "
            f"{counts}); was it edited by hand?")
    return doc


def dumps_qualification(doc: Mapping) -> str:
    """Strict JSON (no NaN/Infinity), stable indentation, trailing newline."""
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def load_qualification(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError("no such qualification report", path) from None
    except UnicodeDecodeError:
        raise ReportError("is not UTF-8 text, so not a qualification report", path) from None
    except OSError as e:
        raise ReportError(f"cannot be read ({e.strerror})", path) from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ReportError(f"is not valid JSON ({e}), so not a qualification report", path) from None
    return validate_qualification(doc, path)
