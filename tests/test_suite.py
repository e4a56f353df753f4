"""SUITE.yaml parsing (clear one-paragraph errors naming the file) and aggregation of case reports."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from edgellm_export.make.suite import SuiteError, aggregate, load_suite  # noqa: E402
from edgellm_validate.report import (  # noqa: E402
    ReportError,
    case_error,
    case_skipped,
    junit_xml,
    new_report,
    render_summary,
)

PLATFORMS = {
    "edgellm_release": "0.7.1",
    "targets": {
        "x86-cpu": {"backend": "cpu", "description": "CPU twin", "precisions": ["fp16", "fp8_embedding", "int4"]},
        "orin-jp6": {"backend": "trt", "description": "Jetson Orin JP6", "sm": 87,
                     "precisions": ["fp16", "int8", "int4", "fp8_embedding"]},
        "thor-jp7": {"backend": "trt", "description": "Jetson Thor", "sm": 110},
    },
}


@pytest.fixture
def env(tmp_path):
    (tmp_path / "platforms.json").write_text(json.dumps(PLATFORMS))
    for name in ("llama", "qwen"):
        (tmp_path / "ckpt" / name).mkdir(parents=True)
    return tmp_path


def write(env: Path, text: str, name: str = "SUITE.yaml") -> Path:
    p = env / name
    p.write_text(textwrap.dedent(text))
    return p


def load(env: Path, text: str, **kw):
    return load_suite(write(env, text), platforms_path=env / "platforms.json", **kw)


def test_full_suite(env, monkeypatch):
    monkeypatch.setenv("MODELS", str(env / "ckpt"))
    suite = load(env, """\
        name: release-0.2
        defaults:
          target: x86-cpu
          release: "0.7"
          thresholds: {min_cosine: 0.999}
          options: {clamp_fp16: true}
        cases:
          - name: llama
            checkpoint: ${MODELS}/llama
            target: [x86-cpu, orin-jp6]
            precision: fp16
            thresholds: {max_abs: 0.5}
          - name: qwen-neg
            checkpoint: ckpt/qwen
            expect: fail
            options: {fp8_embedding: true, clamp_fp16: false}
          - name: thor-nvfp4
            checkpoint: /nowhere/nvfp4
            target: thor-jp7
            precision: nvfp4
            skip: no Thor board this week
          - name: vlm-text
            checkpoint: ckpt/llama
            options: {components: [llm], attention: native}
        """)
    assert suite.name == "release-0.2" and len(suite.sha256) == 64
    assert [c.name for c in suite.cases] == ["llama@x86-cpu", "llama@orin-jp6", "qwen-neg", "thor-nvfp4", "vlm-text"]
    vlm = suite.case("vlm-text").export_options()
    assert vlm["components"] == ("llm",) and vlm["attention"] == "native"  # a multimodal one's text part, plugin-free
    llama = suite.case("llama@orin-jp6")
    assert (llama.target, llama.backend, llama.release, llama.precision) == ("orin-jp6", "trt", "0.7", "fp16")
    assert llama.checkpoint == env / "ckpt" / "llama"
    assert llama.thresholds == {"min_cosine": 0.999, "max_abs": 0.5}  # merged key by key
    assert llama.export_options() == {"clamp_fp16": True, "target": "0.7"}
    neg = suite.case("qwen-neg")
    assert neg.checkpoint == env / "ckpt" / "qwen" and neg.expect == "fail" and neg.backend == "cpu"
    assert neg.options == {"clamp_fp16": False, "fp8_embedding": True}
    thor = suite.case("thor-nvfp4")
    assert thor.skip == "no Thor board this week"  # its checkpoint need not exist
    assert suite.meta()["cases"] == [c.name for c in suite.cases]
    assert thor.report_identity()["target"] == "thor-jp7"


@pytest.mark.parametrize("text, problem", [
    ("", "is empty"),
    ("- a\n- b\n", "must be a mapping with a 'cases' list"),
    ("name: x\n", "needs a non-empty 'cases' list (there is no 'cases' key)"),
    ("cases: []\n", "needs a non-empty 'cases' list"),
    ("cases:\n  - name: a\n\tcheckpoint: b\n", "is not valid YAML: line 3, column 1"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu}]\ncases: []\n", "key 'cases' appears twice"),
    ("cases:\n  - name: a\n    checkpoint: ckpt/llama\n    target: x86-cpu\n    target: orin-jp6\n",
     "key 'target' appears twice in one mapping (lines 4 and 5)"),
    ("format: 2\ncases: []\n", "this edgellm reads suite format 1"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, treshold: {}}]",
     "cases[0] (case 'a'): unknown key 'treshold'; allowed: name, checkpoint"),
    ("cases: [{name: a, target: x86-cpu}]", "cases[0] (case 'a'): has no 'checkpoint'"),
    ("cases: [{checkpoint: ckpt/llama, target: x86-cpu}]", "cases[0]: has no 'name'"),
    ("cases: [{name: a, checkpoint: ckpt/llama}]", "has no 'target'"),
    ("cases: [{name: a/b, checkpoint: ckpt/llama, target: x86-cpu}]", "may use only letters"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu}, {name: a, checkpoint: ckpt/qwen, "
     "target: x86-cpu}]", "cases[1] (case 'a'): case name 'a' is also used by cases[0]"),
    ("cases: [{name: a, checkpoint: ./ckpt/absent, target: x86-cpu}]", "is not a directory (it does not exist)"),
    ("cases: [{name: a, checkpoint: $NOT_SET_ANYWHERE/x, target: x86-cpu}]", "environment variable"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: jetson-nano}]",
     "unknown target 'jetson-nano'; the platform matrix has: x86-cpu, orin-jp6, thor-jp7"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, release: 0.10}]",
     "YAML read 0.1 as a float; quote it"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, release: \"0.10\"}]", "not supported"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: orin-jp6, precision: fp8}]",
     "precision 'fp8' cannot run on target orin-jp6 (Jetson Orin JP6): it lacks fp8"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, precision: fp17}]", "unknown part(s) fp17"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, thresholds: {min_cosine: 2}}]",
     "cases[0].thresholds.min_cosine (case 'a'): must be a number from -1 to 1, found 2"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, thresholds: {min_cosine: yes}}]",
     "found True"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, thresholds: [0.9]}]",
     "cases[0].thresholds (case 'a'): must be a mapping"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, options: {golden: false}}]",
     "unknown export option 'golden'"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, options: {clamp_fp16: 1}}]",
     "must be true or false"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, expect: maybe}]",
     "cases[0].expect (case 'a'): must be one of pass, fail, error"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu, skip: true}]",
     "cases[0].skip (case 'a'): must be the reason"),
    ("cases: [{name: a, checkpoint: ckpt/llama, target: [x86-cpu, x86-cpu]}]", "lists a target twice"),
    ("defaults: {name: x}\ncases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu}]",
     "defaults: unknown key 'name'"),
    ("cases: [{name: 1.5, checkpoint: ckpt/llama, target: x86-cpu}]", "cases[0].name: must be a string"),
    ("cases: [a, b]", "cases[0]: must be a mapping"),
])
def test_malformed_suites_name_the_file_and_the_problem(env, text, problem):
    path = write(env, text)
    with pytest.raises(SuiteError) as e:
        load_suite(path, platforms_path=env / "platforms.json")
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert problem in msg, msg
    assert "\n" not in msg and "Traceback" not in msg


def test_unreadable_files(env):
    with pytest.raises(SuiteError, match="no such suite file"):
        load_suite(env / "absent.yaml")
    (env / "bin.yaml").write_bytes(b"cases: \xff\xfe")
    with pytest.raises(SuiteError, match="not UTF-8"):
        load_suite(env / "bin.yaml")
    (env / "big.yaml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(SuiteError, match="short list of cases"):
        load_suite(env / "big.yaml")


def test_python_tags_are_not_constructed(env):
    path = write(env, "cases: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SuiteError, match="is not valid YAML"):
        load_suite(path, platforms_path=env / "platforms.json")


def test_alias_bomb_is_cheap_to_check(env):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 12)]
    path = write(env, "\n".join(lines) + "\ncases: [{name: a, checkpoint: ckpt/llama, target: x86-cpu}]\n")
    with pytest.raises(SuiteError, match="unknown top-level key 'a0'"):
        load_suite(path, platforms_path=env / "platforms.json")


def test_checks_can_be_left_for_later(env):
    suite = load_suite(write(env, "cases: [{name: a, checkpoint: /not/here, target: some-lab-board}]"),
                       check_paths=False, check_targets=False)
    (case,) = suite.cases
    assert case.backend is None and case.checkpoint == Path("/not/here") and suite.name == "SUITE"


# ---------------------------------------------------------------- aggregation


ENV_A = {"host": {"hostname": "ci-1"}, "python": {"version": "3.11"}, "tool": {"name": "edgellm-export",
         "version": "0.1.0"}, "tensorrt": None, "packages": {}, "extra": {}}
ENV_B = {**ENV_A, "host": {"hostname": "orin-7"}, "tensorrt": "10.3.0"}


def test_aggregate_orders_by_suite_and_reports_missing_cases(env):
    suite = load(env, """\
        name: rel
        cases:
          - {name: llama, checkpoint: ckpt/llama, target: [x86-cpu, orin-jp6]}
          - {name: refused, checkpoint: ckpt/qwen, target: x86-cpu, expect: error}
          - {name: thor, checkpoint: /x, target: thor-jp7, skip: no board}
        """)
    c = {x.name: x for x in suite.cases}
    reports = [
        new_report([case_skipped("thor", "no board", **c["thor"].report_identity())], environment=ENV_A),
        new_report([case_error("refused", "yarn rope has no exact equivalent", stage="export",
                               **c["refused"].report_identity())], environment=ENV_A),
        new_report([case_error("llama@orin-jp6", "TensorRT missing", stage="validate",
                               **c["llama@orin-jp6"].report_identity())], environment=ENV_B),
    ]
    q = aggregate(reports, suite)
    assert [x["name"] for x in q["cases"]] == ["llama@x86-cpu", "llama@orin-jp6", "refused", "thor"]
    by = {x["name"]: x for x in q["cases"]}
    assert by["llama@x86-cpu"]["verdict"] == "error" and "no report was produced" in by["llama@x86-cpu"]["reason"]
    assert by["refused"]["verdict"] == "pass"  # refused, as expected
    assert by["llama@orin-jp6"]["environment"]["host"]["hostname"] == "orin-7"  # ran elsewhere
    assert "environment" not in by["refused"]
    assert q["environment"] == ENV_A and q["verdict"] == "error"
    assert q["suite"]["name"] == "rel" and q["suite"]["sha256"] == suite.sha256
    assert q["summary"] == {"pass": 1, "fail": 0, "error": 2, "skipped": 1, "total": 4}
    junit_xml(q)
    assert "cases run in another environment" in render_summary(q)

    stray = new_report([case_skipped("old-case", "x")], environment=ENV_A)
    with pytest.raises(ReportError, match="does not declare"):
        aggregate([stray], suite)
    with pytest.raises(ReportError, match="appears in reports 1 and 2"):
        aggregate([reports[0], reports[0]], suite)


def test_aggregate_without_suite_merges():
    a = new_report([case_skipped("a", "x")], environment=ENV_A)
    b = new_report([case_error("b", "refused", expect="error")], environment=ENV_A)
    q = aggregate([a, b])
    assert [x["name"] for x in q["cases"]] == ["a", "b"] and q["verdict"] == "pass" and q["suite"] is None
