"""Decoder blocks, each with both of its faces in one module.

A block's graph face emits ONNX nodes through the GraphBuilder from the config alone (no weights); its
eager face computes the same numerics in torch over the produced initializers, for the golden bundle
(fp32 arithmetic, rounded to fp16 wherever the graph stores fp16). Anything both faces depend on (a
plugin attribute, a norm convention, an epsilon) is computed once, by the block, and handed to both, so
the faces cannot drift apart; `tests/test_block_faces.py` holds them to that.

- `linear.py`: a linear layer in its checkpoint's format (fp16 or a quantized one, `quant/`).
- `norms.py`: RMSNorm over the hidden size and per head.
- `attention.py`: GQA attention through the runtime's AttentionPlugin (gated for Qwen3.5, NoPE for Nemotron-H).
- `gdn.py`: Qwen3.5's GatedDeltaNet mixer; `mamba.py`: Nemotron-H's Mamba2 mixer; `conv.py`: their causal
  conv, fed its history in chunked prefill.
- `mlp.py`: the SwiGLU and ReLU^2 MLPs; `moe.py`: Qwen3-MoE's softmax-routed experts (FP16 in standard ops;
  `moe_int4.py` / `moe_nvfp4.py`: INT4 and NVFP4 experts through the runtime's MoE plugins);
  `sigmoid_moe.py`: Nemotron-H's sigmoid group-routed experts with a shared expert (`sigmoid_moe_nvfp4.py`:
  NVFP4 experts through Nvfp4MoePlugin).

`models/decoder.py` stacks them per layer from the config's layer plan (`ModelConfig.mixer` / `.mlp`);
a family file (`models/<family>.py`) maps its checkpoint's names onto the blocks' and registers it.
"""
