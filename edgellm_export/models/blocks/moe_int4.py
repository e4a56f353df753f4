"""Qwen3-MoE's sparse MLP with INT4 experts, through `trt_edgellm::Int4MoePlugin` (families.md §2.1-§2.2,
quant.md §3.12), both faces.

Graph: the router as moe.py has it (fp16 `MatMul` over the hidden states flattened to `[B*S, H]`, then a
`Cast` to fp32) and one plugin node taking the four expert stacks. The plugin always renormalises the k
routing weights; for a checkpoint with `norm_topk_prob: false` the plugin's output is multiplied by the
sum of the k softmax probabilities (computed from the same fp32 logits, in fp32, rounded once to fp16),
which turns the renormalised mix back into HF's unnormalised one (moe_plugin_routing.py).

Weights, per expert, from any INT4 layout the dense path reads (quant/int4_pack.py): GPTQ (v1 or v2),
AutoAWQ GEMM and ModelOpt W4A16, all to biased nibbles U (value U - 8) in `[N, K]`, gate rows then up rows
for FC1, Marlin-packed (edgellm_core/ops/int4_moe.py) into `[E, ...]` initializers written one expert at a
time, so the export holds one stacked tensor at once. Scales go to fp16 `[E, K/G, N]` in Marlin's column
order.

What the plugin cannot express is refused, naming the tensor, rather than approximated:
- zero points: the plugin computes (U - 8) * scale, with no zero-point input. Where every q - zero of an
  expert lies in [-8, 7] (always for symmetric files) the zero is folded exactly, U = q - zero + 8;
  otherwise the export refuses (NVIDIA's exporter clamps, silently changing those weights);
- a GPTQ `g_idx` other than the plain `k // group` order (act order / desc_act): the experts share one
  hidden state, and the plugin has no per-expert activation permutation;
- a `pre_quant_scale` (AWQ smoothing) on an expert: the plugin has no per-expert activation scale;
- sizes its kernels do not run (int4_moe.check_shape), and a quantized router.
"""

from __future__ import annotations

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT16, INT8
from edgellm_core.ops import int4_moe

from ...config import ModelConfig
from ...quant import int4_linear, int4_pack  # int4_linear only at call time: it imports models (a cycle)
from ...quant.plan import FP16, INT4_AWQ_GEMM, INT4_AWQ_MODELOPT, INT4_FORMATS, INT4_GPTQ
from . import linear
from . import moe_plugin_routing as routing

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The expert stacks, in the order the graph declares them (each scale before its weights).
STACKS = ("gate_up_scales", "gate_up_qweights", "down_scales", "down_qweights")


def stack_name(layer: int, what: str) -> str:
    return f"layers.{layer}.mlp.experts.{what}.stacked"


def expert_format(linears: dict, names: list[str], where=None) -> str:
    """The one format every expert linear in `names` has (FP16 when unlisted); mixed formats are refused,
    naming the first linear that differs from the others."""
    formats = {name: (linears[name].format if name in linears else FP16) for name in names}
    counts: dict[str, int] = {}
    for f in formats.values():
        counts[f] = counts.get(f, 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), FP16)
    common = max(counts, key=lambda f: (counts[f], f == FP16))
    odd = next(name for name, f in formats.items() if f != common)
    example = next(name for name, f in formats.items() if f == common)
    raise UnsupportedError(
        f"{odd}: quantized MoE experts must all have one format, as the runtime's MoE plugin takes one packed "
        f"stack per layer; this linear is {formats[odd]} while {counts[common]} others, e.g. {example}, are "
        f"{common}", where)


def is_int4(layer_quant: dict) -> bool:
    """Whether a layer's (prefix-stripped) decisions put its experts on the INT4 plugin."""
    return any(k.startswith("mlp.experts.") and v.format in INT4_FORMATS for k, v in layer_quant.items())


def _read(ref) -> np.ndarray:
    return int4_linear._np(ref)


_SCALES = ("F16", "BF16", "F32")  # as quant/int4_linear.py's SCALE_DTYPES


def _fail(ref, message: str) -> ExportError:
    return UnsupportedError(f"tensor {ref.key!r}: {message}", ref.file.path)


class _Expert:
    """One expert linear's tensors, checked from headers (and, where the graph depends on it, values) at
    planning; `nibbles()` / `scales()` read and convert them at write time."""

    def __init__(self, ws, name: str, lq, n: int, k: int):
        self.name, self.fmt, self.n, self.k, self.group = name, lq.format, n, k, lq.group_size
        self.offset = lq.zero_offset
        g = self.group
        if lq.smoothing:
            ref = ws.quant_ref(f"{name}.pre_quant_scale", _SCALES, (k,), "AWQ pre_quant_scale")
            raise _fail(ref, "Int4MoePlugin has no per-expert activation scale, so this AWQ smoothing "
                             "scale cannot be applied (it would have to be folded into the norm before export)")
        if self.fmt == INT4_GPTQ:
            self.q = ws.quant_ref(f"{name}.qweight", ("I32",), (k // 8, n), "GPTQ qweight")
            self.z = ws.quant_ref(f"{name}.qzeros", ("I32",), (k // g, n // 8), "GPTQ qzeros")
            self.s = ws.quant_ref(f"{name}.scales", _SCALES, (k // g, n), "GPTQ scales")
            if lq.act_order:
                gi = ws.quant_ref(f"{name}.g_idx", ("I32", "I64"), (k,), "GPTQ g_idx")
                if not np.array_equal(_read(gi), np.arange(k) // g):
                    raise _fail(gi, "an activation order (desc_act) other than k // group_size: the experts share "
                                    "one hidden state and Int4MoePlugin has no per-expert activation permutation "
                                    "(NVIDIA's exporter ignores g_idx, computing other weights)")
        elif self.fmt == INT4_AWQ_GEMM:
            self.q = ws.quant_ref(f"{name}.qweight", ("I32",), (k, n // 8), "AutoAWQ qweight")
            self.z = ws.quant_ref(f"{name}.qzeros", ("I32",), (k // g, n // 8), "AutoAWQ qzeros")
            self.s = ws.quant_ref(f"{name}.scales", _SCALES, (k // g, n), "AutoAWQ scales")
            self.offset = 0
        elif self.fmt == INT4_AWQ_MODELOPT:
            self.q = ws.quant_ref(f"{name}.weight", ("U8", "I8"), (n // 2, k), "W4A16_AWQ packed weight")
            self.s = ws.quant_ref(f"{name}.weight_scale", _SCALES, (n, k // g), "W4A16_AWQ weight scale")
            self.z = None
            if ws.ckpt.has(f"{name}.input_scale"):  # weight-only: unused, as in the dense path
                ws.quant_ref(f"{name}.input_scale", _SCALES, (), "unused activation scale")
        else:
            raise UnsupportedError(f"internal: {self.fmt} is not an INT4 format")
        self._check_zeros()

    def _fold(self):
        """(U [N, K] uint8, d): d is nonzero where a q - zero leaves [-8, 7]."""
        try:
            if self.fmt == INT4_GPTQ:
                u, _, d = int4_pack.repack_gptq(_read(self.q), _read(self.z), None, self.group,
                                                zero_offset=self.offset, name=self.name)
            elif self.fmt == INT4_AWQ_GEMM:
                u, d = int4_pack.repack_autoawq(_read(self.q), _read(self.z), self.group, name=self.name)
            else:
                return int4_pack.repack_modelopt_w4a16(_read(self.q), name=self.name), None
        except ValueError as e:
            raise ExportError(f"tensor {self.q.key!r} cannot be repacked for Int4MoePlugin: {e}",
                              self.q.file.path) from None
        return u, d

    def _check_zeros(self) -> None:
        if self.z is None or int4_pack.zeros_are_eight(_read(self.z), self.offset):
            return
        _, d = self._fold()
        if d.any():
            raise _fail(self.q, f"{int(np.count_nonzero(d))} of its {d.size} (group, output channel) zero points "
                                "leave some q - zero outside [-8, 7]. Int4MoePlugin has no zero-point input (it "
                                "computes (q - 8) x scale), so these weights cannot be folded into it exactly; "
                                "NVIDIA's exporter clamps them, silently changing the weights. Quantize the "
                                "experts symmetrically, or with zero points that keep q - zero in [-8, 7]")

    def nibbles(self) -> np.ndarray:
        u, d = self._fold()
        if d is not None and d.any():
            raise ExportError(f"tensor {self.z.key!r} changed between planning the graph and writing it",
                              self.z.file.path)
        return u

    def scales(self) -> np.ndarray:
        """fp16 `[K/G, N]` in checkpoint column order."""
        return int4_linear._scales(self.s, transpose=self.fmt == INT4_AWQ_MODELOPT).numpy()

    def where(self) -> str:
        return self.q.where()


def emit(e, layer: int, y: str, fmt: str) -> str:
    """The graph face: router MatMul + Cast, the plugin node, and (norm_topk_prob false) the rescale."""
    import torch

    g, c, ws, m = e.g, e.cfg, e.w, e.cfg.moe
    h, inter, experts = c.hidden_size, m.intermediate_size, m.num_experts
    where = ws.ckpt.path
    routing.refuse_quantized_router(e, layer)
    lqs = {p: [e.quant.linears[f"layers.{layer}.mlp.experts.{x}.{p}"] for x in range(experts)] for p in PROJECTIONS}
    groups = {lq.group_size for per in lqs.values() for lq in per}
    if len(groups) != 1:
        raise UnsupportedError(f"layer {layer}'s experts use group sizes {sorted(groups)}; Int4MoePlugin takes one",
                               where)
    group = groups.pop()
    why = int4_moe.check_shape(h, inter, group)
    if why:
        raise UnsupportedError(f"layer {layer}'s INT4 MoE experts: {why}; Int4MoePlugin needs hidden_size % 128 == 0, "
                               f"moe_intermediate_size % 64 == 0 and a group size of "
                               f"{', '.join(map(str, int4_moe.GROUP_SIZES))} dividing both", where)
    dims = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    parts = {p: [_Expert(ws, f"layers.{layer}.mlp.experts.{x}.{p}", lqs[p][x], *dims[p]) for x in range(experts)]
             for p in PROJECTIONS}

    logits = routing.router_logits(e, layer, y)  # as the plugin reads them: [B*S, E] fp32
    shapes = int4_moe.stack_shapes(experts, h, inter, group)
    fc1 = list(zip(parts["gate_proj"], parts["up_proj"]))
    fc2 = [(d,) for d in parts["down_proj"]]

    def stacked_scales(pairs, shape):
        def produce():
            out = np.empty(shape, np.float16)
            for x, lins in enumerate(pairs):  # FC1: gate columns, then up
                out[x] = int4_moe.permute_scales(np.concatenate([lin.scales() for lin in lins], axis=1))
            return torch.from_numpy(out)
        return produce

    def stacked_weights(pairs, shape):
        def produce():
            out = np.empty(shape, np.int8)
            for x, lins in enumerate(pairs):  # FC1: gate rows, then up
                out[x] = int4_moe.pack_marlin(np.concatenate([lin.nibbles() for lin in lins], axis=0))
            return torch.from_numpy(out)
        return produce

    def declare(what, dtype, shape, produce, pairs):
        return g.weight(stack_name(layer, what), dtype, shape, produce,
                        tag=f"{pairs[0][0].where()} .. {pairs[-1][-1].where()}")

    gu_s = declare("gate_up_scales", FLOAT16, shapes["fc_gate_up_scales"],
                   stacked_scales(fc1, shapes["fc_gate_up_scales"]), fc1)
    gu_q = declare("gate_up_qweights", INT8, shapes["fc_gate_up_qweights"],
                   stacked_weights(fc1, shapes["fc_gate_up_qweights"]), fc1)
    dn_s = declare("down_scales", FLOAT16, shapes["fc_down_scales"], stacked_scales(fc2, shapes["fc_down_scales"]), fc2)
    dn_q = declare("down_qweights", INT8, shapes["fc_down_qweights"],
                   stacked_weights(fc2, shapes["fc_down_qweights"]), fc2)
    out = int4_moe.emit(g, logits, y, gu_q, gu_s, dn_q, dn_s, num_experts=experts, top_k=m.top_k, hidden_size=h,
                        moe_inter_size=inter, group_size=group)
    if m.norm_topk_prob:
        return out
    return routing.undo_renormalisation(g, out, logits, y, h, m.top_k)


def eager(y, t: dict, cfg: ModelConfig, layer_quant: dict):
    """Eager face over the block's initializers (names without the `layers.{i}.` prefix)."""
    stream = Stream(y, t, cfg, layer_quant)
    for what in STACKS:
        stream.take(what, t[f"mlp.experts.{what}.stacked"])
    return stream.result(t, layer_quant)


class Stream:
    """The eager face taking the expert stacks one at a time, in STACKS order (a stack can be dropped once
    taken): the plugin's numerics (int4_moe's torch helpers) per expert on its routed tokens, summed in
    expert order as the CPU lowering does, then the norm_topk_prob rescale."""

    def __init__(self, y, t: dict, cfg: ModelConfig, layer_quant: dict):
        import torch

        m, h = cfg.moe, cfg.hidden_size
        self.shape, self.h, self.inter, self.experts = y.shape, h, m.intermediate_size, m.num_experts
        self.group = next(v.group_size for k, v in layer_quant.items() if k.startswith("mlp.experts."))
        logits = linear.eager(y, t, "mlp.gate", layer_quant).float().reshape(-1, m.num_experts)
        weights, routed = int4_moe.route_torch(logits, m.top_k)
        self.total = None
        if not m.norm_topk_prob:
            self.total = routing.topk_probability_sum(logits, m.top_k)
        self.x = y.reshape(-1, h).float()
        self.rows = [routed[:, x].nonzero().flatten() for x in range(m.num_experts)]
        self.weights = weights
        self.scales, self.acts = {}, None
        self.acc = torch.zeros_like(self.x)

    def take(self, what: str, stack) -> None:
        if what.endswith("_scales"):
            self.scales[what] = stack
            return
        h, inter, group = self.h, self.inter, self.group
        if what == "gate_up_qweights":
            s = self.scales.pop("gate_up_scales")
            self.acts = [int4_moe.expert_act_torch(self.x[rows], stack[x], s[x], h, inter, group)
                         if rows.numel() else None for x, rows in enumerate(self.rows)]
        elif what == "down_qweights":
            s = self.scales.pop("down_scales")
            for x, (rows, act) in enumerate(zip(self.rows, self.acts)):
                if act is not None:
                    self.acc.index_add_(0, rows, int4_moe.expert_out_torch(act, self.weights[rows, x], stack[x],
                                                                           s[x], h, inter, group))
            self.acts = None
        else:
            raise KeyError(f"internal: unknown INT4 MoE stack {what!r}")

    def result(self, t: dict, layer_quant: dict):
        out = linear.r16(self.acc)
        if self.total is not None:
            out = linear.r16(out * self.total)
        return out.reshape(self.shape)
