"""Write qualification.json, junit.xml and summary.md into a report directory, each atomically."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgellm_core.errors import EnvironmentProblem

from .junit import junit_xml
from .qualification import REPORT_FILE, dumps_qualification, validate_qualification
from .summary import Comparison, compare, render_summary

JUNIT_FILE = "junit.xml"
SUMMARY_FILE = "summary.md"


@dataclass
class WrittenReports:
    qualification: Path
    junit: Path
    summary: Path
    comparison: Comparison | None  # None without a previous report

    @property
    def regressed(self) -> bool:
        return bool(self.comparison and self.comparison.regressed)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a hidden temporary sibling, fsync, rename over `path`: readers see the old file or the new
    one, never a torn one. Mode 0666 minus the umask, like a plain open()."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    data = text.encode("utf-8")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_reports(report_dir: str | Path, qualification: Mapping, *, previous: Mapping | None = None,
                  tolerances: Mapping | None = None) -> WrittenReports:
    """Render all three first (a malformed report raises ReportError and writes nothing), then put each in
    place atomically, qualification.json last so that it is never older than the files rendered from it.
    With `previous` (a loaded earlier qualification.json) the summary lists regressions; the caller decides
    whether they fail the run (`WrittenReports.regressed`)."""
    q = validate_qualification(dict(qualification), "<qualification>")
    comparison = compare(previous, q, tolerances=tolerances) if previous is not None else None
    texts = {
        JUNIT_FILE: junit_xml(q),
        SUMMARY_FILE: render_summary(q, comparison=comparison),
        REPORT_FILE: dumps_qualification(q),
    }
    out = Path(report_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            atomic_write_text(out / name, text)
    except OSError as e:
        raise EnvironmentProblem(f"cannot write the qualification reports ({e.strerror or e})",
                                 e.filename or out) from None
    return WrittenReports(out / REPORT_FILE, out / JUNIT_FILE, out / SUMMARY_FILE, comparison)
