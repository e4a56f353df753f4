"""edgellm-export: HuggingFace checkpoints to TensorRT Edge-LLM ONNX exports."""

from edgellm_core import __version__

__all__ = ["__version__"]
