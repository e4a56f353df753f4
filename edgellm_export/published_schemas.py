"""The published JSON Schemas of the file formats: `edgellm schema suite|report|platforms`.

The models live with their formats (make/suite.py, edgellm_validate's report and targets); this registry
sits above both packages, so the torch-free core (edgellm_core.schema) never imports them.
"""

from __future__ import annotations

import json

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from edgellm_core.schema import JSON_SCHEMA_DIALECT

SCHEMA_NAMES = ("suite", "report", "platforms")


class _Generator(GenerateJsonSchema):
    """Draft 2020-12 with the dialect named, and no generated per-property titles (noise in editors)."""

    def field_title_should_be_set(self, schema) -> bool:
        return False

    def generate(self, schema, mode="validation"):
        out = super().generate(schema, mode=mode)
        return {"$schema": JSON_SCHEMA_DIALECT, **out}


def model_for(name: str) -> type[BaseModel]:
    if name == "suite":
        from .make.suite import SuiteFile

        return SuiteFile
    if name == "report":
        from edgellm_validate.report.qualification import QualificationReport

        return QualificationReport
    if name == "platforms":
        from edgellm_validate.targets import PlatformMatrix

        return PlatformMatrix
    raise KeyError(f"no schema named {name!r}; known: {', '.join(SCHEMA_NAMES)}")


def json_schema(name: str) -> dict:
    """The JSON Schema of a file format: `suite`, `report` or `platforms`."""
    return model_for(name).model_json_schema(schema_generator=_Generator)


def schema_text(name: str) -> str:
    """The schema as written to schemas/NAME.schema.json and printed by `edgellm schema NAME`."""
    return json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n"
