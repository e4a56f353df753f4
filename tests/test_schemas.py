"""The published JSON Schemas (schemas/*.schema.json): generated from the pydantic models, valid Draft 2020-12,
and in agreement with the models on the files we ship and on malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm_export.cli import main
from edgellm_export.published_schemas import SCHEMA_NAMES, json_schema, model_for, schema_text
from edgellm_validate.targets import DEFAULT_PLATFORMS, PlatformMatrix, load_platforms

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
SUITES = sorted((ROOT / "containers" / "suites").glob("*.yaml"))
REGENERATE = "regenerate with: for n in suite report platforms; do edgellm schema $n > schemas/$n.schema.json; done"


def _validator(name: str):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_committed_schemas_are_the_generated_ones(name):
    committed = (SCHEMAS / f"{name}.schema.json").read_text()
    assert committed == schema_text(name), f"schemas/{name}.schema.json is stale; {REGENERATE}"
    schema = json.loads(committed)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False  # extra="forbid", published


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_cli_prints_the_schema(name, capsys):
    assert main(["schema", name]) == 0
    out = capsys.readouterr().out
    assert out == schema_text(name) and json.loads(out) == json_schema(name)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schemas_are_draft_2020_12(name):
    _validator(name)


def test_shipped_platform_matrix_validates():
    data = json.loads(DEFAULT_PLATFORMS.read_text())
    assert not list(_validator("platforms").iter_errors(data))
    PlatformMatrix.model_validate(data)
    assert set(load_platforms()) == set(data["targets"])


def test_example_suites_validate(monkeypatch, tmp_path):
    from edgellm_export.make.suite import SuiteFile, load_suite

    monkeypatch.setenv("EDGELLM_CHECKPOINTS", str(tmp_path))

    assert SUITES, "containers/suites/ has no example suite"
    validator = _validator("suite")
    for path in SUITES:
        data = yaml.safe_load(path.read_text())
        assert not [e.message for e in validator.iter_errors(data)], path
        SuiteFile.model_validate(data)
        assert load_suite(path, check_paths=False).cases


def test_a_real_report_validates(tmp_path):
    from edgellm_validate.report import case_error, case_skipped, new_report

    q = new_report([case_skipped("a", "no board", target="thor-jp7"),
                    case_error("b", "refused", stage="export", expect="error", target="x86-cpu")],
                   suite={"name": "s", "file": "S.yaml", "sha256": "ab" * 32, "format": 1, "cases": ["a", "b"]})
    q = json.loads(json.dumps(q))  # as read back from qualification.json
    assert not [e.message for e in _validator("report").iter_errors(q)]
    bad = {**q, "cases": [{**q["cases"][0], "colour": "red"}, q["cases"][1]]}
    assert list(_validator("report").iter_errors(bad))


BAD_SUITES = [
    {"cases": [{"name": "a", "checkpoint": "c", "target": "x86-cpu", "treshold": {}}]},
    {"cases": [{"name": "a/b", "checkpoint": "c", "target": "x86-cpu"}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": "x86-cpu", "release": "seven"}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": "x86-cpu", "release": 0.7}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": "x86-cpu", "precision": "fp17"}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": ["x86-cpu", "x86-cpu"]}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": []}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": "x86-cpu", "thresholds": {"min_cosine": 2}}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": "x86-cpu", "options": {"golden": False}}]},
    {"cases": [{"name": "a", "checkpoint": "c", "target": "x86-cpu", "expect": "maybe"}]},
    {"cases": [{"name": "a", "target": "x86-cpu"}]},
    {"cases": []},
    {"format": 2, "cases": [{"name": "a", "checkpoint": "c"}]},
]


@pytest.mark.parametrize("data", BAD_SUITES, ids=range(len(BAD_SUITES)))
def test_schema_and_model_refuse_the_same_suites(data):
    from pydantic import ValidationError

    assert list(_validator("suite").iter_errors(data))
    with pytest.raises(ValidationError):
        model_for("suite").model_validate(data)


def test_platforms_json_is_package_data():
    """Found through importlib.resources inside the package, not through the source tree."""
    assert DEFAULT_PLATFORMS.is_file()
    assert DEFAULT_PLATFORMS.parent.parent == Path(__import__("edgellm_validate").__file__).resolve().parent
    assert not (ROOT / "containers" / "platforms.json").exists()
