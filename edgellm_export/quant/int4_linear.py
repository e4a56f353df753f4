"""INT4 weight-only linears on Int4GroupwiseGemmPlugin (quant.md §3.5-3.8): ModelOpt
`W4A16_AWQ`, AutoAWQ GEMM and GPTQ (with `desc_act` / `g_idx`).

All three are repacked, in numpy and one tensor at a time, to the plugin's biased-nibble
layout (int8 `[N/2, K]`) with fp16 scales `[K/g, N]`. ModelOpt's AWQ smoothing becomes a
Mul by pre_quant_scale where the checkpoint has one (it is usually folded into the norms,
so its absence is not an error); GPTQ's activation permutation becomes a Gather.
"""

from __future__ import annotations

import numpy as np

from ..errors import ExportError, UnsupportedError
from ..models.weights import to_fp16
from ..onnx_graph.builder import FLOAT16, INT8, INT64
from ..ops import int4_gemm
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


def emit(ctx, x: str) -> str:
    g, ws, p, n, k, lq = ctx.g, ctx.ws, ctx.name, ctx.n, ctx.k, ctx.lq
    group = lq.group_size
    why = int4_gemm.check_shape(n, k, group)
    if why:
        raise UnsupportedError(f"layer {p}: {why}", ws.ckpt.path)
    qweight, scales = f"{p}.qweight", f"{p}.scales"
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
        u_fn = lambda: int4_pack.repack_autoawq(_np(q_ref), _np(z_ref), group, name=p)  # noqa: E731
        g.weight(qweight, INT8, (n // 2, k), _packed(u_fn, q_ref), tag=q_ref.where())
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

        def u_gptq():
            return int4_pack.repack_gptq(_np(q_ref), _np(z_ref), g_idx, group, zero_offset=offset, name=p)[0]
        g.weight(qweight, INT8, (n // 2, k), _packed(u_gptq, q_ref), tag=q_ref.where())
        g.weight(scales, FLOAT16, (k // group, n), lambda: _scales(s_ref, transpose=False), tag=s_ref.where())
        if not np.array_equal(perm, np.arange(k)):
            import torch

            perm_t = torch.from_numpy(perm.astype(np.int64))
            idx = g.weight(f"{p}.act_perm", INT64, (k,), lambda: perm_t.clone(), tag=gi_ref.where())
            x = g.node("Gather", [x, idx], {"axis": -1})
    else:
        raise UnsupportedError(f"internal: {lq.format} is not an INT4 format")
    return int4_gemm.emit(g, x, qweight, scales, n=n, k=k, group_size=group)


def eager(x, t: dict, p: str, lq):
    x = x.float()
    if f"{p}.pre_quant_scale" in t:
        x = x * t[f"{p}.pre_quant_scale"].float()
    if f"{p}.act_perm" in t:
        x = x[..., t[f"{p}.act_perm"]]
    qweight, scales = t[f"{p}.qweight"], t[f"{p}.scales"]
    n, k = scales.shape[1], qweight.shape[1]
    op = int4_gemm.register_torch_op()
    return op(x, qweight, scales, n, k, lq.group_size)
