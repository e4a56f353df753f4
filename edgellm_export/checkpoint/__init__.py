"""Reading HuggingFace checkpoints: config, quant metadata, lazily mapped tensors."""

from .reader import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
