"""Release-qualification reports: qualification.json (the source of truth), junit.xml and summary.md.

`qualification` builds and checks the JSON; `junit` and `summary` only render it; `write` puts the three
files in place atomically. Pure Python (no numpy, no torch), so it runs on any device image.
"""

from .junit import junit_xml
from .qualification import (
    REPORT_FILE,
    SCHEMA,
    SCHEMA_VERSION,
    ReportError,
    artifact_hashes,
    case_error,
    case_from_validation,
    case_missing,
    case_skipped,
    collect_environment,
    dumps_qualification,
    load_qualification,
    merge_reports,
    new_report,
    validate_qualification,
)
from .summary import Comparison, Finding, compare, render_summary
from .write import JUNIT_FILE, SUMMARY_FILE, atomic_write_text, write_reports

__all__ = [
    "JUNIT_FILE", "REPORT_FILE", "SCHEMA", "SCHEMA_VERSION", "SUMMARY_FILE", "Comparison", "Finding",
    "ReportError", "artifact_hashes", "atomic_write_text", "case_error", "case_from_validation", "case_missing",
    "case_skipped",
    "collect_environment", "compare", "dumps_qualification", "junit_xml", "load_qualification", "merge_reports",
    "new_report", "render_summary", "validate_qualification", "write_reports",
]
