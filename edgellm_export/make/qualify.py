"""`edgellm qualify SUITE.yaml`: every case of a suite through the make pipeline, one aggregated report.

    WORK/cases/<case>/        one make pipeline directory per case (layout in pipeline.py)
    WORK/images/<target>.json one image stage per target, shared by the cases (stamps in WORK/.stamps/)
    WORK/report/              qualification.json, junit.xml, summary.md over all the cases

A case's failure or error is recorded and the suite goes on; an interrupted run still writes the report,
with the cases it did not reach as errors ("no report was produced").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from edgellm_core.errors import ExportError

from .. import interrupts
from ..checkpoint.hub import CheckpointRef, resolve_checkpoint
from .pipeline import (
    REPORT_DIR,
    CaseRun,
    MakeSettings,
    Outcome,
    environment,
    finish,
    load_previous,
    make_case,
    resolve_target,
    settle,
)
from .suite import Suite, SuiteError, aggregate, load_suite
from .trust import resolve_ca_bundle

CASES_DIR = "cases"


def select_targets(suite: Suite, targets: Iterable[str]) -> Suite:
    """The suite's cases on these targets only (a device job runs its own part of the matrix)."""
    wanted = list(dict.fromkeys(targets))
    have = {c.target for c in suite.cases}
    missing = [t for t in wanted if t not in have]
    if missing:
        raise SuiteError(f"has no case for target(s) {', '.join(missing)}; its targets are "
                         f"{', '.join(sorted(have))}", suite.path)
    return dataclasses.replace(suite, cases=[c for c in suite.cases if c.target in wanted])


def qualify(suite_path: Path, work: Path, settings: MakeSettings, *, targets: Iterable[str] = (),
            previous: Path | None = None, fail_on_regression: bool = False) -> Outcome:
    suite = load_suite(suite_path, platforms_path=settings.platforms_path)
    if targets:
        suite = select_targets(suite, targets)
    work = Path(work).absolute()
    for name in sorted({c.target for c in suite.cases if c.skip is None}):  # bad targets, base images: first
        target = resolve_target(name, settings)
        if settings.container:
            target.image()
    if settings.container:
        resolve_ca_bundle(settings.ca_bundle)  # a CA variable naming a missing file: before any work too
    prev = load_previous(work / REPORT_DIR, previous)
    sources = _resolve_checkpoints(suite, settings)  # hub ids: before any work, each fetched once if absent
    runs: list[CaseRun] = []
    try:
        for i, case in enumerate(suite.cases, 1):
            if case.skip is not None:
                from edgellm_validate.report import case_skipped

                runs.append(CaseRun(case_skipped(case.name, case.skip, **case.report_identity()), 0))
                continue
            settings.progress(f"case {i}/{len(suite.cases)}: {case.name}")
            runs.append(make_case(case, work / CASES_DIR / case.name, settings, image_root=work,
                                  source=sources[case.name]))
    except (KeyboardInterrupt, interrupts.Terminated):
        _report(suite, work, settings, runs, prev, fail_on_regression)  # the cases not reached show as missing
        raise
    settle([s for r in runs for s in r.stamped])
    return _report(suite, work, settings, runs, prev, fail_on_regression)


def _resolve_checkpoints(suite: Suite, settings: MakeSettings) -> dict[str, CheckpointRef]:
    """Case name -> its checkpoint, resolved (a hub id through the cache, else the hub). A hub id that
    cannot be had stops the suite before anything runs or is written, like a missing local checkpoint."""
    resolved: dict[object, CheckpointRef] = {}
    out = {}
    for case in suite.cases:
        if case.skip is not None:
            continue
        if case.checkpoint not in resolved:
            try:
                resolved[case.checkpoint] = resolve_checkpoint(case.checkpoint, progress=settings.progress)
            except SuiteError:
                raise
            except ExportError as e:
                raise type(e)(f"case {case.name!r}: {e.paragraph()}", suite.path) from None
        out[case.name] = resolved[case.checkpoint]
    return out


def _report(suite: Suite, work: Path, settings: MakeSettings, runs: list[CaseRun], prev,
            fail_on_regression: bool) -> Outcome:
    from edgellm_validate.report import new_report

    targets = {c.target for c in suite.cases}
    env = environment(settings, settings.images, device=next(iter(targets)) if len(targets) == 1 else None)
    q = aggregate([new_report([r.case for r in runs], environment=env)], suite, environment=env)
    codes = [r.exit_code for r in runs if r.case["verdict"] == "error"]
    return finish(work / REPORT_DIR, q, codes, previous=prev, fail_on_regression=fail_on_regression, cases=runs)
