"""Qualification reports: qualification.json (schema, loader), junit.xml, summary.md and regressions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from edgellm_core.digests import sha256_file
from edgellm_core.manifest import write_manifest
from edgellm_validate.compare import step_metrics, verdict
from edgellm_validate.report import (
    REPORT_FILE,
    SCHEMA_VERSION,
    ReportError,
    case_error,
    case_from_validation,
    case_missing,
    case_skipped,
    compare,
    dumps_qualification,
    junit_xml,
    load_qualification,
    new_report,
    render_summary,
    validate_qualification,
    write_reports,
)

ENV = {"host": {"hostname": "ci-1", "platform": "Linux-x86_64"}, "python": {"version": "3.11.7"},
       "tool": {"name": "edgellm-export", "version": "0.1.0"}, "device": None, "tensorrt": None,
       "packages": {"numpy": "2.0", "torch": None}, "extra": {}}


def make_export(tmp_path: Path, name: str = "out") -> Path:
    out = tmp_path / name
    (out / "llm" / "golden").mkdir(parents=True)
    (out / "llm" / "model.onnx").write_bytes(b"graph")
    (out / "llm" / "golden" / "bundle.json").write_text("{}")
    write_manifest(out)
    return out


def validation(cosines=(1.0, 0.99995, 0.99999), top1=(1.0, 1.0, 1.0), precision="fp16", noise=1e-3):
    """A real compare.verdict result whose steps have (about) the given cosines and top-1 agreement."""
    rng = np.random.default_rng(0)
    metrics = []
    for k, (cos, t1) in enumerate(zip(cosines, top1)):
        want = rng.normal(size=(2, 64)).astype(np.float32)
        want[:, 0] += 20.0  # a clear argmax
        got = want + rng.normal(size=want.shape).astype(np.float32) * noise
        m = step_metrics("prefill_chunked", k, "decode" if k else "prefill", got, want)
        m.min_cosine, m.top1_agree = cos, t1  # the figures under test; max_abs stays real
        metrics.append(m)
    res = verdict(metrics, precision)
    res.update({"backend": "onnxruntime-cpu", "seconds": 1.5})
    return res


def one_case_report(tmp_path, name="llama", **kw) -> dict:
    out = make_export(tmp_path, f"out-{name}")
    case = case_from_validation(name, kw.pop("validation", None) or validation(), target="x86-cpu", release="0.7",
                                export_dir=out, **kw)
    return new_report([case], environment=ENV, created="2026-01-02T03:04:05Z")


# ---------------------------------------------------------------- cases and verdicts


def test_passing_case_has_metrics_thresholds_and_artifact_hashes(tmp_path):
    out = make_export(tmp_path)
    case = case_from_validation("llama", validation(), target="x86-cpu", release="0.7", export_dir=out,
                                checkpoint="/models/llama", precision="fp16")
    assert case["verdict"] == case["outcome"] == "pass" and case["reason"] == ""
    assert case["metrics"]["worst_cosine"] == pytest.approx(0.99995)
    assert case["metrics"]["top1_agreement"] == 1.0 and case["metrics"]["steps"] == 3
    assert case["thresholds"] == {"min_cosine": 0.999, "min_top1_agreement": 1.0}
    assert {c["metric"] for c in case["checks"]} == {"precision", "worst_cosine", "top1_agreement"}
    art = case["artifacts"]
    assert art["manifest_sha256"] == sha256_file(out / "manifest.json")
    assert art["files"]["llm/model.onnx"]["sha256"] == sha256_file(out / "llm" / "model.onnx")
    assert (case["target"], case["backend"], case["edgellm_release"]) == ("x86-cpu", "onnxruntime-cpu", "0.7")
    res = validation() | {"backend": "tensorrt", "backend_details": {"tensorrt_version": "10.3.0", "device":
                                                                      {"name": "Orin", "sm": 87}}}
    trt = case_from_validation("llama", res, target="orin-jp6", export_dir=out)
    assert trt["backend"] == "tensorrt" and trt["backend_details"]["tensorrt_version"] == "10.3.0"


def test_failing_cosine_names_metric_value_and_threshold(tmp_path):
    out = make_export(tmp_path)
    case = case_from_validation("llama", validation(cosines=(1.0, 0.9981, 1.0)), target="x86-cpu", export_dir=out)
    assert case["verdict"] == "fail"
    assert "worst_cosine 0.998100" in case["reason"] and ">= 0.999" in case["reason"]
    assert any("prefill_chunked[1] decode: cosine 0.998100 < 0.999" in f for f in case["failures"])


def test_step_failures_are_worded_as_compare_verdict_does(tmp_path):
    out = make_export(tmp_path)
    res = validation(cosines=(0.9, 0.9995, 0.95), top1=(1.0, 0.5, 1.0))
    case = case_from_validation("x", res, target="x86-cpu", export_dir=out)
    assert res["passed"] is False and case["outcome"] == "fail"
    cosine_lines = [f for f in res["failures"] if "cosine" in f]
    assert [f for f in case["failures"] if ": cosine " in f] == cosine_lines
    assert case["metrics"]["top1_agreement"] == pytest.approx(res["top1_agreement"])
    assert case["metrics"]["worst_cosine"] == pytest.approx(res["worst_cosine"])


def test_threshold_override_loosens_and_tightens(tmp_path):
    out = make_export(tmp_path)
    res = validation(cosines=(0.9985, 1.0, 1.0))
    loose = case_from_validation("x", res, target="x86-cpu", export_dir=out, thresholds={"min_cosine": 0.998})
    assert res["passed"] is False and loose["verdict"] == "pass"
    assert loose["thresholds_source"] == "override" and loose["thresholds"]["min_cosine"] == 0.998
    tight = case_from_validation("x", validation(), target="x86-cpu", export_dir=out, thresholds={"max_abs": 1e-9})
    assert tight["verdict"] == "fail" and "max_abs" in tight["reason"] and "<= 1e-09" in tight["reason"]
    with pytest.raises(ValueError, match="unknown threshold"):
        case_from_validation("x", res, target="x86-cpu", export_dir=out, thresholds={"min_cosin": 0.9})


def test_precision_mismatch_fails(tmp_path):
    out = make_export(tmp_path)
    case = case_from_validation("x", validation(), target="x86-cpu", export_dir=out, precision="nvfp4")
    assert case["verdict"] == "fail"
    assert "precision fp16 (required == nvfp4) FAILED" in case["reason"]


def test_runtime_refusal_and_nonfinite_metrics(tmp_path):
    out = make_export(tmp_path)
    refused = {"passed": False, "failures": ["the runtime would refuse this export: yarn"], "steps": [],
               "backend": "onnxruntime-cpu", "export": str(out / "llm")}
    case = case_from_validation("x", refused, target="x86-cpu")
    assert case["verdict"] == "fail" and "refuse" in case["reason"] and case["artifacts"]["manifest_sha256"]
    res = validation()
    res["steps"][1]["max_abs"] = float("inf")
    res["steps"][1]["min_cosine"] = -1.0
    res["passed"] = False
    case = case_from_validation("y", res, target="x86-cpu", export_dir=out)
    assert case["metrics"]["max_abs"] is None and case["verdict"] == "fail"
    text = dumps_qualification(new_report([case], environment=ENV))
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_expectations_turn_outcomes_into_verdicts(tmp_path):
    out = make_export(tmp_path)
    bad = validation(cosines=(0.5, 0.5, 0.5))
    neg = case_from_validation("neg", bad, target="x86-cpu", export_dir=out, expect="fail")
    assert (neg["outcome"], neg["verdict"]) == ("fail", "pass") and neg["reason"].startswith("failed as expected")
    slipped = case_from_validation("neg2", validation(), target="x86-cpu", export_dir=out, expect="fail")
    assert (slipped["outcome"], slipped["verdict"]) == ("pass", "fail") and "expected fail" in slipped["reason"]
    refused = case_error("yarn", "rope_scaling yarn has no exact equivalent", stage="export", expect="error")
    assert refused["verdict"] == "pass" and "refused as expected" in refused["reason"]
    not_refused = case_from_validation("yarn2", validation(), target="x86-cpu", export_dir=out, expect="error")
    assert not_refused["verdict"] == "fail"
    assert case_missing("gone", expect="error")["verdict"] == "error"
    assert case_skipped("thor", "no board", expect="fail")["verdict"] == "skipped"


def test_missing_manifest_is_an_error_case(tmp_path):
    out = make_export(tmp_path)
    (out / "manifest.json").unlink()
    case = case_from_validation("x", validation(), target="x86-cpu", export_dir=out)
    assert case["verdict"] == "error" and case["stage"] == "report" and "manifest.json" in case["reason"]


@pytest.mark.parametrize("verdicts, expected", [
    ([], "fail"),
    (["skipped", "skipped"], "fail"),
    (["pass", "skipped"], "pass"),
    (["pass", "error"], "error"),
    (["error", "fail", "pass"], "fail"),
])
def test_overall_verdict(verdicts, expected):
    cases = []
    for i, v in enumerate(verdicts):
        if v == "pass":
            cases.append(case_error(f"c{i}", "refused", expect="error"))
        elif v == "error":
            cases.append(case_error(f"c{i}", "boom"))
        elif v == "fail":
            cases.append(case_error(f"c{i}", "not refused", expect="fail") | {"verdict": "fail"})
        else:
            cases.append(case_skipped(f"c{i}", "later"))
    q = new_report(cases, environment=ENV)
    assert q["verdict"] == expected
    assert q["summary"]["total"] == len(verdicts)


def test_duplicate_case_names_are_refused():
    with pytest.raises(ReportError, match="two cases are named 'a'"):
        new_report([case_skipped("a", "x"), case_skipped("a", "y")], environment=ENV)


# ---------------------------------------------------------------- loader


def test_round_trip_and_loader_errors(tmp_path):
    q = one_case_report(tmp_path)
    written = write_reports(tmp_path / "reports", q)
    assert load_qualification(written.qualification) == q
    bad = tmp_path / "bad.json"
    cases = [
        ({"foo": 1}, "'schema' is None"),
        ([1, 2], "expected a JSON object"),
        ({**q, "schema_version": SCHEMA_VERSION + 1}, "newer than this"),
        ({**q, "schema_version": "1"}, "positive integer"),
        ({**q, "verdict": "fail"}, "disagree with its cases"),
        ({**q, "cases": [{**q["cases"][0], "verdict": "maybe"}]},
         "cases[0].verdict (case 'llama'): must be one of pass, fail"),
        ({**q, "cases": "none"}, "cases: must be a list"),
    ]
    for doc, msg in cases:
        bad.write_text(json.dumps(doc))
        with pytest.raises(ReportError) as e:
            load_qualification(bad)
        assert msg in str(e.value) and str(bad) in str(e.value), (msg, str(e.value))
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_qualification(bad)
    with pytest.raises(ReportError, match="no such qualification report"):
        load_qualification(tmp_path / "absent.json")


# ---------------------------------------------------------------- junit.xml


def mixed_report(tmp_path) -> dict:
    out = make_export(tmp_path)
    cases = [
        case_from_validation("good", validation(), target="x86-cpu", export_dir=out),
        case_from_validation("bad <&> \"q\"", validation(cosines=(0.9981, 1, 1)), target="orin-jp6",
                             export_dir=out),
        case_error("broken", "config.json: \x01 bad & <worse>", stage="export", target="x86-cpu"),
        case_skipped("thor", "no board this week", target="thor-jp7"),
    ]
    return new_report(cases, environment=ENV, suite={"name": "rel-1", "file": "SUITE.yaml", "sha256": "ab" * 32},
                      created="2026-01-02T03:04:05Z")


def test_junit_counts_messages_and_escaping(tmp_path):
    q = mixed_report(tmp_path)
    text = junit_xml(q)
    root = ET.fromstring(text.encode())
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    for el in (root, suite):
        assert (el.get("tests"), el.get("failures"), el.get("errors"), el.get("skipped")) == ("4", "1", "1", "1")
    assert suite.get("name") == "rel-1" and suite.get("timestamp") == "2026-01-02T03:04:05"
    cases = {tc.get("name"): tc for tc in suite.findall("testcase")}
    assert set(cases) == {"good", "bad <&> \"q\"", "broken", "thor"}
    assert list(cases["good"]) == [cases["good"].find("system-out")]
    failure = cases["bad <&> \"q\""].find("failure")
    assert "worst_cosine 0.998100" in failure.get("message") and "0.999" in failure.get("message")
    assert failure.get("type") == "threshold" and "prefill_chunked[0]" in failure.text
    error = cases["broken"].find("error")
    assert error.get("type") == "export-error" and "bad & <worse>" in error.get("message")
    assert "\x01" not in text
    assert cases["thor"].find("skipped").get("message") == "no board this week"
    assert cases["bad <&> \"q\""].get("classname") == "qualification.edgellm-orin-jp6.onnxruntime-cpu"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["verdict"] == "fail" and props["tool"] == "edgellm-export 0.1.0"


def test_junit_follows_the_common_schema_layout(tmp_path):
    """Element order and attributes of the common JUnit XSD (Jenkins/Ant): testsuites > testsuite >
    properties?, testcase*, system-out?, system-err?; testcase > (skipped | error | failure)?, system-out?."""
    root = ET.fromstring(junit_xml(mixed_report(tmp_path)))
    for suite in root:
        assert suite.tag == "testsuite" and {"name", "tests"} <= set(suite.attrib)
        tags = [c.tag for c in suite]
        assert tags[0] == "properties" and set(tags[1:]) == {"testcase"}
        for p in suite.find("properties"):
            assert p.tag == "property" and set(p.attrib) == {"name", "value"}
        for tc in suite.findall("testcase"):
            assert {"name", "classname", "time"} <= set(tc.attrib)
            float(tc.get("time"))
            kids = [c.tag for c in tc]
            results = [k for k in kids if k in ("skipped", "error", "failure")]
            assert len(results) <= 1 and set(kids) <= {"skipped", "error", "failure", "system-out", "system-err"}
            if results:
                assert kids.index(results[0]) == 0
            for el in tc:
                if el.tag in ("error", "failure"):
                    assert "message" in el.attrib and "type" in el.attrib


# ---------------------------------------------------------------- summary.md and regressions


def test_summary_lists_cases_metrics_and_failures(tmp_path):
    q = mixed_report(tmp_path)
    md = render_summary(q)
    assert md.startswith("# Qualification rel-1: FAIL")
    section = md.split("## Cases", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Case")]
    assert len(rows) == 4
    good = next(r for r in rows if r.startswith("| good |"))
    assert "0.999950 (>= 0.999)" in good and "1.000 (>= 1)" in good and "| pass |" in good
    assert '| bad &lt;&> "q" |' in md  # a table cell cannot break out of its row or open a tag
    assert "| **FAIL** |" in next(r for r in rows if r.startswith("| bad"))
    assert "## Failures and errors" in md and "### broken: error (stage export)" in md
    assert "- TensorRT: not installed" in md
    assert "Regressions" not in md and "REGRESSION" not in md


def test_compare_flags_regressions_and_summary_shows_them(tmp_path):
    out = make_export(tmp_path)

    def report(cases):
        return new_report(cases, environment=ENV)

    before = report([
        case_from_validation("a", validation(cosines=(1.0, 0.99999, 1.0)), target="x86-cpu", export_dir=out),
        case_from_validation("b", validation(), target="x86-cpu", export_dir=out),
        case_from_validation("c", validation(), target="x86-cpu", export_dir=out),
        case_from_validation("d", validation(cosines=(0.5, 1, 1)), target="x86-cpu", export_dir=out),
    ])
    after = report([
        # a: still passes but cosine drifted by 5e-4 (tolerance 1e-4)
        case_from_validation("a", validation(cosines=(1.0, 0.9995, 1.0)), target="x86-cpu", export_dir=out),
        # b: passed before, fails now
        case_from_validation("b", validation(cosines=(0.99, 1, 1)), target="x86-cpu", export_dir=out),
        # c: missing; d: fixed; e: new
        case_from_validation("d", validation(), target="x86-cpu", export_dir=out),
        case_skipped("e", "later"),
    ])
    cmp = compare(before, after)
    kinds = {(f.case, f.kind): f for f in cmp.findings}
    assert kinds[("a", "metric")].regression and "worst_cosine 0.999990 -> 0.999500" in kinds[("a", "metric")].message
    assert kinds[("b", "verdict")].regression and "pass -> fail" in kinds[("b", "verdict")].message
    assert kinds[("c", "missing")].regression
    assert not kinds[("d", "fixed")].regression and not kinds[("e", "new")].regression
    assert {f.case for f in cmp.regressions} == {"a", "b", "c"} and cmp.regressed
    assert not compare(after, after).regressed
    # a looser tolerance forgives the drift
    assert ("a", "metric") not in {(f.case, f.kind) for f in compare(before, after, tolerances={"worst_cosine": 1e-3})
                                   .findings}
    md = render_summary(after, before)
    assert "**REGRESSIONS in 3 case(s)**" in md
    assert "- REGRESSION **b** (verdict)" in md and "- REGRESSION **c** (missing)" in md
    assert "- REGRESSION **a** (metric)" in md
    assert "No regressions." in render_summary(after, after)
    with pytest.raises(ReportError, match="foreign JSON"):
        compare({"schema": "other"}, after)


# ---------------------------------------------------------------- writing


def test_write_reports_is_atomic_and_all_or_nothing(tmp_path):
    q = mixed_report(tmp_path)
    rdir = tmp_path / "reports"
    written = write_reports(rdir, q, previous=q)
    assert sorted(os.listdir(rdir)) == ["junit.xml", REPORT_FILE, "summary.md"]  # no temp files left
    assert not written.regressed
    assert json.loads((rdir / REPORT_FILE).read_text()) == q
    ET.parse(rdir / "junit.xml")
    assert (rdir / "summary.md").read_text() == render_summary(q, q)
    mode = (rdir / REPORT_FILE).stat().st_mode & 0o777
    assert mode & 0o044 == 0o044 & ~_umask()  # readable by others unless the umask says otherwise
    before = {p: p.read_bytes() for p in rdir.iterdir()}
    broken = {**q, "verdict": "pass"}
    with pytest.raises(ReportError):
        write_reports(rdir, broken)
    assert {p: p.read_bytes() for p in rdir.iterdir()} == before
    validate_qualification(json.loads((rdir / REPORT_FILE).read_text()))


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_report_package_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgellm_validate.report, edgellm_validate.report.summary, edgellm_validate.report.junit\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_summary_names_fp16_when_the_suite_expects_no_precision(tmp_path):
    """A plain fp16 export says `fp16` in the Precision column, not an empty cell."""
    from edgellm_validate.report.summary import render_summary

    q = one_case_report(tmp_path)  # no expected precision given
    assert q["cases"][0]["precision"] == "fp16"
    row = next(line for line in render_summary(q).splitlines() if line.startswith("| llama "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "fp16"
    nvfp4 = one_case_report(tmp_path, name="q", validation=validation(precision="nvfp4"))
    assert nvfp4["cases"][0]["precision"] == "nvfp4"


def test_runtime_limits_are_notes_for_hybrids_only():
    from edgellm_core.runtime_limits import runtime_limits

    assert runtime_limits({"model_type": "llm", "model": "llama"}) == []
    assert len(runtime_limits({"model_type": "hybrid_mamba", "model": "qwen3_5_text"})) == 1
    assert len(runtime_limits({"model_type": "hybrid_mamba", "model": "nemotron_h"})) == 2
