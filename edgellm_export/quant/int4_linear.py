"""INT4 weight-only linears on Int4GroupwiseGemmPlugin (quant.md §3.5-3.8): ModelOpt
`W4A16_AWQ`, AutoAWQ GEMM and GPTQ (with `desc_act` / `g_idx`).

All three are repacked, in numpy and one tensor at a time, to the plugin's biased-nibble
layout (int8 `[N/2, K]`) with fp16 scales `[K/g, N]`. ModelOpt's AWQ smoothing becomes a
Mul by pre_quant_scale where the checkpoint has one (it is usually folded into the norms,
so its absence is not an error); GPTQ's activation permutation becomes a Gather.

Asymmetric zero points (AutoAWQ, GPTQ `sym: false`) the plugin cannot take are split exactly,
per group g of G input channels (int4_pack.split_zero_points): q - z = (U - 8) + d, so

    x @ W = Int4GroupwiseGemm(x, U, s) + GroupMean_G(x) @ (G * d * s)

GroupMean is Cast(fp32) -> Reshape [.., K/G, G] -> ReduceMean -> Cast(fp16): fp32 accumulation
whatever TensorRT picks, and a mean never leaves fp16's range (a sum of 128 outliers can). The
correction is a dense fp16 GEMM of inner size K/G. Cost against the INT4 GEMM (G = 128): FLOPs
2MN(K/G) + MK, i.e. 1/128 of its 2MNK; weight bytes 2NK/G = NK/64, 1/32 of its NK/2 qweight
(the same as its scales; 3% of what it reads per token); the group means are shared by the
siblings reading one input (q/k/v, gate/up). Only layers with a nonzero d get it: where every
q - z fits [-8, 7] the graph and bytes are the plain fold's. ModelOpt W4A16 is symmetric (its
producer writes signed nibbles and `has_zero_point: false`), so it never needs one.
"""

from __future__ import annotations

import weakref

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import FLOAT, FLOAT16, INT8, INT64
from edgellm_core.ops import int4_gemm

from ..models.weights import to_fp16
from . import int4_pack
from .plan import INT4_AWQ_GEMM, INT4_AWQ_MODELOPT, INT4_GPTQ

SCALE_DTYPES = ("F16", "BF16", "F32")


def _np(ref):
    a = ref.view().numpy().copy()
    ref.release()
    return a


def _repack_error(ref, e: ValueError) -> ExportError:
    return ExportError(f"tensor {ref.key!r} cannot be repacked for Int4GroupwiseGemmPlugin: {e}", ref.file.path)


def _scales(ref, transpose: bool):
    """fp16 scales `[K/g, N]`; finite, non-negative and within fp16's range."""
    import torch

    s = ref.view().float()
    s = s.t().contiguous() if transpose else s.clone()
    ref.release()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or float(s.max()) > 65504.0:
        raise ExportError(f"INT4 scales {ref.key!r} hold negative, non-finite or beyond-fp16 values", ref.file.path)
    return s.half()


def _packed(u_fn, ref):
    import torch

    def produce():
        try:
            return torch.from_numpy(int4_pack.pack_plugin(u_fn()))
        except ValueError as e:
            raise _repack_error(ref, e) from None
    return produce


class _Split:
    """One layer's zero-point split. Planning decides from it whether the graph needs a correction;
    writing computes it once for the qweight and hands its d to the correction, written next."""

    def __init__(self, compute, where: str):
        self.compute, self.where = compute, where
        self.needed: bool | None = None
        self._d = None

    def plan(self, z_ref, zero_offset: int) -> None:
        """Read the zeros (and, unless all are 8, the weights) now: the answer decides the graph."""
        try:
            if int4_pack.zeros_are_eight(_np(z_ref), zero_offset):
                self.needed = False  # every q - z fits without looking at q
            else:
                self.needed = bool(self.compute()[-1].any())
        except ValueError as e:
            raise _repack_error(z_ref, e) from None

    def u(self):
        *parts, d = self.compute()
        if bool(d.any()) != self.needed:
            raise ExportError(f"{self.where} changed between planning the graph and writing it")
        self._d = d
        return parts[0]

    def d(self):
        d, self._d = self._d, None
        return d if d is not None else self.compute()[-1]


def _correction(split: _Split, s_ref, group: int, name: str):
    import torch

    s = _scales(s_ref, transpose=False).numpy()
    try:
        return torch.from_numpy(int4_pack.zero_correction(split.d(), s, group, name=name))
    except ValueError as e:
        raise _repack_error(s_ref, e) from None


_GROUP_MEANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _group_mean(g, x: str, k: int, group: int) -> str:
    """fp16 [.., K/G] means of x over each group, emitted once per input and group size."""
    cache = _GROUP_MEANS.setdefault(g, {})
    if (x, group) not in cache:
        x32 = g.node("Reshape", [g.node("Cast", [x], {"to": FLOAT}), g.i64(0, 0, k // group, group)])
        mean = g.node("ReduceMean", [x32, g.i64(-1)], {"keepdims": 0})
        cache[(x, group)] = g.node("Cast", [mean], {"to": FLOAT16})
    return cache[(x, group)]


def emit(ctx, x: str) -> str:
    g, ws, p, n, k, lq = ctx.g, ctx.ws, ctx.name, ctx.n, ctx.k, ctx.lq
    group = lq.group_size
    why = int4_gemm.check_shape(n, k, group)
    if why:
        raise UnsupportedError(f"layer {p}: {why}", ws.ckpt.path)
    qweight, scales = f"{p}.qweight", f"{p}.scales"
    split = None  # only AutoAWQ and GPTQ carry zero points
    if lq.format == INT4_AWQ_MODELOPT:
        w_ref = ws.quant_ref(f"{p}.weight", ("U8", "I8"), (n // 2, k), "W4A16_AWQ packed weight")
        s_ref = ws.quant_ref(f"{p}.weight_scale", SCALE_DTYPES, (n, k // group), "W4A16_AWQ weight scale")
        u_fn = lambda: int4_pack.repack_modelopt_w4a16(_np(w_ref), name=p)  # noqa: E731
        g.weight(qweight, INT8, (n // 2, k), _packed(u_fn, w_ref), tag=w_ref.where())
        g.weight(scales, FLOAT16, (k // group, n), lambda: _scales(s_ref, transpose=True), tag=s_ref.where())
        if ws.ckpt.has(f"{p}.input_scale"):  # older ModelOpt writes one; weight-only INT4 has no use for it
            ws.quant_ref(f"{p}.input_scale", SCALE_DTYPES, (), "unused activation scale of a weight-only layer")
        if lq.smoothing:
            pqs_ref = ws.quant_ref(f"{p}.pre_quant_scale", SCALE_DTYPES, (k,), "AWQ pre_quant_scale")
            pqs = g.weight(f"{p}.pre_quant_scale", FLOAT16, (k,), lambda: to_fp16(pqs_ref), tag=pqs_ref.where())
            x = g.node("Mul", [x, pqs])
    elif lq.format == INT4_AWQ_GEMM:
        q_ref = ws.quant_ref(f"{p}.qweight", ("I32",), (k, n // 8), "AutoAWQ qweight")
        z_ref = ws.quant_ref(f"{p}.qzeros", ("I32",), (k // group, n // 8), "AutoAWQ qzeros")
        s_ref = ws.quant_ref(f"{p}.scales", SCALE_DTYPES, (k // group, n), "AutoAWQ scales")
        split = _Split(lambda: int4_pack.repack_autoawq(_np(q_ref), _np(z_ref), group, name=p), q_ref.where())
        split.plan(z_ref, 0)
        g.weight(qweight, INT8, (n // 2, k), _packed(split.u, q_ref), tag=q_ref.where())
        g.weight(scales, FLOAT16, (k // group, n), lambda: _scales(s_ref, transpose=False), tag=s_ref.where())
    elif lq.format == INT4_GPTQ:
        q_ref = ws.quant_ref(f"{p}.qweight", ("I32",), (k // 8, n), "GPTQ qweight")
        z_ref = ws.quant_ref(f"{p}.qzeros", ("I32",), (k // group, n // 8), "GPTQ qzeros")
        s_ref = ws.quant_ref(f"{p}.scales", SCALE_DTYPES, (k // group, n), "GPTQ scales")
        g_idx = None
        if lq.act_order:
            gi_ref = ws.quant_ref(f"{p}.g_idx", ("I32", "I64"), (k,), "GPTQ g_idx")
            g_idx = _np(gi_ref)
        try:  # the permutation is tiny and decides the graph, so it is computed now
            perm = int4_pack.gptq_perm(g_idx, group, name=p) if g_idx is not None else np.arange(k)
        except ValueError as e:
            raise _repack_error(gi_ref, e) from None
        offset = lq.zero_offset
        split = _Split(lambda: int4_pack.repack_gptq(_np(q_ref), _np(z_ref), g_idx, group, zero_offset=offset,
                                                     name=p), q_ref.where())
        split.plan(z_ref, offset)
        g.weight(qweight, INT8, (n // 2, k), _packed(split.u, q_ref), tag=q_ref.where())
        g.weight(scales, FLOAT16, (k // group, n), lambda: _scales(s_ref, transpose=False), tag=s_ref.where())
        if not np.array_equal(perm, np.arange(k)):
            import torch

            perm_t = torch.from_numpy(perm.astype(np.int64))
            idx = g.weight(f"{p}.act_perm", INT64, (k,), lambda: perm_t.clone(), tag=gi_ref.where())
            x = g.node("Gather", [x, idx], {"axis": -1})
    else:
        raise UnsupportedError(f"internal: {lq.format} is not an INT4 format")
    y = int4_gemm.emit(g, x, qweight, scales, n=n, k=k, group_size=group)
    if split is not None and split.needed:
        corr = g.weight(f"{p}.zero_correction", FLOAT16, (k // group, n),
                        lambda: _correction(split, s_ref, group, p), tag=z_ref.where())
        y = g.node("Add", [y, g.node("MatMul", [_group_mean(g, x, k, group), corr])])
    return y


def eager(x, t: dict, p: str, lq):
    x = x.float()
    if f"{p}.pre_quant_scale" in t:
        x = x * t[f"{p}.pre_quant_scale"].float()
    if f"{p}.act_perm" in t:
        x = x[..., t[f"{p}.act_perm"]]
    qweight, scales = t[f"{p}.qweight"], t[f"{p}.scales"]
    n, k, group = scales.shape[1], qweight.shape[1], lq.group_size
    op = int4_gemm.register_torch_op()
    y = op(x, qweight, scales, n, k, group)
    corr = t.get(f"{p}.zero_correction")
    if corr is None:
        return y
    # As the graph: plugin output, group means and correction GEMM each stored in fp16.
    mean = x.reshape(*x.shape[:-1], k // group, group).mean(-1).half().float()
    return y.half().float() + (mean @ corr.float()).half().float()
