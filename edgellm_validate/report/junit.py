"""junit.xml for CI, rendered from a qualification report alone.

One <testsuite> (the report) with one <testcase> per case. A failed case carries <failure> whose message
names the failed metric, its value and its threshold; a case that could not be judged carries <error>; a
skipped case <skipped message=...>. The layout follows the common JUnit XML schema (testsuites > testsuite
> properties, testcase*, system-out; testcase > skipped | error | failure, system-out). ElementTree does
the escaping; characters XML 1.0 cannot hold at all (NUL, most C0 controls) are replaced first, since
escaping alone would still give a file CI parsers reject.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from .qualification import check_message, fmt_metric, validate_qualification

_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
MAX_MESSAGE = 1000  # attribute length; the full text goes into the element body


def xml_text(value) -> str:
    return _XML_ILLEGAL.sub("\ufffd", "" if value is None else str(value))


def _message(text: str) -> str:
    text = xml_text(" ".join(text.split()))
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _seconds(x) -> str:
    return f"{float(x or 0.0):.3f}"


def _classname(case: Mapping) -> str:
    target = (case.get("target") or "any").replace(".", "_")
    return f"qualification.edgellm-{target}.{case.get('backend') or 'any'}"


def _details(case: Mapping) -> str:
    lines = [f"verdict: {case['verdict']} (outcome {case['outcome']}, expected {case['expect']})"]
    if case.get("reason"):
        lines.append(f"reason: {case['reason']}")
    if case.get("stage"):
        lines.append(f"stage: {case['stage']}")
    lines += [f"check: {check_message(c)}" for c in case.get("checks", [])]
    lines += [f"failure: {f}" for f in case.get("failures", [])]
    return "\n".join(lines)


def _steps_text(case: Mapping) -> str:
    out = []
    m = case.get("metrics") or {}
    if m:
        out.append(f"worst_cosine={fmt_metric(m.get('worst_cosine'), 'worst_cosine')} "
                   f"top1_agreement={fmt_metric(m.get('top1_agreement'), 'top1_agreement')} "
                   f"max_abs={fmt_metric(m.get('max_abs'))}")
    for s in case.get("steps", []):
        out.append(f"{s.get('scenario')}[{s.get('step')}] {s.get('phase')}: "
                   f"cosine={fmt_metric(s.get('min_cosine'), 'worst_cosine')} "
                   f"top1={fmt_metric(s.get('top1_agree'), 'top1_agreement')} max_abs={fmt_metric(s.get('max_abs'))}")
    art = case.get("artifacts") or {}
    if art.get("manifest_sha256"):
        out.append(f"artifact manifest sha256={art['manifest_sha256']}")
    return "\n".join(out)


def _timestamp(created: str) -> str:
    """The schema's timestamp is an ISO 8601 date-time without a zone (the report's is UTC)."""
    return created[:19] if re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", created) else ""


def junit_xml(q: Mapping) -> str:
    q = validate_qualification(q, "<qualification>")
    cases = q["cases"]
    counts = q["summary"]
    name = (q.get("suite") or {}).get("name") or "edgellm qualification"
    env = q["environment"]
    total_time = sum(float(c.get("seconds") or 0.0) for c in cases)
    common = {"tests": str(len(cases)), "failures": str(counts["fail"]), "errors": str(counts["error"]),
              "skipped": str(counts["skipped"]), "time": _seconds(total_time)}
    root = ET.Element("testsuites", {"name": xml_text(name), **common})
    suite_attrs = {"name": xml_text(name), **common, "hostname": xml_text((env.get("host") or {}).get("hostname"))}
    if ts := _timestamp(q["created"]):
        suite_attrs["timestamp"] = ts
    suite = ET.SubElement(root, "testsuite", suite_attrs)
    props = ET.SubElement(suite, "properties")
    tool = env.get("tool") or {}
    for key, value in (("schema_version", q["schema_version"]), ("verdict", q["verdict"]),
                       ("verdict_reason", q["verdict_reason"]),
                       ("tool", f"{tool.get('name', '')} {tool.get('version', '')}".strip()),
                       ("python", (env.get("python") or {}).get("version")), ("tensorrt", env.get("tensorrt")),
                       ("device", env.get("device")), ("suite_sha256", (q.get("suite") or {}).get("sha256"))):
        if value is not None:
            ET.SubElement(props, "property", {"name": key, "value": xml_text(value)})
    for c in cases:
        tc = ET.SubElement(suite, "testcase", {"name": xml_text(c["name"]), "classname": xml_text(_classname(c)),
                                               "time": _seconds(c.get("seconds"))})
        verdict = c["verdict"]
        if verdict == "skipped":
            ET.SubElement(tc, "skipped", {"message": _message(c["reason"] or "skipped")})
        elif verdict == "error":
            el = ET.SubElement(tc, "error", {"message": _message(c["reason"] or "error"),
                                             "type": xml_text(f"{c.get('stage') or 'qualification'}-error")})
            el.text = xml_text(_details(c))
        elif verdict == "fail":
            kind = "expectation" if c["outcome"] != "fail" or c["expect"] != "pass" else "threshold"
            el = ET.SubElement(tc, "failure", {"message": _message(c["reason"] or "failed"), "type": kind})
            el.text = xml_text(_details(c))
        if text := _steps_text(c):
            ET.SubElement(tc, "system-out").text = xml_text(text)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
