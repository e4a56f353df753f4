"""Registering our ONNX schemas once, shared by every op module (face 2)."""

from __future__ import annotations

import onnx


def register_missing(*schemas: onnx.defs.OpSchema) -> None:
    """Register each schema unless onnx already knows one of that name, version and domain."""
    for s in schemas:
        try:
            onnx.defs.get_schema(s.name, s.since_version, s.domain)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(s)
