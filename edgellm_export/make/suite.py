"""Qualification suites: SUITE.yaml declares the cases a release is qualified on; `aggregate` joins their
per-case reports into one qualification report (same schema, many cases).

    format: 1                       # optional; the only format so far
    name: release-0.2               # optional; default: the file's stem
    defaults:                       # optional; merged into every case (thresholds/options key by key)
      target: x86-cpu
      thresholds: {min_cosine: 0.999}
    cases:
      - name: llama-3.2-1b          # letters, digits, . _ - + @ (it names a directory)
        checkpoint: ${MODELS}/Llama-3.2-1B-Instruct   # relative to this file; ~ and $VARS expanded
        target: [x86-cpu, orin-jp7] # a platform-matrix target, or a list: one case per target, "name@target"
        release: "0.7"              # Edge-LLM release to export for (edgellm export --target); quoted
        precision: fp16             # optional: the export must come out as this precision label
        options: {fp8_embedding: false, clamp_fp16: false}  # export options
        thresholds: {min_cosine: 0.998, min_top1_agreement: 1.0, max_abs: 0.5}  # override the defaults
        expect: pass                # pass (default) | fail: a negative control validation must catch |
                                    # error: a checkpoint the exporter must refuse
      - name: thor-nvfp4
        checkpoint: ./ckpt/nvfp4
        target: thor-jp7
        skip: no Thor board in the lab this week   # a deliberate skip, with its reason

Version numbers must be quoted: YAML reads `0.10` as the number 0.1. Mistakes (unknown keys, duplicate
keys, wrong types, unknown targets, a precision the target cannot run, a checkpoint that is not there)
are reported before anything runs, as one paragraph naming the file, the case and the problem. Only
yaml.safe_load builds objects; yaml.compose (nodes only, nothing constructed) finds duplicate keys, which
safe_load would silently collapse into the last one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError

SUITE_FORMAT = 1
MAX_SUITE_BYTES = 1 << 20
TOP_KEYS = ("format", "name", "defaults", "cases")
CASE_KEYS = ("name", "checkpoint", "target", "release", "precision", "options", "thresholds", "expect", "skip",
             "description")
DEFAULT_KEYS = ("target", "release", "precision", "options", "thresholds", "expect")
EXPECT = ("pass", "fail", "error")
# threshold -> (lowest, highest) allowed value
THRESHOLDS = {"min_cosine": (-1.0, 1.0), "min_top1_agreement": (0.0, 1.0), "max_abs": (0.0, float("inf"))}
# export options a case may set (ExportOptions fields; all booleans). `golden` is not one: validation needs it.
# unsafe_rope_passthrough reproduces the reference exporter's RoPE handling: for negative controls only.
EXPORT_OPTIONS = ("fp8_embedding", "clamp_fp16", "convert_pickle", "unsafe_rope_passthrough")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}$")
_RELEASE = re.compile(r"^\d+\.\d+(\.\d+)?$")


class SuiteError(ExportError):
    """A malformed suite file (exit code 2); the message names the file, the case and the problem."""


@dataclass(frozen=True)
class SuiteCase:
    name: str
    checkpoint: Path
    target: str
    backend: str | None  # "cpu" / "trt", from the platform matrix (None when targets were not checked)
    release: str | None  # Edge-LLM release for the export; None: the exporter's default
    precision: str | None = None
    expect: str = "pass"
    thresholds: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    skip: str | None = None
    description: str | None = None

    def export_options(self) -> dict:
        """Keyword arguments for ExportOptions (golden is always on: the case is validated)."""
        out = dict(self.options)
        if self.release is not None:
            out["target"] = self.release
        return out

    def report_identity(self) -> dict:
        """Keyword arguments for the report's case builders (case_error, case_skipped, ...)."""
        return {"target": self.target, "backend": self.backend, "release": self.release,
                "checkpoint": str(self.checkpoint), "precision": self.precision, "expect": self.expect}


@dataclass(frozen=True)
class Suite:
    path: Path
    name: str
    sha256: str
    cases: list[SuiteCase]

    def meta(self) -> dict:
        """The report's `suite` object."""
        return {"name": self.name, "file": str(self.path), "sha256": self.sha256, "format": SUITE_FORMAT,
                "cases": [c.name for c in self.cases]}

    def case(self, name: str) -> SuiteCase:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)


# ---------------------------------------------------------------- YAML


def _read_yaml(path: Path):
    try:
        import yaml
    except ImportError:
        raise ExportError("reading a suite file needs PyYAML, which is not installed; "
                          "install it with `pip install pyyaml`", path) from None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SuiteError("no such suite file", path) from None
    except IsADirectoryError:
        raise SuiteError("is a directory, not a suite file", path) from None
    except OSError as e:
        raise SuiteError(f"cannot be read ({e.strerror})", path) from None
    if len(raw) > MAX_SUITE_BYTES:
        raise SuiteError(f"is {len(raw):,} bytes; a suite file is a short list of cases (at most "
                         f"{MAX_SUITE_BYTES:,} bytes)", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SuiteError(f"is not UTF-8 text (byte {e.start})", path) from None
    try:
        _no_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SuiteError(f"is not valid YAML: {_yaml_problem(e)}", path) from None
    return data, hashlib.sha256(raw).hexdigest()


def _yaml_problem(e) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _no_duplicate_keys(node, path: Path) -> None:
    import yaml

    seen_nodes: set[int] = set()
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if id(n) in seen_nodes:  # aliases share nodes; visit each once
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            keys: dict[str, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in keys:
                        raise SuiteError(f"key {k.value!r} appears twice in one mapping (lines {keys[k.value]} "
                                         f"and {k.start_mark.line + 1}); YAML would keep only the last", path)
                    keys[k.value] = k.start_mark.line + 1
                stack += [k, v]
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value


# ---------------------------------------------------------------- checks


class _Where:
    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label

    def fail(self, msg: str):
        raise SuiteError(f"{self.label}: {msg}" if self.label else msg, self.path)


def _string(where: _Where, key: str, value, *, what: str = "a string") -> str:
    if isinstance(value, bool) or isinstance(value, int | float):
        where.fail(f"{key!r} must be {what}, but YAML read {value!r} as a {type(value).__name__}; quote it "
                   f"({key}: \"{value}\")")
    if not isinstance(value, str) or not value.strip():
        where.fail(f"{key!r} must be {what}, found {type(value).__name__} {value!r}")
    return value.strip()


def _mapping(where: _Where, key: str, value) -> dict:
    if not isinstance(value, dict):
        where.fail(f"{key!r} must be a mapping (key: value lines), found {type(value).__name__}")
    return value


def _unknown(where: _Where, obj: Mapping, allowed: Iterable[str], what: str) -> None:
    bad = [str(k) for k in obj if k not in allowed]
    if bad:
        where.fail(f"unknown {what} {', '.join(repr(b) for b in bad)}; allowed: {', '.join(allowed)}")


def _thresholds(where: _Where, value) -> dict:
    value = _mapping(where, "thresholds", value)
    _unknown(where, value, THRESHOLDS, "threshold")
    out = {}
    for k, v in value.items():
        lo, hi = THRESHOLDS[k]
        if isinstance(v, bool) or not isinstance(v, int | float) or not (lo <= v <= hi) or v != v:
            where.fail(f"threshold {k!r} must be a number from {lo:g} to {hi:g}, found {v!r}")
        out[k] = float(v)
    return out


def _options(where: _Where, value) -> dict:
    value = _mapping(where, "options", value)
    _unknown(where, value, EXPORT_OPTIONS, "export option")
    for k, v in value.items():
        if not isinstance(v, bool):
            where.fail(f"export option {k!r} must be true or false, found {v!r}")
    return dict(value)


def _release(where: _Where, value) -> str:
    release = _string(where, "release", value, what="an Edge-LLM release such as \"0.7\"")
    if not _RELEASE.match(release):
        where.fail(f"'release' {release!r} is not a release number such as \"0.7\" or \"0.7.1\"")
    from ..contract import CONTRACTS

    if ".".join(release.split(".")[:2]) not in CONTRACTS:
        where.fail(f"Edge-LLM release {release!r} is not supported by this exporter; supported: "
                   f"{', '.join(sorted(CONTRACTS))}")
    return release


def _precision(where: _Where, value) -> str:
    from edgellm_validate.targets import BUNDLE_LABELS

    label = _string(where, "precision", value, what="a precision label such as fp16 or nvfp4+fp8_kv")
    unknown = [p for p in label.split("+") if p not in BUNDLE_LABELS]
    if unknown:
        where.fail(f"precision {label!r} has unknown part(s) {', '.join(unknown)}; known: "
                   f"{', '.join(BUNDLE_LABELS)} (joined with +)")
    return label


def _checkpoint(where: _Where, value, base: Path, check: bool) -> Path:
    text = _string(where, "checkpoint", value, what="a directory path")
    expanded = os.path.expanduser(os.path.expandvars(text))
    if "$" in expanded:
        where.fail(f"checkpoint {text!r} uses an environment variable that is not set")
    p = Path(expanded)
    p = p if p.is_absolute() else base / p
    if check and not p.is_dir():
        where.fail(f"checkpoint {str(p)!r} is not a directory" + (" (it does not exist)" if not p.exists() else ""))
    return p


# ---------------------------------------------------------------- loading


def load_suite(path: str | Path, *, check_paths: bool = True, check_targets: bool = True,
               platforms_path: str | Path | None = None) -> Suite:
    """Parse and check SUITE.yaml. `check_paths`: every (non-skipped) checkpoint must be a directory now;
    `check_targets`: targets must be in the platform matrix (containers/platforms.json or
    $EDGELLM_PLATFORMS), whose backend they take, and a declared precision must be one the target can run."""
    path = Path(path)
    data, digest = _read_yaml(path)
    top = _Where(path, "")
    if data is None:
        top.fail("is empty; a suite is a mapping with a 'cases' list")
    if not isinstance(data, dict):
        top.fail(f"must be a mapping with a 'cases' list at the top level, found a {type(data).__name__}")
    _unknown(top, data, TOP_KEYS, "top-level key")
    fmt = data.get("format", SUITE_FORMAT)
    if fmt != SUITE_FORMAT or isinstance(fmt, bool):
        top.fail(f"'format' is {fmt!r}; this edgellm reads suite format {SUITE_FORMAT}")
    name = _string(top, "name", data["name"]) if "name" in data else path.stem
    defaults = _mapping(top, "defaults", data.get("defaults") or {})
    _unknown(_Where(path, "defaults"), defaults, DEFAULT_KEYS, "key in 'defaults'")
    cases_raw = data.get("cases")
    if not isinstance(cases_raw, list) or not cases_raw:
        top.fail("needs a non-empty 'cases' list" + ("" if "cases" in data else " (there is no 'cases' key)"))
    platforms = _platforms(path, platforms_path) if check_targets else None
    cases: list[SuiteCase] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(cases_raw, 1):
        label = f"case {i}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            label += f" ({raw['name']!r})"
        for case in _parse_case(_Where(path, label), raw, defaults, path.parent, platforms, check_paths):
            if case.name in seen:
                raise SuiteError(f"{label}: case name {case.name!r} is also used by case {seen[case.name]}; "
                                 "names must be unique", path)
            seen[case.name] = i
            cases.append(case)
    return Suite(path, name, digest, cases)


def _platforms(path: Path, platforms_path):
    from edgellm_validate.targets import edgellm_release, load_platforms

    return load_platforms(platforms_path), edgellm_release(platforms_path)


def _parse_case(where: _Where, raw, defaults: Mapping, base: Path, platforms, check_paths: bool) -> list[SuiteCase]:
    if not isinstance(raw, dict):
        where.fail(f"must be a mapping with at least name, checkpoint and target, found {type(raw).__name__}")
    _unknown(where, raw, CASE_KEYS, "key")
    for key in ("name", "checkpoint"):
        if key not in raw:
            where.fail(f"has no {key!r}")
    name = _string(where, "name", raw["name"])
    if not _NAME.match(name):
        where.fail(f"name {name!r} may use only letters, digits, '.', '_', '-', '+' and '@' (it names a directory)")
    merged = {**defaults, **raw}
    for key in ("thresholds", "options"):  # key by key, case over defaults
        merged[key] = {**_mapping(where, f"defaults.{key}", defaults.get(key) or {}),
                       **_mapping(where, key, raw.get(key) or {})}
    if "target" not in merged:
        where.fail("has no 'target' (a platform-matrix target such as x86-cpu), neither in the case nor in "
                   "'defaults'")
    targets = merged["target"]
    targets = [targets] if not isinstance(targets, list) else targets
    if not targets:
        where.fail("'target' is an empty list")
    targets = [_string(where, "target", t, what="a target name") for t in targets]
    if len(set(targets)) != len(targets):
        where.fail("'target' lists a target twice")
    skip = None
    if raw.get("skip") is not None:
        skip = _string(where, "skip", raw["skip"], what="the reason the case is skipped")
    description = _string(where, "description", raw["description"]) if raw.get("description") else None
    expect = merged.get("expect", "pass")
    if expect not in EXPECT:
        where.fail(f"'expect' must be one of {', '.join(EXPECT)}, found {expect!r}")
    release = _release(where, merged["release"]) if merged.get("release") is not None else None
    precision = _precision(where, merged["precision"]) if merged.get("precision") is not None else None
    thresholds = _thresholds(where, merged["thresholds"])
    options = _options(where, merged["options"])
    checkpoint = _checkpoint(where, raw["checkpoint"], base, check_paths and skip is None)
    out = []
    for t in targets:
        backend = None
        if platforms is not None:
            backend = _check_target(where, t, release, precision, *platforms)
        out.append(SuiteCase(name=f"{name}@{t}" if len(targets) > 1 else name, checkpoint=checkpoint, target=t,
                             backend=backend, release=release, precision=precision, expect=expect,
                             thresholds=thresholds, options=options, skip=skip, description=description))
    return out


def _check_target(where: _Where, name: str, release: str | None, precision: str | None, targets: Mapping,
                  matrix_release: str | None) -> str:
    from edgellm_validate.targets import BUNDLE_LABELS

    if name not in targets:
        where.fail(f"unknown target {name!r}; the platform matrix has: {', '.join(targets)}")
    t = targets[name]
    if release and matrix_release and release.split(".")[:2] != matrix_release.split(".")[:2]:
        where.fail(f"exports for Edge-LLM {release}, but target {name}'s plugin is built from {matrix_release}; "
                   "graphs and engines are not portable across releases")
    if precision is not None:
        allowed = t.allowed_precisions(t.sm)
        needs = {BUNDLE_LABELS[p] for p in precision.split("+")}
        if allowed is not None and not needs <= allowed:
            where.fail(f"precision {precision!r} cannot run on target {name} ({t.description}): it lacks "
                       f"{', '.join(sorted(needs - allowed))}")
    return t.backend


# ---------------------------------------------------------------- aggregation


def aggregate(case_reports: Iterable[Mapping], suite: Suite | None = None, *,
              environment: Mapping | None = None) -> dict:
    """One qualification report from per-case reports (each a qualification report, usually of one case).

    With `suite`: cases come in the suite's order, a suite case without a report becomes an error case
    ("no report was produced"), and a report for a case the suite does not declare is an error (a stale
    leftover in the work directory, or the wrong suite)."""
    from edgellm_validate.report.qualification import ReportError, case_missing, merge_reports, new_report

    reports = list(case_reports)
    if suite is None:
        return merge_reports(reports, environment=environment)
    declared = {c.name for c in suite.cases}
    reported = set()
    for r in reports:
        for c in r.get("cases") or []:
            if isinstance(c, dict):
                if c.get("name") not in declared:
                    raise ReportError(f"has a report for case {c.get('name')!r}, which this suite does not declare "
                                      "(a leftover from an earlier suite?)", suite.path)
                reported.add(c["name"])
    missing = [case_missing(c.name, **c.report_identity()) for c in suite.cases if c.name not in reported]
    env = environment if environment is not None else (reports[0].get("environment") if reports else None)
    if missing:
        reports.append(new_report(missing, environment=env))
    return merge_reports(reports, environment=env, suite=suite.meta(), order=[c.name for c in suite.cases])
