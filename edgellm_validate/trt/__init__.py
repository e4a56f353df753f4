"""TensorRT backend: Edge-LLM plugin loading, engine build with llm_build's profiles, and a runner.

Nothing here imports `tensorrt` or `pycuda` at module import time: the pure parts
(profiles, plugin path resolution, profile selection, dtype mapping) run and are
tested on any machine; the GPU parts import their dependencies when called.
"""
