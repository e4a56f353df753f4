"""The torch-free core that the exporter (edgellm_export) and the validation stage (edgellm_validate) share,
and that a device needs: user-facing errors, file digests and the manifest, the runtime bindings, the
safetensors header reader, the ONNX graph builder and the custom ops' faces (schemas, emission,
lowerings; their torch ops load torch lazily), and the strict base of the file formats.

Dependencies point one way: edgellm_core <- edgellm_validate <- edgellm_export (whose `make`
pipeline and CLI drive validation); nothing here imports either of them.
"""

__version__ = "0.1.0"
