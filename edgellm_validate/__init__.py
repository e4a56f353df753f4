"""Validation of an edgellm-export directory: backends, the runtime twin, comparison.

Reads only the export directory (graph, sidecars, golden bundle); needs numpy,
onnx and a backend (onnxruntime on a CPU, TensorRT on a device), never torch.
"""
