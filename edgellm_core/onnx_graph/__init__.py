"""Building ONNX graphs directly from model structure, weights streamed separately."""
