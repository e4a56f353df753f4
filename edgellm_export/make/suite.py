"""Qualification suites: SUITE.yaml declares the cases a release is qualified on; `aggregate` joins their
per-case reports into one qualification report (same schema, many cases).

    format: 1                       # optional; the only format so far
    name: release-0.2               # optional; default: the file's stem
    defaults:                       # optional; merged into every case (thresholds/options key by key)
      target: x86-cpu
      thresholds: {min_cosine: 0.999}
    cases:
      - name: llama-3.2-1b          # letters, digits, . _ - + @ (it names a directory)
        checkpoint: ${MODELS}/Llama-3.2-1B-Instruct   # relative to this file; ~ and $VARS expanded; or a hub
                                    # id (owner/name, where no such path exists): the HF cache, else the hub
        revision: main              # hub id only: branch, tag or full commit hash (default main)
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
are reported before anything runs, as one paragraph naming the file, the field path, the case and the
problem (`SUITE.yaml: cases[1].target (case 'llama'): unknown target ...`). The file's shape is the
SuiteFile model below (`edgellm schema suite` prints its JSON Schema, schemas/suite.schema.json); what needs
the platform matrix or the file system is checked after it, case by case. Only yaml.safe_load builds
objects; yaml.compose (nodes only, nothing constructed) finds duplicate keys, which safe_load would silently
collapse into the last one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationError

from edgellm_core.errors import ExportError
from edgellm_core.schema import StrictModel, case_label, explain, found, no_default, problem
from edgellm_validate.targets import BUNDLE_LABELS

from ..checkpoint.hub import HubId, parse_checkpoint

SUITE_FORMAT = 1
MAX_SUITE_BYTES = 1 << 20
EXPECT = ("pass", "fail", "error")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}$"
RELEASE_PATTERN = r"^\d+\.\d+(\.\d+)?$"


class SuiteError(ExportError):
    """A malformed suite file (exit code 2); the message names the file, the case and the problem."""


@dataclass(frozen=True)
class SuiteCase:
    name: str
    checkpoint: Path | HubId  # a local directory, or a hub id resolved when the suite runs (checkpoint/hub.py)
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
        if out.get("components") is not None:
            out["components"] = tuple(out["components"])
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


# ---------------------------------------------------------------- the file's model (`edgellm schema suite`)


def _text(key: str, value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise problem(f"must be {what}{found(value, key, yaml=True)}")
    return value.strip()


_PRECISION_PART = "|".join(re.escape(p) for p in BUNDLE_LABELS)
PRECISION_PATTERN = rf"^({_PRECISION_PART})(\+({_PRECISION_PART}))*$"


def _target_schema(schema: dict) -> None:
    """What the `target` validator checks, for the JSON Schema: a non-empty name or list of distinct names."""
    no_default(schema)
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "array":
            branch.update(minItems=1, uniqueItems=True)
            branch["items"]["minLength"] = 1
        elif branch.get("type") == "string":
            branch["minLength"] = 1


class Thresholds(StrictModel):
    """Overrides of the precision's default thresholds (edgellm_validate/compare.py), key by key."""

    key_noun: ClassVar[str] = "threshold"

    min_cosine: float = Field(None, ge=-1, le=1, allow_inf_nan=False, json_schema_extra=no_default,
                              description="worst per-step cosine similarity of the logits")
    min_top1_agreement: float = Field(None, ge=0, le=1, allow_inf_nan=False, json_schema_extra=no_default,
                                      description="mean top-1 agreement over the steps")
    max_abs: float = Field(None, ge=0, allow_inf_nan=False, json_schema_extra=no_default,
                           description="largest |logit difference|")


class ExportOptionsSpec(StrictModel):
    """Export options a case may set (ExportOptions fields; golden is always on: the case is validated)."""

    key_noun: ClassVar[str] = "export option"

    fp8_embedding: bool = False
    clamp_fp16: bool = False
    convert_pickle: bool = False
    unsafe_rope_passthrough: bool = Field(False, description="the reference exporter's RoPE handling: for "
                                                             "negative controls only")
    attention: Literal["plugin", "native"] = Field(
        "plugin", description="native: the plugin-free trt_native_ops form (edgellm export --attention native)")
    components: list[Literal["llm", "visual", "audio"]] | None = Field(
        None, json_schema_extra=no_default,
        description="components to export; default: every component the checkpoint has (an encoder that cannot be "
                    "exported yet is then an error); [llm] exports a multimodal checkpoint's language model alone")


def _target(value):
    targets = value if isinstance(value, list) else [value]
    if not targets:
        raise problem("is an empty list; name at least one platform-matrix target")
    names = [_text("target", t, "a platform-matrix target such as x86-cpu, or a list of them") for t in targets]
    if len(set(names)) != len(names):
        raise problem("lists a target twice")
    return names if isinstance(value, list) else names[0]


def _release(value):
    if value is None:
        return None
    release = _text("release", value, 'an Edge-LLM release such as "0.7"')
    if not re.match(RELEASE_PATTERN, release):
        raise problem(f"{release!r} is not a release number such as \"0.7\" or \"0.7.1\"")
    from ..contract import CONTRACTS

    if ".".join(release.split(".")[:2]) not in CONTRACTS:
        raise problem(f"Edge-LLM release {release!r} is not supported by this exporter; supported: "
                      f"{', '.join(sorted(CONTRACTS))}")
    return release


def _precision(value):
    if value is None:
        return None
    label = _text("precision", value, "a precision label such as fp16 or nvfp4+fp8_kv")
    unknown = [p for p in label.split("+") if p not in BUNDLE_LABELS]
    if unknown:
        raise problem(f"precision {label!r} has unknown part(s) {', '.join(unknown)}; known: "
                      f"{', '.join(BUNDLE_LABELS)} (joined with +)")
    return label


def _name(value):
    name = _text("name", value, "a string")
    if not re.match(NAME_PATTERN, name):
        raise problem(f"{name!r} may use only letters, digits, '.', '_', '-', '+' and '@' (it names a directory)")
    return name


def _optional_text(key: str, what: str):
    return BeforeValidator(lambda value: None if value is None else _text(key, value, what))


# What a case and `defaults` may both set (one declaration each, used by both models).
TargetField = Annotated[str | list[str], BeforeValidator(_target), Field(
    description="a platform-matrix target, or a list: one case per target (named NAME@TARGET)",
    json_schema_extra=_target_schema)]
ReleaseField = Annotated[str | None, BeforeValidator(_release), Field(
    description='Edge-LLM release to export for, quoted ("0.7")', json_schema_extra={"pattern": RELEASE_PATTERN})]
PrecisionField = Annotated[str | None, BeforeValidator(_precision), Field(
    description="the precision label the export must come out as (parts joined with +)",
    json_schema_extra={"pattern": PRECISION_PATTERN})]
ExpectField = Annotated[Literal[EXPECT], Field(
    description="pass | fail: a negative control validation must catch | error: a checkpoint the exporter must "
                "refuse")]


class CaseDefaults(StrictModel):
    """Merged into every case: thresholds and options key by key, the rest where the case does not set it."""

    target: TargetField = None
    release: ReleaseField = None
    precision: PrecisionField = None
    options: ExportOptionsSpec | None = None
    thresholds: Thresholds | None = None
    expect: ExpectField = "pass"


class CaseSpec(StrictModel):
    """One case: a checkpoint qualified on one or more targets."""

    name: Annotated[str, BeforeValidator(_name), Field(
        description="letters, digits, . _ - + @ (it names a directory)", json_schema_extra={"pattern": NAME_PATTERN})]
    checkpoint: Annotated[str, _optional_text("checkpoint", "a directory path or a hub id (owner/name)"), Field(
        min_length=1, description="checkpoint directory, relative to the suite file (~ and $VARS expanded), or a "
                                  "hub id (owner/name) where no such path exists")]
    revision: Annotated[str | None, _optional_text("revision", "a branch, tag or commit hash"), Field(
        min_length=1, description="hub id only: branch, tag or full commit hash (default main)")] = None
    target: TargetField = None
    release: ReleaseField = None
    precision: PrecisionField = None
    options: ExportOptionsSpec | None = None
    thresholds: Thresholds | None = None
    expect: ExpectField = "pass"
    skip: Annotated[str | None, _optional_text("skip", "the reason the case is skipped"), Field(
        min_length=1, description="the reason the case is skipped")] = None
    description: str | None = None


class SuiteFile(StrictModel):
    """SUITE.yaml: the cases a release is qualified on."""

    model_config = {"title": "edgellm qualification suite"}
    key_noun: ClassVar[str] = "top-level key"

    format: Literal[SUITE_FORMAT] = SUITE_FORMAT
    name: str | None = Field(None, min_length=1, description="default: the file's stem",
                             json_schema_extra=no_default)
    defaults: CaseDefaults | None = None
    cases: list[CaseSpec] = Field(min_length=1)


# ---------------------------------------------------------------- loading


def load_suite(path: str | Path, *, check_paths: bool = True, check_targets: bool = True,
               platforms_path: str | Path | None = None) -> Suite:
    """Parse and check SUITE.yaml. `check_paths`: every (non-skipped) checkpoint must be a directory now;
    `check_targets`: targets must be in the platform matrix (the shipped one, $EDGELLM_PLATFORMS or
    `platforms_path`), whose backend they take, and a declared precision must be one the target can run."""
    path = Path(path)
    data, digest = _read_yaml(path)
    if data is None:
        raise SuiteError("is empty; a suite is a mapping with a 'cases' list", path)
    if not isinstance(data, dict):
        raise SuiteError(f"must be a mapping with a 'cases' list at the top level, found a {type(data).__name__}",
                         path)
    fmt = data.get("format", SUITE_FORMAT)
    if fmt != SUITE_FORMAT or isinstance(fmt, bool):
        raise SuiteError(f"format: is {fmt!r}; this edgellm reads suite format {SUITE_FORMAT}", path)
    if not data.get("cases") and not isinstance(data.get("cases"), bool | int | float | str):
        raise SuiteError("needs a non-empty 'cases' list" + ("" if "cases" in data else " (there is no 'cases' key)"),
                         path)
    try:
        spec = SuiteFile.model_validate(data)
    except ValidationError as e:
        raise SuiteError(explain(e, SuiteFile, data, yaml=True, label=case_label), path) from None
    platforms = _platforms(platforms_path) if check_targets else None
    defaults = spec.defaults.model_dump(exclude_unset=True) if spec.defaults else {}
    cases: list[SuiteCase] = []
    seen: dict[str, int] = {}
    for i, case in enumerate(spec.cases):
        for c in _expand(path, i, case, defaults, platforms, check_paths):
            if c.name in seen:
                raise SuiteError(f"cases[{i}] (case {case.name!r}): case name {c.name!r} is also used by "
                                 f"cases[{seen[c.name]}]; names must be unique", path)
            seen[c.name] = i
            cases.append(c)
    return Suite(path, spec.name or path.stem, digest, cases)


def _platforms(platforms_path):
    from edgellm_validate.targets import edgellm_release, load_platforms

    return load_platforms(platforms_path), edgellm_release(platforms_path)


def _expand(path: Path, i: int, case: CaseSpec, defaults: Mapping, platforms, check_paths: bool) -> list[SuiteCase]:
    """The validated case, merged with the defaults, checked against the platform matrix and the file system:
    one SuiteCase per target."""
    raw = case.model_dump(exclude_unset=True)

    def fail(key: str | None, msg: str):
        where = f"cases[{i}]" if key is None else f"cases[{i}].{key}" if key in raw else f"defaults.{key}"
        raise SuiteError(f"{where} (case {case.name!r}): {msg}", path)

    merged = {**defaults, **raw}
    for key in ("thresholds", "options"):  # key by key, case over defaults
        merged[key] = {**(defaults.get(key) or {}), **(raw.get(key) or {})}
    if "target" not in merged:
        fail(None, "has no 'target' (a platform-matrix target such as x86-cpu), neither in the case nor in "
                   "'defaults'")
    targets = merged["target"] if isinstance(merged["target"], list) else [merged["target"]]
    release, precision = merged.get("release"), merged.get("precision")
    checkpoint = _checkpoint(case.checkpoint, case.revision, path.parent, check_paths and case.skip is None,
                             lambda msg: fail("checkpoint", msg))
    out = []
    for t in targets:
        backend = None
        if platforms is not None:
            backend = _check_target(t, release, precision, *platforms, fail=fail)
        out.append(SuiteCase(name=f"{case.name}@{t}" if len(targets) > 1 else case.name, checkpoint=checkpoint,
                             target=t, backend=backend, release=release, precision=precision,
                             expect=merged.get("expect", "pass"), thresholds=merged["thresholds"],
                             options=merged["options"], skip=case.skip, description=case.description or None))
    return out


def _checkpoint(text: str, revision: str | None, base: Path, check: bool, fail) -> Path | HubId:
    expanded = os.path.expanduser(os.path.expandvars(text))
    if "$" in expanded:
        fail(f"checkpoint {text!r} uses an environment variable that is not set")
    try:  # an existing path wins; else owner/name is a hub id, checked for presence when the suite runs
        p = parse_checkpoint(expanded, revision, base=base)
    except ExportError as e:
        fail(e.message)
    if isinstance(p, HubId):
        return p
    if check and not p.is_dir():
        fail(f"checkpoint {str(p)!r} is not a directory" + (" (it does not exist)" if not p.exists() else ""))
    return p


def _check_target(name: str, release: str | None, precision: str | None, targets: Mapping,
                  matrix_release: str | None, *, fail) -> str:
    if name not in targets:
        fail("target", f"unknown target {name!r}; the platform matrix has: {', '.join(targets)}")
    t = targets[name]
    if release and matrix_release and release.split(".")[:2] != matrix_release.split(".")[:2]:
        fail("release", f"exports for Edge-LLM {release}, but target {name}'s plugin is built from "
                        f"{matrix_release}; graphs and engines are not portable across releases")
    if precision is not None:
        allowed = t.allowed_precisions(t.sm)
        needs = {BUNDLE_LABELS[p] for p in precision.split("+")}
        if allowed is not None and not needs <= allowed:
            fail("precision", f"precision {precision!r} cannot run on target {name} ({t.description}): it lacks "
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
