"""Nemotron-H's MoE with NVFP4 (ModelOpt) routed experts, through `trt_edgellm::Nvfp4MoePlugin` (families.md
§2.4, quant.md §3.12), both faces; dispatched from sigmoid_moe.emit / sigmoid_moe.eager.

Graph: the router as sigmoid_moe.py has it (fp16 `MatMul`, here over the hidden states flattened to
`[B*S, H]` as the plugin reads its logits, then a `Cast` to fp32), the fp32 e_score_correction_bias, one
plugin node (routing_mode 1: sigmoid group top-k with n_group / topk_group / norm_topk_prob /
routed_scaling_factor; activation 0: ReLU^2), and the shared expert as in sigmoid_moe.py (fp16 linears, added
to the plugin's fp16 output in fp16, as NVIDIA's `modeling_nemotron_h.py` adds it).

Weights: a layout-only repack of the checkpoint, as NVIDIA's own (`repacking.py::_pack_nvfp4_raw_n_major`):
- up_qweights / down_qweights: the checkpoint's e2m1 codes, transposed to the plugin's N-major rows
  (nvfp4_moe_nemotron.n_major_codes: every nibble moved, none re-quantized);
- up/down_block_scale: the checkpoint's fp8 `weight_scale` bytes in the 128x4 atom layout;
  up/down_block_scale_decode: the same scales as the decode GEMVs read them (bits 14..7 of their fp16, exact);
- up/down_global_scale[e]: the expert's `weight_scale_2`;
- hidden_global_scale: [max over experts of up_proj.input_scale, max of down_proj.input_scale] (the plugin has
  one activation scale per GEMM for all experts; NVIDIA takes the max too). Weights stay exact; the
  activation scale is the one choice made here.
Refused, naming the tensors: group size other than 16, sizes the plugin's configurePlugin refuses
(nvfp4_moe_nemotron.check_shape), a quantized router, and a quantized shared expert (nemotron_h.prepare
refuses every quantized tensor outside the routed experts).
"""

from __future__ import annotations

import numpy as np

from edgellm_core.errors import UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, INT8
from edgellm_core.ops import nvfp4_moe_nemotron as op_mod

from ...config import ModelConfig
from ...quant.plan import FP16, NVFP4
from . import linear
from .moe_nvfp4 import _Expert

PROJECTIONS = ("up_proj", "down_proj")
STACKS = op_mod.INPUTS[2:11]  # hidden_global_scale .. down_block_scale_decode


def stack_name(layer: int, what: str) -> str:
    return f"layers.{layer}.mlp.experts.{what}.stacked"


def is_nvfp4(layer_quant: dict) -> bool:
    """Whether a layer's (prefix-stripped) decisions put its routed experts on the NVFP4 plugin."""
    return any(k.startswith("mlp.experts.") and v.format == NVFP4 for k, v in layer_quant.items())


def emit(e, layer: int, y: str) -> str:
    import torch

    from .sigmoid_moe import bias_name, router_name, shared_name

    g, c, ws, m = e.g, e.cfg, e.w, e.cfg.sigmoid_moe
    n, h, inter, experts = g.node, c.hidden_size, m.intermediate_size, m.num_experts
    where = ws.ckpt.path
    router = router_name(layer)
    for name in (router, shared_name(layer, "up_proj"), shared_name(layer, "down_proj")):
        if name in e.quant.linears and e.quant.linears[name].format != FP16:
            raise UnsupportedError(f"{name}: quantized ({e.quant.linears[name].format}); with NVFP4 routed experts "
                                   "only the experts go through Nvfp4MoePlugin, the router and the shared expert "
                                   "are exported in fp16", where)
    names = [f"layers.{layer}.mlp.experts.{x}.{p}" for x in range(experts) for p in PROJECTIONS]
    groups = {e.quant.linears[nm].group_size for nm in names}
    if groups != {op_mod.BLOCK}:
        raise UnsupportedError(f"layer {layer}'s NVFP4 experts use group size(s) {sorted(groups)}; "
                               "Nvfp4MoePlugin takes 16-wide blocks only (quantization_group_size 16)", where)
    why = op_mod.check_shape(h, inter, experts, m.top_k, m.n_group, m.topk_group)
    if why:
        raise UnsupportedError(
            f"layer {layer}'s NVFP4 MoE experts: {why}. The 0.7.1 Nvfp4MoePlugin (configurePlugin and its decode "
            "GEMVs) needs hidden_size and moe_intermediate_size multiples of 64, 1 <= num_experts_per_tok <= "
            "n_routed_experts and n_group dividing the experts with 1 <= topk_group <= n_group, so this "
            "checkpoint cannot be exported with NVFP4 experts for 0.7.1", where)
    dims = {"up_proj": (inter, h), "down_proj": (h, inter)}
    ex = [{p: _Expert(ws, f"layers.{layer}.mlp.experts.{x}.{p}", *dims[p]) for p in PROJECTIONS}
          for x in range(experts)]

    flat = n("Reshape", [y, g.i64(-1, h)])
    logits = n("Cast", [linear.emit(e, flat, router, experts, h, False)], {"to": FLOAT})
    bias = ws.vector_f32(bias_name(layer), experts)

    shapes = op_mod.stack_shapes(experts, h, inter)

    def stacked(proj, fn, shape):
        def produce():
            out = np.empty(shape, np.int8)
            for x, d in enumerate(ex):
                lin = d[proj]
                out[x] = fn(lin.codes() if fn is op_mod.n_major_codes else lin.scales())
            return torch.from_numpy(out)
        return produce

    def tag(proj):
        return f"{ex[0][proj].w.where()} .. {ex[-1][proj].w.where()}"

    names = {}
    for short, proj in (("up", "up_proj"), ("down", "down_proj")):
        for what, fn in (("qweights", op_mod.n_major_codes), ("block_scale", op_mod.prefill_scales),
                         ("block_scale_decode", op_mod.decode_scales)):
            key = f"{short}_{what}"
            names[key] = g.weight(stack_name(layer, key), INT8, shapes[key], stacked(proj, fn, shapes[key]),
                                  tag=tag(proj))
    vectors = {"hidden_global_scale": [max(d["up_proj"].sx for d in ex), max(d["down_proj"].sx for d in ex)],
               "up_global_scale": [d["up_proj"].ws2 for d in ex],
               "down_global_scale": [d["down_proj"].ws2 for d in ex]}
    for what, vals in vectors.items():
        arr = np.array(vals, np.float32)
        names[what] = g.weight(stack_name(layer, what), FLOAT, shapes[what], lambda a=arr: torch.from_numpy(a),
                               tag=f"{ex[0]['up_proj'].sx_ref.where()} .. (per-expert scales)")
    routed = op_mod.emit(g, logits, y, *(names[s] for s in STACKS), bias, num_experts=experts, top_k=m.top_k,
                         hidden_size=h, moe_inter_size=inter, n_group=m.n_group, topk_group=m.topk_group,
                         norm_topk_prob=m.norm_topk_prob, routed_scaling_factor=m.routed_scaling_factor)
    rs = n("Relu", [linear.emit(e, y, shared_name(layer, "up_proj"), m.shared_intermediate_size, h, False)])
    shared = linear.emit(e, n("Mul", [rs, rs]), shared_name(layer, "down_proj"), h, m.shared_intermediate_size,
                         False)
    return n("Add", [routed, shared])


def eager(y, t: dict, cfg: ModelConfig, layer_quant: dict):
    """Eager face over the block's initializers (names without the `layers.{i}.` prefix): the plugin's
    numerics (nvfp4_moe_nemotron's op), then the fp16 shared expert added in fp16."""
    import torch

    m, h, r16 = cfg.sigmoid_moe, cfg.hidden_size, linear.r16
    logits = linear.eager(y, t, "mlp.gate", layer_quant).float().reshape(-1, m.num_experts)
    op = op_mod.register_torch_op()
    s = [t[f"mlp.experts.{what}.stacked"] for what in STACKS]
    routed = op(logits, y.half(), *s, t["mlp.gate.e_score_correction_bias"].float(), m.num_experts, m.top_k, h,
                m.intermediate_size, op_mod.ACTIVATION_RELU2, m.n_group, m.topk_group, int(bool(m.norm_topk_prob)),
                float(m.routed_scaling_factor), op_mod.ROUTING_SIGMOID_GROUP_TOPK).float()
    rs = torch.relu(linear.eager(y, t, "mlp.shared_experts.up_proj", layer_quant))
    shared = linear.eager(r16(rs * rs), t, "mlp.shared_experts.down_proj", layer_quant)
    return r16(routed + shared)
