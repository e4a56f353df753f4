"""Typed file formats: the pydantic base model, one-paragraph errors, and the published JSON Schemas.

Three user-written or tool-written files are validated by pydantic v2 models (extra keys forbidden):
suites (`make/suite.py`, SuiteFile), qualification reports (`edgellm_validate/report/qualification.py`,
QualificationReport) and the platform matrix (`edgellm_validate/targets.py`, PlatformMatrix).
`edgellm schema suite|report|platforms` prints a model's JSON Schema (Draft 2020-12; the registry is
edgellm_export/published_schemas.py); the copies in `schemas/` are generated from the same call and a
test keeps them equal.

A pydantic ValidationError never reaches the user as such: `explain` turns it into one paragraph with the
field path of each problem (`cases[2].target: ...`), in the file's own terms (YAML or JSON).
Pure Python plus pydantic: imported on devices by edgellm_validate, so no torch, numpy or yaml here.
"""

from __future__ import annotations

import functools
import json
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
CUSTOM = "edgellm"  # error type of the checks written here (the message is already for people)


class StrictModel(BaseModel):
    """Base of the file models: unknown keys are errors, and values are never coerced (a YAML 0.10 is not the
    string "0.10", a JSON "87" is not the number 87)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # how this model's keys are called in messages ("unknown export option 'golden'")
    key_noun: typing.ClassVar[str] = "key"


def problem(message: str) -> PydanticCustomError:
    """An error for a validator to raise; `explain` prints `message` as it is, after the field path."""
    return PydanticCustomError(CUSTOM, message.replace("{", "{{").replace("}", "}}"))


def no_default(schema: dict) -> None:
    """json_schema_extra for an optional key that has no value of its own when absent (not `null`)."""
    schema.pop("default", None)


# ---------------------------------------------------------------- errors for people


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def _strip(ann):
    """X from Annotated[X, ...] and Optional[X]; (X, nullable)."""
    nullable = False
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(ann))
            if len(args) != 1:
                return functools.reduce(operator.or_, args) if args else type(None), nullable
            ann = args[0]
        else:
            return ann, nullable


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _field_of(model: type[BaseModel], key):
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return info
    return None


def _at(model: type[BaseModel], loc):
    """(FieldInfo or None, annotation or None) of the value at `loc` inside `model`."""
    ann, info = model, None
    for part in loc:
        ann, _ = _strip(ann)
        origin = typing.get_origin(ann)
        if _is_model(ann) and isinstance(part, str):
            info = _field_of(ann, part)
            if info is None:
                return None, None
            ann = info.annotation
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
            ann, info = typing.get_args(ann)[0], None
        elif origin in (dict, Mapping) and isinstance(part, str):
            ann, info = typing.get_args(ann)[1], None
        else:
            return None, None
    return info, ann


def _keys(model) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _bounds(info) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in getattr(info, "metadata", None) or ():
        if isinstance(m, annotated_types.Ge | annotated_types.Gt):
            lo = getattr(m, "ge", getattr(m, "gt", None))
        elif isinstance(m, annotated_types.Le | annotated_types.Lt):
            hi = getattr(m, "le", getattr(m, "lt", None))
    return lo, hi


def _what(ann, info, yaml: bool) -> str:
    """'a string', 'a number from -1 to 1', 'one of pass, fail, error', '... or null'."""
    ann, nullable = _strip(ann)
    origin = typing.get_origin(ann)
    mapping = "a mapping (key: value lines)" if yaml else "an object"
    if origin is typing.Literal:
        choices = [str(a) for a in typing.get_args(ann)]
        what = choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    elif ann is bool:
        what = "true or false"
    elif ann in (int, float):
        lo, hi = _bounds(info)
        what = "an integer" if ann is int else "a number"
        if lo is not None and hi is not None:
            what += f" from {lo:g} to {hi:g}"
        elif lo is not None:
            what += f" of at least {lo:g}"
        elif hi is not None:
            what += f" of at most {hi:g}"
    elif ann is str:
        what = "a string"
    elif origin in (list, tuple, set, frozenset):
        what = "a list"
    elif origin in (dict, Mapping) or _is_model(ann):
        what = mapping
    elif origin in (typing.Union, types.UnionType):
        what = " or ".join(_what(a, None, yaml) for a in typing.get_args(ann))
    else:
        what = "a valid value"
    return what + (" or null" if nullable else "")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _show(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def found(value, key: str = "key", *, yaml: bool = False) -> str:
    """', found VALUE'; for a YAML scalar where text was wanted, how YAML read it and how to quote it."""
    if yaml and isinstance(value, bool | int | float):
        return f", but YAML read {value!r} as {_a(type(value).__name__)}; quote it ({key}: \"{value}\")"
    return f", found {_show(value)}"


_TYPE_ERRORS = {"string_type", "int_type", "float_type", "bool_type", "dict_type", "list_type", "model_type",
                "model_attributes_type", "literal_error", "enum", "none_required", "int_from_float",
                "greater_than_equal", "less_than_equal", "greater_than", "less_than", "finite_number",
                "union_tag_invalid"}


def _message(err: Mapping, model: type[BaseModel], yaml: bool) -> str:
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    if kind == CUSTOM:
        return err["msg"]
    if kind == "missing":
        return f"has no {loc[-1]!r}"
    info, ann = _at(model, loc)
    if kind in _TYPE_ERRORS and ann is not None:
        text = f"must be {_what(ann, info, yaml)}"
        if _strip(ann)[0] is str and info is not None and info.description and len(info.description) <= 60:
            text += f" ({info.description})"
        if kind == "string_type":
            return text + found(value, loc[-1] if loc and isinstance(loc[-1], str) else "key", yaml=yaml)
        return f"{text}, found {_show(value)}"
    if kind in ("too_short", "list_too_short"):
        return f"must not be empty, found {_show(value)}" if not value else f"is too short ({err['msg']})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return f"{_show(value)} does not match the pattern {err.get('ctx', {}).get('pattern')}"
    msg = str(err.get("msg") or kind)
    return (msg[:1].lower() + msg[1:]) + (f", found {_show(value)}" if "input" in err else "")


def case_label(loc: tuple, data) -> str | None:
    """' (case NAME)' after a path inside `cases[i]` whose case has a string name: which case is meant is
    easier to see by name than by index."""
    if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
        try:
            name = data["cases"][loc[1]]["name"]
        except (KeyError, IndexError, TypeError):
            return None
        if isinstance(name, str):
            return f" (case {name!r})"
    return None


def explain(error: ValidationError, model: type[BaseModel], data=None, *, yaml: bool = False,
            label: Callable[[tuple, Any], str | None] | None = None) -> str:
    """One paragraph for a pydantic ValidationError of `model` on `data`: each problem after its field path
    (`cases[2].target: ...`), unknown keys of one mapping together, in the file's own words (YAML or JSON).
    `label(loc, data)` may name the thing at a path prefix (e.g. " (case 'llama')")."""
    problems: list[tuple[tuple, str]] = []
    unknown: dict[tuple, list[str]] = {}
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        if err["type"] == "missing":
            problems.append((loc[:-1], _message(err, model, yaml)))
            continue
        problems.append((loc, _message(err, model, yaml)))
    for parent, keys in unknown.items():
        _, ann = _at(model, parent)
        ann, _ = _strip(ann) if ann is not None else (None, False)
        noun = getattr(ann, "key_noun", "key") if _is_model(ann) else "key"
        allowed = f"; allowed: {', '.join(_keys(ann))}" if _is_model(ann) else ""
        problems.append((parent, f"unknown {noun} {', '.join(repr(k) for k in keys)}{allowed}"))
    problems.sort(key=lambda p: [(0, x, "") if isinstance(x, int) else (1, 0, str(x)) for x in p[0]])
    out = []
    for loc, text in problems:
        where = _path(loc)
        extra = label(loc, data) if label is not None else None
        where = f"{where}{extra or ''}"
        out.append(f"{where}: {text}" if where else text)
    if len(out) > 1:
        return f"{len(out)} problems: " + "; ".join(out)
    return out[0] if out else str(error)
