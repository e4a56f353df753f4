"""Dispatch from config.json's model_type to a registered model family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgellm_core.errors import UnsupportedError

from ..checkpoint.reader import Checkpoint
from ..config import ModelConfig
from . import decoder


@dataclass(frozen=True)
class Family:
    """A model family: how to read its checkpoint and which graph builder it uses."""

    model_types: tuple[str, ...]
    # Adjusts the checkpoint view (e.g. splits fused tensors) once the config is known.
    prepare: Callable[[Checkpoint, ModelConfig], None] = decoder.split_fused_tensors
    emit_graph: Callable = decoder.emit_graph
    linear_names: Callable = decoder.linear_names
    torch_modules: Callable = decoder.torch_modules


FAMILIES: dict[str, Family] = {}


def is_quantized(ckpt: Checkpoint) -> bool:
    """The checkpoint carries quantization metadata (embedded, or ModelOpt's hf_quant_config.json)."""
    return bool(ckpt.config.get("quantization_config")) or (ckpt.path / "hf_quant_config.json").exists()


def refuse_quantized(ckpt: Checkpoint, family: str) -> None:
    """For families whose quantized paths are not built yet: refuse any quantization metadata up front."""
    if is_quantized(ckpt):
        raise UnsupportedError(f"quantized {family} checkpoints are not supported yet; export the FP16/BF16 one",
                               ckpt.config_path)


def register(family: Family) -> Family:
    for t in family.model_types:
        FAMILIES[t] = family
    return family


def family_for(cfg: ModelConfig, config_path) -> Family:
    from . import llama, mistral, nemotron_h, phi3, qwen2, qwen3, qwen3_5, qwen3_moe  # noqa: F401  (registration)

    fam = FAMILIES.get(cfg.model_type)
    if fam is None:
        raise UnsupportedError(
            f"model_type {cfg.model_type!r} is not supported (supported: "
            f"{', '.join(sorted(FAMILIES))})",
            config_path,
        )
    if cfg.hidden_act not in ("silu", "swish"):
        raise UnsupportedError(
            f"hidden_act {cfg.hidden_act!r}: the dense decoder implements SwiGLU (silu) only",
            config_path,
        )
    return fam
