"""Edge-LLM custom ops. Each module holds the four faces of one op:

1. the torch custom op and its eager reference implementation (`register_torch_op`),
2. its ONNX schema (`register_schema`, so onnx's checker can type-check exported nodes),
3. the translation to the node the runtime expects (`emit`),
4. a lowering to standard ONNX ops as an ONNX function (`lowering`), so that
   onnxruntime can run an exported graph on a CPU.

Faces 2-4 need only `onnx`, so the validation side imports these modules on
machines without torch; face 1 imports torch lazily.
"""

from edgellm_core.ops import (
    attention_plugin,
    causal_conv1d,
    fp4,
    gated_delta_net,
    int4_gemm,
    int4_moe,
    mxfp8,
    nvfp4_moe,
    nvfp4_moe_nemotron,
    update_ssm_state,
    vit_attention_plugin,
)

# (domain, op_type) -> module providing `lowering(node) -> FunctionProto`
CUSTOM_OPS = {
    (attention_plugin.DOMAIN, attention_plugin.OP_TYPE): attention_plugin,
    (causal_conv1d.DOMAIN, causal_conv1d.OP_TYPE): causal_conv1d,
    (gated_delta_net.DOMAIN, gated_delta_net.OP_TYPE): gated_delta_net,
    (update_ssm_state.DOMAIN, update_ssm_state.OP_TYPE): update_ssm_state,
    (vit_attention_plugin.DOMAIN, vit_attention_plugin.OP_TYPE): vit_attention_plugin,
    (int4_gemm.DOMAIN, int4_gemm.OP_TYPE): int4_gemm,
    (int4_moe.DOMAIN, int4_moe.OP_TYPE): int4_moe,
    (nvfp4_moe.DOMAIN, nvfp4_moe.OP_TYPE): nvfp4_moe,
    (nvfp4_moe_nemotron.DOMAIN, nvfp4_moe_nemotron.OP_TYPE): nvfp4_moe_nemotron,
    (fp4.DOMAIN, fp4.QUANTIZE): fp4,
    (fp4.DOMAIN, fp4.DEQUANTIZE): fp4,
    (mxfp8.DOMAIN, mxfp8.QUANTIZE): mxfp8,
    (mxfp8.DOMAIN, mxfp8.DEQUANTIZE): mxfp8,
}


def register_schemas() -> None:
    for mod in set(CUSTOM_OPS.values()):
        mod.register_schema()
