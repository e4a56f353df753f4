"""Which quantization format each linear layer has, decided from metadata and tensors together.

The reference exporter maps algorithm strings by substring (so `W4A8_NVFP4_FP8` becomes FP8) and
exports anything it does not recognise as FP16. Here only exact, known algorithm names map to a
format; everything else is refused by name. The format each linear's tensors actually show is
detected independently (contract quant.md §7) and must agree with the metadata.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgellm_core.errors import ExportError, UnsupportedError

FP16, FP8, MXFP8, NVFP4 = "fp16", "fp8", "mxfp8", "nvfp4"
INT4_AWQ_MODELOPT, INT4_AWQ_GEMM, INT4_GPTQ, INT8_SQ = "int4_awq_modelopt", "int4_awq_gemm", "int4_gptq", "int8_sq"
# ModelOpt quant_algo -> format. Exact names only.
MODELOPT_ALGOS = {"FP8": FP8, "MXFP8": MXFP8, "NVFP4": NVFP4, "W4A16_AWQ": INT4_AWQ_MODELOPT,
                  "W8A8_SQ_PER_CHANNEL": INT8_SQ}
FIXED_GROUP = {MXFP8: 32, NVFP4: 16}
INT4_FORMATS = (INT4_AWQ_MODELOPT, INT4_AWQ_GEMM, INT4_GPTQ)
INT4_GROUP = 128  # the 0.7 Int4GroupwiseGemm kernels hard-code it
KV_ALGOS = {"FP8": FP8}


@dataclass(frozen=True)
class LinearQuant:
    format: str = FP16
    group_size: int | None = None
    algo: str = ""  # the metadata's own spelling, for messages
    zero_offset: int = 1  # GPTQ: v1 files store zero - 1 (add 1 back); gptq_v2 files store the zero itself
    # From the tensors present (resolve): an activation smoothing scale to multiply in, and a GPTQ
    # activation order (g_idx) to gather by.
    smoothing: bool = False
    act_order: bool = False


@dataclass
class QuantDecisions:
    """What the export does per linear (canonical names) and for the KV cache."""

    linears: dict[str, LinearQuant] = field(default_factory=dict)
    kv_scales: list[tuple[float, float]] | None = None  # per layer (k, v) when the KV cache is FP8

    def formats(self) -> list[str]:
        return sorted({lq.format for lq in self.linears.values()} - {FP16})


@dataclass
class QuantPlan:
    source: Path  # the metadata file the plan came from
    default: LinearQuant
    kv_cache: str | None = None
    excluded: list[str] = field(default_factory=list)  # normalised names, wildcards allowed
    overrides: dict[str, LinearQuant] = field(default_factory=dict)  # mixed precision
    mixed: bool = False

    def for_linear(self, name: str) -> LinearQuant:
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.excluded):
            return LinearQuant()
        if self.mixed:
            return self.overrides.get(name, LinearQuant())
        return self.default


def normalise_module(name: str) -> str:
    """HF module path -> our canonical linear name (`layers.0.mlp.up_proj`, `lm_head`)."""
    for prefix in ("model.language_model.", "language_model.model.", "language_model.", "text_model.", "llm.",
                   "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _refuse(algo, where: Path, why: str = "") -> UnsupportedError:
    return UnsupportedError(f"quantization algorithm {algo!r} is not supported{': ' + why if why else ''}; "
                            "refusing rather than exporting its tensors as something else", where)


def _modelopt_linear(entry: dict, where: Path) -> LinearQuant:
    algo = entry.get("quant_algo")
    if algo is None:
        return LinearQuant()
    fmt = MODELOPT_ALGOS.get(str(algo))
    if fmt is None:
        raise _refuse(algo, where)
    group = entry.get("group_size")
    if fmt in FIXED_GROUP:
        if group not in (None, FIXED_GROUP[fmt]):
            raise _refuse(algo, where, f"group_size {group} (the format defines {FIXED_GROUP[fmt]})")
        group = FIXED_GROUP[fmt]
    if fmt in INT4_FORMATS:
        group = _int4_group(group if group is not None else 128, algo, where)
        if entry.get("has_zero_point"):  # ModelOpt's W4A16 is symmetric; no zero tensor is defined
            raise _refuse(algo, where, "has_zero_point: true (ModelOpt writes signed INT4 without zero points)")
    return LinearQuant(fmt, group, str(algo))


def _int4_group(group, algo, where: Path) -> int:
    if group != INT4_GROUP:
        raise _refuse(algo, where, f"group_size {group}: Edge-LLM 0.7's INT4 kernels only run group size "
                                   f"{INT4_GROUP}")
    return group


def _kv(algo, where: Path) -> str | None:
    if algo in (None, ""):
        return None
    if str(algo) not in KV_ALGOS:
        raise UnsupportedError(f"KV cache quantization {algo!r} is not supported (only FP8)", where)
    return KV_ALGOS[str(algo)]


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"is not valid JSON ({e})", path) from None


def parse_quant_plan(checkpoint_dir: Path, raw_config: dict) -> QuantPlan | None:
    """The checkpoint's quantization plan, or None for an unquantized checkpoint."""
    hq_path = checkpoint_dir / "hf_quant_config.json"
    if hq_path.exists():  # ModelOpt's own file wins over config.json, as in the runtime's loader
        meta = _load_json(hq_path)
        q = meta.get("quantization") if isinstance(meta, dict) else None
        if not isinstance(q, dict):
            raise ExportError("has no 'quantization' object", hq_path)
        kv = _kv(q.get("kv_cache_quant_algo"), hq_path)
        excluded = [normalise_module(str(p)) for p in q.get("exclude_modules") or []]
        if q.get("quant_algo") == "MIXED_PRECISION":
            layers = q.get("quantized_layers")
            if not isinstance(layers, dict) or not layers:
                raise ExportError("MIXED_PRECISION without a 'quantized_layers' object", hq_path)
            overrides = {normalise_module(k): _modelopt_linear(v if isinstance(v, dict) else {}, hq_path)
                         for k, v in layers.items()}
            return QuantPlan(hq_path, LinearQuant(), kv, excluded, overrides, mixed=True)
        plan = QuantPlan(hq_path, _modelopt_linear(q, hq_path), kv, excluded)
        return plan if plan.default.format != FP16 or kv else None
    text = raw_config.get("text_config") if isinstance(raw_config.get("text_config"), dict) else {}
    qc = raw_config.get("quantization_config") or text.get("quantization_config")
    if not qc:
        return None
    where = checkpoint_dir / "config.json"
    if not isinstance(qc, dict):
        raise ExportError("quantization_config must be an object", where)
    method = qc.get("quant_method")
    excluded = [normalise_module(str(p)) for p in qc.get("ignore") or qc.get("modules_to_not_convert") or []]
    if "quant_algo" in qc:  # ModelOpt metadata embedded in config.json
        if qc["quant_algo"] == "MIXED_PRECISION":
            raise _refuse("MIXED_PRECISION", where, "per-layer formats are only in hf_quant_config.json")
        kv = FP8 if qc.get("kv_cache_scheme") else None
        if isinstance(qc.get("kv_cache_scheme"), dict) and qc["kv_cache_scheme"].get("type") != "float":
            raise UnsupportedError(f"KV cache scheme {qc['kv_cache_scheme']!r} is not supported (only FP8)", where)
        return QuantPlan(where, _modelopt_linear(qc, where), kv, excluded)
    if method in ("awq", "gptq"):
        if qc.get("bits", 4) != 4:
            raise _refuse(f"{method} {qc.get('bits')}-bit", where, "only 4-bit weights are supported")
        if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
            raise _refuse(f"awq {qc.get('version')}", where, "only AutoAWQ's GEMM layout is supported")
        group = _int4_group(qc.get("group_size", 128), method, where)
        fmt = INT4_AWQ_GEMM if method == "awq" else INT4_GPTQ
        offset = 0 if str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1
        if not qc.get("lm_head"):  # AutoAWQ and GPTQ leave lm_head alone unless told (GPTQModel's lm_head)
            excluded.append("lm_head")
        return QuantPlan(where, LinearQuant(fmt, group, method, offset), None, excluded)
    raise _refuse(method or "unnamed", where)


def _names(ckpt, prefix: str) -> dict[str, object]:
    return {n[len(prefix):]: ckpt.ref(n) for n in ckpt.names() if n.startswith(prefix)}


def detect_format(ckpt, linear: str) -> str:
    """The format this linear's tensors show (quant.md §7), whatever the metadata says."""
    t = _names(ckpt, linear + ".")
    if "qweight" in t:
        shape = t["qweight"].shape
        scales = t.get("scales")
        # AutoAWQ packs 8 output channels per int32 ([K, N/8]); GPTQ 8 input rows ([K/8, N]).
        if scales is not None and len(shape) == 2 and shape[1] * 8 == scales.shape[1]:
            return INT4_AWQ_GEMM
        return INT4_GPTQ
    w = t.get("weight")
    if w is None:
        return "missing"
    if w.dtype in ("F16", "BF16", "F32") and "weight_scale" not in t:
        return FP16
    if w.dtype == "F8_E4M3":
        scale = t.get("weight_scale")
        if scale is not None and scale.dtype == "U8":
            return MXFP8
        return FP8
    if w.dtype == "I8" and "input_scale" in t:
        return INT8_SQ
    if w.dtype in ("U8", "I8") and "weight_scale_2" in t:
        return NVFP4
    if w.dtype in ("U8", "I8") and "weight_scale" in t:
        return INT4_AWQ_MODELOPT
    return f"unrecognised ({w.dtype} weight with {', '.join(sorted(t)) or 'nothing else'})"


def resolve(plan: QuantPlan, ckpt, linears: list[str]) -> dict[str, LinearQuant]:
    """Per-linear decisions; a layer whose tensors contradict the metadata is an error naming it."""
    out = {}
    for name in linears:
        want = plan.for_linear(name)
        found = detect_format(ckpt, name)
        if found != want.format:
            said = f"{want.algo or 'no quantization'} ({want.format})"
            raise ExportError(f"the metadata gives layer {name} {said}, but its tensors are {found}; "
                              "the checkpoint contradicts itself", plan.source)
        out[name] = replace(want, smoothing=ckpt.has(f"{name}.pre_quant_scale"),
                            act_order=found == INT4_GPTQ and ckpt.has(f"{name}.g_idx"))
    return out
