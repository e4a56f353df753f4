"""`edgellm qualify SUITE.yaml`: a suite's cases through the make pipeline, one aggregated report.

The broken export: a checkpoint with Llama-3 RoPE scaling exported with the reference exporter's
behaviour (`unsafe_rope_passthrough`: the scaling dict written verbatim). The export succeeds; the
runtime treats that scaling as plain RoPE, so the runtime twin's logits drift from the golden logits
(computed with the checkpoint's real RoPE) and validation fails on worst cosine. The same checkpoint
exported normally (llama3 rewritten into the runtime's longrope form) passes.
"""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import LLAMA3_ROPE
from fake_containers import install
from test_make import snapshot

from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint

pytest.importorskip("yaml")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    return install(monkeypatch, tmp_path)


def write_suite(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def load(work: Path) -> dict:
    return json.loads((work / "report" / "qualification.json").read_text())


def suite_text(demo: Path, llama3: Path, passthrough_expect: str) -> str:
    return f"""\
        name: two-checkpoints
        defaults:
          target: x86-cpu
          release: "0.7"
        cases:
          - name: demo
            checkpoint: {demo}
            precision: fp16
          - name: llama3-rope
            checkpoint: {llama3}
            description: llama3 RoPE scaling, rewritten into the runtime's longrope form
          - name: llama3-rope-passthrough
            checkpoint: {llama3}
            options: {{unsafe_rope_passthrough: true}}
            expect: {passthrough_expect}
            description: the scaling dict written verbatim, as the reference exporter does
          - name: thor
            checkpoint: {demo}
            target: thor-jp7
            skip: no Thor board on this runner
        """


def test_suite_with_a_broken_export(tmp_path, hf_checkpoints, fake, capsys):
    demo = write_demo_checkpoint(tmp_path / "demo")
    llama3, _ = hf_checkpoints("llama3rope", "llama", rope_parameters=LLAMA3_ROPE)
    suite = write_suite(tmp_path / "SUITE.yaml", suite_text(demo, llama3, "pass"))
    work = tmp_path / "WORK"
    assert main(["qualify", str(suite), "--out", str(work)]) == 1
    stdout = capsys.readouterr().out
    assert "llama3-rope-passthrough: FAIL (worst_cosine 0.9" in stdout and "Qualification FAIL" in stdout

    q = load(work)
    assert q["suite"]["name"] == "two-checkpoints" and q["verdict"] == "fail"
    assert [(c["name"], c["verdict"]) for c in q["cases"]] == [
        ("demo", "pass"), ("llama3-rope", "pass"), ("llama3-rope-passthrough", "fail"), ("thor", "skipped")]
    cases = {c["name"]: c for c in q["cases"]}
    for name in ("demo", "llama3-rope"):
        assert cases[name]["metrics"]["worst_cosine"] >= 0.999 and cases[name]["metrics"]["top1_agreement"] == 1.0
    broken = cases["llama3-rope-passthrough"]
    failed = [c for c in broken["checks"] if not c["passed"]]
    assert [c["metric"] for c in failed] == ["worst_cosine", "top1_agreement"]
    assert failed[0]["value"] < 0.99 and failed[0]["threshold"] == 0.999
    assert broken["reason"].startswith("worst_cosine 0.9") and "(required >= 0.999) FAILED" in broken["reason"]
    assert broken["stage"] == "validate" and broken["metrics"]["top1_agreement"] < 0.9
    assert any("prefill: cosine" in f for f in broken["failures"])
    assert cases["thor"]["reason"] == "no Thor board on this runner"

    junit = ET.parse(work / "report" / "junit.xml").getroot()
    counts = tuple(junit.get(k) for k in ("tests", "failures", "errors", "skipped"))
    assert counts == ("4", "1", "0", "1")
    summary = (work / "report" / "summary.md").read_text()
    assert "### llama3-rope-passthrough: fail (stage validate)" in summary
    # One image for the three cases on x86-cpu; each case's export in its own pipeline directory.
    assert fake.count("build_image") == 1 and fake.count("run_validate") == 3
    assert sorted(p.name for p in (work / "cases").iterdir()) == ["demo", "llama3-rope", "llama3-rope-passthrough"]
    assert (work / "images" / "x86-cpu.json").is_file()

    # The same checkpoint as a negative control: failing is what it must do. Only its validation runs again
    # (a failed validation is never stamped); nothing is exported again.
    exports = snapshot(work / "cases")
    write_suite(suite, suite_text(demo, llama3, "fail"))
    assert main(["-q", "qualify", str(suite), "--out", str(work)]) == 0
    q = load(work)
    assert q["verdict"] == "pass" and q["summary"] == {"pass": 3, "fail": 0, "error": 0, "skipped": 1, "total": 4}
    control = next(c for c in q["cases"] if c["name"] == "llama3-rope-passthrough")
    assert control["outcome"] == "fail" and control["reason"].startswith("failed as expected: worst_cosine 0.9")
    assert fake.count("run_validate") == 4 and fake.count("build_image") == 1
    after = snapshot(work / "cases")
    changed = sorted(k for k in set(after) | set(exports) if after.get(k) != exports.get(k))
    assert changed and all(k.startswith(("llama3-rope-passthrough/validation", "llama3-rope-passthrough/.stamps"))
                           for k in changed), changed
    assert "note llama3-rope-passthrough (fixed): verdict fail -> pass" in (work / "report" / "summary.md").read_text()

    # Nothing changed now: a third run writes nothing outside WORK/report/.
    before = snapshot(work)
    assert main(["-q", "qualify", str(suite), "--out", str(work)]) == 0
    assert snapshot(work) == before and fake.count("run_validate") == 4


def test_target_selection_refusals_expected_and_host_mode(tmp_path):
    write_demo_checkpoint(tmp_path / "demo")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": -3}')
    suite = write_suite(tmp_path / "SUITE.yaml", """\
        defaults: {target: x86-cpu}
        cases:
          - name: demo
            checkpoint: demo
          - name: refused
            checkpoint: bad
            expect: error
          - name: demo-orin
            checkpoint: demo
            target: orin-jp6
        """)
    work = tmp_path / "WORK"
    assert main(["-q", "qualify", str(suite), "--out", str(work), "--target", "x86-cpu", "--no-container"]) == 0
    q = load(work)
    assert q["suite"]["name"] == "SUITE" and q["suite"]["cases"] == ["demo", "refused"]
    refused = q["cases"][1]
    assert refused["verdict"] == "pass" and refused["outcome"] == "error" and refused["stage"] == "export"
    assert refused["reason"].startswith("refused as expected: ")
    assert "no *.safetensors weight files" in refused["reason"]
    assert not (work / "images").exists()
    assert main(["-q", "qualify", str(suite), "--out", str(work), "--target", "thor-jp7"]) == 2  # no such case


def test_interrupted_suite_still_reports(tmp_path, fake):
    demo = write_demo_checkpoint(tmp_path / "demo")
    suite = write_suite(tmp_path / "SUITE.yaml", f"""\
        defaults: {{target: x86-cpu}}
        cases:
          - {{name: first, checkpoint: {demo}}}
          - {{name: second, checkpoint: {demo}, options: {{fp8_embedding: true}}}}
          - {{name: third, checkpoint: {demo}, options: {{clamp_fp16: true}}}}
        """)
    fake.fail_next = [lambda result: result, KeyboardInterrupt()]
    work = tmp_path / "WORK"
    assert main(["-q", "qualify", str(suite), "--out", str(work)]) == 130
    q = load(work)
    assert [(c["name"], c["verdict"]) for c in q["cases"]] == [("first", "pass"), ("second", "error"),
                                                                ("third", "error")]
    assert "no report was produced" in q["cases"][1]["reason"] and q["verdict"] == "error"
