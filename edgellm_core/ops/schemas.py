"""Registering our ONNX schemas once, shared by every op module (face 2)."""

from __future__ import annotations

import onnx

# Lowerings (face 4) are ONNX functions in this domain, inlined into exported graphs, so they use the
# graphs' standard opset (contract text.md: opset 24).
LOWERING_DOMAIN = "edgellm.lowering"
ONNX_OPSET = 24
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value: every FP8 quantizer clamps to it


def register_missing(*schemas: onnx.defs.OpSchema) -> None:
    """Register each schema unless onnx already knows one of that name, version and domain."""
    for s in schemas:
        try:
            onnx.defs.get_schema(s.name, s.since_version, s.domain)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(s)
