"""summary.md, rendered from a qualification report alone, and the comparison with a previous report.

`compare(previous, current)` flags regressions: a case that passed before and now fails, errors or is
skipped; a metric worse than before by more than its tolerance (even while still within the thresholds,
so drift is seen before it turns into a failure); a case of the previous report that is missing now.
New cases, fixed cases, changed artifacts and a changed environment are noted without being regressions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .qualification import fmt_metric, validate_qualification

# metric -> (higher_is_better, absolute tolerance, relative tolerance): a regression is a change for the
# worse by more than abs + rel * |previous|.
DEFAULT_TOLERANCES: dict[str, tuple[bool, float, float]] = {
    "worst_cosine": (True, 1e-4, 0.0),
    "top1_agreement": (True, 1e-9, 0.0),  # any lost agreement
    "max_abs": (False, 1e-3, 0.5),
}
MAX_REASON = 160


@dataclass
class Finding:
    case: str
    kind: str  # verdict | metric | missing | new | fixed | artifact | environment
    message: str
    regression: bool


@dataclass
class Comparison:
    previous_created: str
    current_created: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regression]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)


def _tolerances(overrides: Mapping | None) -> dict[str, tuple[bool, float, float]]:
    tol = dict(DEFAULT_TOLERANCES)
    for metric, value in (overrides or {}).items():
        if metric not in tol:
            raise ValueError(f"no tolerance for unknown metric {metric!r}; known: {', '.join(tol)}")
        higher, _, _ = tol[metric]
        a, r = (value, 0.0) if isinstance(value, int | float) else value
        tol[metric] = (higher, float(a), float(r))
    return tol


def compare(previous: Mapping, current: Mapping, *, tolerances: Mapping | None = None) -> Comparison:
    """`tolerances`: metric -> absolute tolerance, or (absolute, relative)."""
    previous = validate_qualification(previous, "<previous qualification>")
    current = validate_qualification(current, "<current qualification>")
    tol = _tolerances(tolerances)
    cmp = Comparison(previous["created"], current["created"])
    add = cmp.findings.append
    before = {c["name"]: c for c in previous["cases"]}
    now = {c["name"]: c for c in current["cases"]}
    for name, old in before.items():
        new = now.get(name)
        if new is None:
            add(Finding(name, "missing", f"was {old['verdict']} in the previous qualification and is missing now",
                        True))
            continue
        if old["verdict"] == "pass" and new["verdict"] != "pass":
            add(Finding(name, "verdict", f"verdict pass -> {new['verdict']}: {_short(new['reason'])}", True))
        elif old["verdict"] in ("fail", "error") and new["verdict"] == "pass":
            add(Finding(name, "fixed", f"verdict {old['verdict']} -> pass", False))
        for metric, (higher, a, r) in tol.items():
            p, c = (old.get("metrics") or {}).get(metric), (new.get("metrics") or {}).get(metric)
            if not old.get("metrics") or not new.get("metrics") or metric not in old["metrics"]:
                continue
            if p is not None and c is None:
                add(Finding(name, "metric", f"{metric} {fmt_metric(p, metric)} -> n/a (non-finite)", True))
                continue
            if p is None or c is None:
                continue
            worse = (p - c) if higher else (c - p)
            limit = a + r * abs(p)
            if worse > limit:
                add(Finding(name, "metric", f"{metric} {fmt_metric(p, metric)} -> {fmt_metric(c, metric)} "
                            f"(worse by {worse:.3g}, tolerance {limit:.3g})", True))
        old_art = (old.get("artifacts") or {}).get("manifest_sha256")
        new_art = (new.get("artifacts") or {}).get("manifest_sha256")
        if old_art and new_art and old_art != new_art:
            add(Finding(name, "artifact", f"artifact changed (manifest sha256 {old_art[:12]} -> {new_art[:12]})",
                        False))
        old_hub, new_hub = old.get("checkpoint_hub") or {}, new.get("checkpoint_hub") or {}
        if old_hub.get("commit") and new_hub.get("commit") and old_hub["commit"] != new_hub["commit"]:
            add(Finding(name, "checkpoint", f"hub checkpoint {new_hub.get('repo_id')} commit "
                        f"{old_hub['commit'][:12]} -> {new_hub['commit'][:12]}", False))
    for name in now:
        if name not in before:
            add(Finding(name, "new", f"new case ({now[name]['verdict']})", False))
    for label, getter in (("tool", lambda e: (e.get("tool") or {}).get("version")),
                          ("TensorRT", lambda e: e.get("tensorrt")),
                          ("Python", lambda e: (e.get("python") or {}).get("version")),
                          ("host", lambda e: (e.get("host") or {}).get("hostname"))):
        p, c = getter(previous["environment"]), getter(current["environment"])
        if p != c:
            add(Finding("*", "environment", f"{label} {p or 'none'} -> {c or 'none'}", False))
    return cmp


# ---------------------------------------------------------------- markdown


def _cell(value) -> str:
    text = " ".join(str(value).split()) if value is not None else ""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")  # no cell break, no tags


def _short(text: str, n: int = MAX_REASON) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _metric_cell(case: Mapping, metric: str, threshold_key: str, op: str) -> str:
    value = (case.get("metrics") or {}).get(metric)
    if not case.get("metrics"):
        return ""
    text = fmt_metric(value, metric)
    thr = (case.get("thresholds") or {}).get(threshold_key)
    return f"{text} ({op} {thr:g})" if isinstance(thr, int | float) else text


def render_summary(q: Mapping, previous: Mapping | None = None, *, tolerances: Mapping | None = None,
                   comparison: Comparison | None = None) -> str:
    q = validate_qualification(q, "<qualification>")
    if previous is not None and comparison is None:
        comparison = compare(previous, q, tolerances=tolerances)
    s = q["summary"]
    suite = q.get("suite") or {}
    title = f"Qualification {suite['name']}" if suite.get("name") else "Qualification"
    lines = [f"# {title}: {q['verdict'].upper()}", ""]
    lines.append(f"**Verdict: {q['verdict'].upper()}**: {_cell(q['verdict_reason'])}. "
                 f"{s['pass']} passed, {s['fail']} failed, {s['error']} errors, {s['skipped']} skipped "
                 f"(of {s['total']}).")
    lines.append("")
    meta = [f"created {q['created']}", f"schema v{q['schema_version']}"]
    if suite.get("file"):
        meta.append(f"suite `{_cell(suite['file'])}`" + (f" (sha256 {suite['sha256'][:12]})" if suite.get("sha256")
                                                          else ""))
    lines += [", ".join(meta), ""]

    if comparison is not None:
        lines += _comparison_section(comparison)

    lines += ["## Cases", "",
              "| Case | Target | Backend | Precision | Expect | Verdict | Worst cosine | Top-1 | Max abs diff "
              "| Reason |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in q["cases"]:
        verdict = c["verdict"].upper() if c["verdict"] in ("fail", "error") else c["verdict"]
        if c["verdict"] in ("fail", "error"):
            verdict = f"**{verdict}**"
        lines.append("| " + " | ".join([
            _cell(c["name"]), _cell(c.get("target")), _cell(c.get("backend")), _cell(c.get("precision")),
            _cell(c["expect"]), verdict,
            _metric_cell(c, "worst_cosine", "min_cosine", ">="),
            _metric_cell(c, "top1_agreement", "min_top1_agreement", ">="),
            _metric_cell(c, "max_abs", "max_abs", "<="),
            _cell(_short(c["reason"])),
        ]) + " |")
    lines.append("")
    overridden = [c["name"] for c in q["cases"] if c.get("thresholds_source") == "override"]
    if overridden:
        lines += [f"Thresholds overridden by the suite for: {', '.join(_cell(n) for n in overridden)}.", ""]

    bad = [c for c in q["cases"] if c["verdict"] in ("fail", "error")]
    if bad:
        lines += ["## Failures and errors", ""]
        for c in bad:
            lines.append(f"### {_cell(c['name'])}: {c['verdict']}" + (f" (stage {c['stage']})" if c.get("stage")
                                                                        else ""))
            lines.append("")
            lines.append(_cell(c["reason"]))
            lines.append("")
            for f in c.get("failures", [])[:20]:
                lines.append(f"- {_cell(f)}")
            if len(c.get("failures", [])) > 20:
                lines.append(f"- ... and {len(c['failures']) - 20} more (see qualification.json)")
            lines.append("")

    lines += _components_section(q)
    lines += _limits_section(q)
    lines += _environment_section(q)
    lines += _checkpoint_section(q)
    lines += _artifact_section(q)
    return "\n".join(lines).rstrip() + "\n"


def _comparison_section(cmp: Comparison) -> list[str]:
    out = [f"## Against the previous qualification ({cmp.previous_created})", ""]
    regressions = cmp.regressions
    if regressions:
        affected = len({f.case for f in regressions})
        out.append(f"**REGRESSIONS in {affected} case(s)**")
        out.append("")
        out += [f"- REGRESSION **{_cell(f.case)}** ({f.kind}): {_cell(f.message)}" for f in regressions]
    else:
        out.append("No regressions.")
    notes = [f for f in cmp.findings if not f.regression]
    if notes:
        out.append("")
        out += [f"- note {_cell(f.case)} ({f.kind}): {_cell(f.message)}" for f in notes]
    out.append("")
    return out


def _components_section(q: Mapping) -> list[str]:
    """The encoders validated next to the language model (OUT/visual/ ...), one line each."""
    rows = [(c["name"], comp, r) for c in q["cases"] for comp, r in (c.get("components") or {}).items()]
    if not rows:
        return []
    out = ["## Components", "", "| case | component | result | tokens | worst cosine |", "|---|---|---|---|---|"]
    for case, comp, r in rows:
        outs = list((r.get("outputs") or {}).values())
        worst = min((o["worst_cosine"] for o in outs if "worst_cosine" in o), default=None)
        tokens = sum(o.get("tokens", 0) for o in outs)
        result = "pass" if r.get("passed") else ("fail" if r.get("validated", True) else "not validated")
        out.append(f"| {_cell(case)} | {comp} | {result} | {tokens or ''} | "
                   f"{'' if worst is None else f'{worst:.6f}'} |")
    out.append("")
    return out


def _limits_section(q: Mapping) -> list[str]:
    """Known runtime limits of the qualified exports: not failures, but what the runtime will do."""
    rows = [c for c in q["cases"] if c.get("runtime_limits")]
    if not rows:
        return []
    out = ["## Known runtime limits", ""]
    for c in rows:
        out += [f"- {_cell(c['name'])}: {_cell(note)}" for note in c["runtime_limits"]]
    out.append("")
    return out


def _environment_section(q: Mapping) -> list[str]:
    env = q["environment"]
    host, py, tool = env.get("host") or {}, env.get("python") or {}, env.get("tool") or {}
    out = ["## Environment", "",
           f"- tool: {_cell(tool.get('name'))} {_cell(tool.get('version'))}",
           f"- host: {_cell(host.get('hostname'))} ({_cell(host.get('platform'))})",
           f"- python: {_cell(' '.join(str(x) for x in (py.get('implementation'), py.get('version')) if x))}",
           f"- TensorRT: {_cell(env.get('tensorrt') or 'not installed')}"]
    if env.get("device"):
        out.append(f"- device: {_cell(env['device'])}")
    pkgs = ", ".join(f"{k} {v}" for k, v in sorted((env.get("packages") or {}).items()) if v)
    if pkgs:
        out.append(f"- packages: {_cell(pkgs)}")
    for k, v in sorted((env.get("extra") or {}).items()):
        out.append(f"- {_cell(k)}: {_cell(v)}")
    others = [c["name"] for c in q["cases"] if c.get("environment")]
    if others:
        out.append(f"- cases run in another environment (see qualification.json): {_cell(', '.join(others))}")
    out.append("")
    return out


def _checkpoint_section(q: Mapping) -> list[str]:
    """Cases whose checkpoint was a hub id: which repository, the revision asked for, the commit exported."""
    rows = [c for c in q["cases"] if isinstance(c.get("checkpoint_hub"), Mapping)]
    if not rows:
        return []
    out = ["## Hub checkpoints", "", "| Case | Repository | Revision | Commit |", "|---|---|---|---|"]
    for c in rows:
        h = c["checkpoint_hub"]
        out.append(f"| {_cell(c['name'])} | {_cell(h.get('repo_id'))} | {_cell(h.get('revision'))} "
                   f"| `{_cell(h.get('commit'))}` |")
    out.append("")
    return out


def _artifact_section(q: Mapping) -> list[str]:
    rows = [c for c in q["cases"] if c.get("artifacts")]
    if not rows:
        return []
    out = ["## Artifacts", "", "| Case | Manifest sha256 | Files | Exported by |", "|---|---|---|---|"]
    for c in rows:
        a = c["artifacts"]
        out.append(f"| {_cell(c['name'])} | `{_cell(a.get('manifest_sha256'))}` | {len(a.get('files') or {})} "
                   f"| {_cell(a.get('exported_by'))} |")
    out.append("")
    return out
