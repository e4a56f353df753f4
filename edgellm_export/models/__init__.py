"""Model families: model_type -> native implementation."""

from .registry import FAMILIES, family_for

__all__ = ["FAMILIES", "family_for"]
