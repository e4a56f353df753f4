"""Qwen3-MoE's sparse MLP with NVFP4 (ModelOpt) experts, through `trt_edgellm::NvFP4MoEPluginGeforce`
(families.md §2.3, quant.md §3.4, §3.12), both faces.

Graph: the router as moe.py has it (fp16 `MatMul` over the hidden states flattened to `[B*S, H]`, then a
`Cast` to fp32) and one plugin node. The plugin always renormalises the k routing weights; with
`norm_topk_prob: false` its output is multiplied by the sum of the k softmax probabilities (fp32, rounded
once to fp16): moe_plugin_routing.py, shared with moe_int4.py.

Weights: an exact repack, not NVIDIA's. The 0.7.1 exporter decodes every expert, rounds it through bf16 and
re-quantizes it with block scale amax / 6 and no global scale (so small blocks fall into fp8 subnormals),
feeding ones for all four scale vectors. The plugin's inputs allow better: its MMA multiplies fp4 codes by
their fp8 block scales only, and the epilogue multiplies by a per-expert alpha. So here
- fc1_qweights / fc2_qweights are the checkpoint's bytes (ModelOpt's `[N, K/2]`, low nibble = even k, is the
  kernel's layout), FC1 = up rows then gate rows;
- fc*_blocks_scale are the checkpoint's fp8 `weight_scale` bytes, only rearranged into the 6-D MMA layout;
- input_global_scale[e] / down_input_scale[e] are the expert's ModelOpt `input_scale` (amax / (6 * 448), the
  divisor convention the kernel is built with), and fc*_alpha[e] = input scale x `weight_scale_2`.
FP4 codes and block scales exported equal the checkpoint's bit for bit.

What the plugin cannot express is refused, naming the tensors, rather than approximated:
- gate and up of one expert with different `weight_scale_2`: FC1 has one alpha per expert for both halves
  (ModelOpt gives fused gate/up one global scale; re-quantize otherwise);
- sizes outside the 0.7.1 kernels' limits (nvfp4_moe.check_shape: hidden_size 2048, moe_intermediate_size
  % 128), a group size other than 16, and a quantized router.
Gate and up with different `input_scale` (one quantization of the token per expert in the plugin) take
the larger of the two, with a warning: the weights stay exact, the activation scale is a choice.
"""

from __future__ import annotations

import logging

import numpy as np

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, INT8
from edgellm_core.ops import nvfp4_moe

from ...config import ModelConfig
from ...quant.plan import NVFP4
from ...quant.scales import checked_fp32
from . import linear
from . import moe_plugin_routing as routing

log = logging.getLogger(__name__)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
STACKS = ("fc1_qweights", "fc1_blocks_scale", "fc1_alpha", "fc2_qweights", "fc2_blocks_scale", "fc2_alpha",
          "input_global_scale", "down_input_scale")


def stack_name(layer: int, what: str) -> str:
    return f"layers.{layer}.mlp.experts.{what}.stacked"


def is_nvfp4(layer_quant: dict) -> bool:
    """Whether a layer's (prefix-stripped) decisions put its experts on the NVFP4 plugin."""
    return any(k.startswith("mlp.experts.") and v.format == NVFP4 for k, v in layer_quant.items())


def _scalar(ref, what: str) -> float:
    v = float(checked_fp32(ref, what).reshape(-1)[0])
    if not v > 0:
        raise UnsupportedError(f"tensor {ref.key!r}: {what} is {v}; NvFP4MoEPluginGeforce needs a positive scale",
                               ref.file.path)
    return v


class _Expert:
    """One expert linear's four NVFP4 tensors, checked from their headers; its two scalars read now."""

    def __init__(self, ws, name: str, n: int, k: int):
        self.name = name
        self.w = ws.quant_ref(f"{name}.weight", ("U8",), (n, k // 2), "NVFP4 packed weight")
        self.bs = ws.quant_ref(f"{name}.weight_scale", ("F8_E4M3",), (n, k // nvfp4_moe.BLOCK), "NVFP4 block scales")
        self.ws2_ref = ws.quant_ref(f"{name}.weight_scale_2", ("F32",), (), "NVFP4 global weight scale")
        self.sx_ref = ws.quant_ref(f"{name}.input_scale", ("F32",), (), "NVFP4 input scale")
        self.ws2 = _scalar(self.ws2_ref, "weight_scale_2")
        self.sx = _scalar(self.sx_ref, "input_scale")

    def codes(self) -> np.ndarray:
        a = self.w.view().numpy().copy()
        self.w.release()
        return a

    def scales(self) -> np.ndarray:
        import torch

        a = self.bs.view().view(torch.uint8).numpy().copy()
        self.bs.release()
        return a


def emit(e, layer: int, y: str) -> str:
    """The graph face: router MatMul + Cast, the plugin node, and (norm_topk_prob false) the rescale."""
    import torch

    g, c, ws, m = e.g, e.cfg, e.w, e.cfg.moe
    h, inter, experts = c.hidden_size, m.intermediate_size, m.num_experts
    where = ws.ckpt.path
    routing.refuse_quantized_router(e, layer)
    names = [f"layers.{layer}.mlp.experts.{x}.{p}" for x in range(experts) for p in PROJECTIONS]
    groups = {e.quant.linears[nm].group_size for nm in names}
    if groups != {nvfp4_moe.BLOCK}:
        raise UnsupportedError(f"layer {layer}'s NVFP4 experts use group size(s) {sorted(groups)}; "
                               f"NvFP4MoEPluginGeforce takes 16-wide blocks only", where)
    why = nvfp4_moe.check_shape(h, inter, experts, m.top_k)
    if why:
        raise UnsupportedError(
            f"layer {layer}'s NVFP4 MoE experts: {why}. The 0.7.1 NvFP4MoEPluginGeforce (SM 120/121 CuTeDSL "
            f"kernels) runs hidden_size == {nvfp4_moe.SUPPORTED_HIDDEN} exactly, moe_intermediate_size a multiple "
            f"of {nvfp4_moe.TILE_N} and 1 <= num_experts_per_tok <= num_experts; other sizes need NVIDIA to "
            "rebuild the kernels, so this checkpoint cannot be exported with NVFP4 experts for 0.7.1", where)
    dims = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    ex = [{p: _Expert(ws, f"layers.{layer}.mlp.experts.{x}.{p}", *dims[p]) for p in PROJECTIONS}
          for x in range(experts)]
    for d in ex:
        gate, up = d["gate_proj"], d["up_proj"]
        if gate.ws2 != up.ws2:
            raise UnsupportedError(
                f"tensor {up.ws2_ref.key!r}: weight_scale_2 {up.ws2!r} differs from {gate.ws2_ref.key!r} "
                f"({gate.ws2!r}). NvFP4MoEPluginGeforce applies one FC1 global scale (alpha) to gate and up "
                "together, so these block scales cannot be repacked exactly; quantize the experts with gate and "
                "up sharing one global amax (ModelOpt does so for fused gate/up layers)", up.ws2_ref.file.path)
        if gate.sx != up.sx:
            log.warning("%s: gate/up input_scale differ (%g, %g); the plugin quantizes the token once per expert, "
                        "with the larger", gate.name, gate.sx, up.sx)

    logits = routing.router_logits(e, layer, y)  # as the plugin reads them: [B*S, E] fp32
    shapes = nvfp4_moe.stack_shapes(experts, h, inter)
    fc1 = [(d["up_proj"], d["gate_proj"]) for d in ex]  # [up; gate], the kernel's FC1 row order
    fc2 = [(d["down_proj"],) for d in ex]
    gs1 = [max(d["gate_proj"].sx, d["up_proj"].sx) for d in ex]
    gs2 = [d["down_proj"].sx for d in ex]
    vectors = {"fc1_alpha": [np.float32(s) * np.float32(d["gate_proj"].ws2) for s, d in zip(gs1, ex)],
               "fc2_alpha": [np.float32(s) * np.float32(d["down_proj"].ws2) for s, d in zip(gs2, ex)],
               "input_global_scale": gs1, "down_input_scale": gs2}

    def weights(parts, shape):
        def produce():
            out = np.empty(shape, np.int8)
            for x, lins in enumerate(parts):
                out[x] = np.concatenate([lin.codes() for lin in lins], axis=0).view(np.int8)
            return torch.from_numpy(out)
        return produce

    def scales(parts, shape):
        def produce():
            out = np.empty(shape, np.int8)
            for x, lins in enumerate(parts):
                out[x] = nvfp4_moe.swizzle_scales(np.concatenate([lin.scales() for lin in lins], axis=0))
            return torch.from_numpy(out)
        return produce

    def tag(parts):
        return f"{parts[0][0].w.where()} .. {parts[-1][-1].w.where()}"

    names = {}
    for what, parts in (("fc1", fc1), ("fc2", fc2)):
        q, s = f"{what}_qweights", f"{what}_blocks_scale"
        names[q] = g.weight(stack_name(layer, q), INT8, shapes[q], weights(parts, shapes[q]), tag=tag(parts))
        names[s] = g.weight(stack_name(layer, s), INT8, shapes[s], scales(parts, shapes[s]), tag=tag(parts))
    for what, vals in vectors.items():
        arr = np.array(vals, np.float32)
        names[what] = g.weight(stack_name(layer, what), FLOAT, shapes[what], lambda a=arr: torch.from_numpy(a),
                               tag=f"{ex[0]['gate_proj'].sx_ref.where()} .. (per-expert scales)")
    out = nvfp4_moe.emit(g, logits, y, *(names[s] for s in STACKS), num_experts=experts, top_k=m.top_k,
                         hidden_size=h, moe_inter_size=inter)
    if m.norm_topk_prob:
        return out
    return routing.undo_renormalisation(g, out, logits, y, h, m.top_k)


def eager(y, t: dict, cfg: ModelConfig, layer_quant: dict):
    """Eager face over the block's initializers (names without the `layers.{i}.` prefix): the plugin's
    numerics (nvfp4_moe's torch helpers), then the norm_topk_prob rescale."""

    m, h = cfg.moe, cfg.hidden_size
    logits = linear.eager(y, t, "mlp.gate", layer_quant).float().reshape(-1, m.num_experts)
    op = nvfp4_moe.register_torch_op()
    s = {what: t[f"mlp.experts.{what}.stacked"] for what in STACKS}
    out = op(logits, y.half(), *(s[w] for w in STACKS), m.num_experts, m.top_k, h, m.intermediate_size,
             nvfp4_moe.ACTIVATION_SWIGLU, nvfp4_moe.BACKEND_AUTO, 0, nvfp4_moe.IO_FP16).float()
    if not m.norm_topk_prob:
        out = linear.r16(out.reshape(-1, h) * routing.topk_probability_sum(logits, m.top_k)).reshape(out.shape)
    return out
