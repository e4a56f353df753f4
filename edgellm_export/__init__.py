"""edgellm-export: HuggingFace checkpoints to TensorRT Edge-LLM ONNX exports."""

__version__ = "0.1.0"
