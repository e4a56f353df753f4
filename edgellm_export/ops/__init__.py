"""Edge-LLM custom ops. Each module holds the four faces of one op:

1. the torch custom op and its eager reference implementation (`register_torch_op`),
2. its ONNX schema (`register_schema`, so onnx's checker can type-check exported nodes),
3. the translation to the node the runtime expects (`emit`),
4. a lowering to standard ONNX ops as an ONNX function (`lowering`), so that
   onnxruntime can run an exported graph on a CPU.

Faces 2-4 need only `onnx`, so the validation side imports these modules on
machines without torch; face 1 imports torch lazily.
"""

from . import attention_plugin

# (domain, op_type) -> module providing `lowering(node) -> FunctionProto`
CUSTOM_OPS = {
    (attention_plugin.DOMAIN, attention_plugin.OP_TYPE): attention_plugin,
}


def register_schemas() -> None:
    for mod in CUSTOM_OPS.values():
        mod.register_schema()
