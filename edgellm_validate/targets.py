"""Validation targets (the platform matrix, edgellm_validate/data/platforms.json) and capability gating.

`check_target_can_run(target, export_dir)` reads only cheap parts of an export (the ONNX graph
without its weights, config.json, the embedding sidecar's header) and refuses, before any image
is pulled or engine built, an export the target cannot run: a precision the hardware lacks
(FP8/FP4 on Orin), a GPU the Edge-LLM decode-attention kernels are not built for (SM 90:
H100/H200), custom ops the CPU twin cannot lower, or an export for another Edge-LLM release.
A plugin-free export (`--attention native`, config.json `trt_native_ops`) has no AttentionPlugin: the
plugin's kernel limits (SMs, head sizes, head ratios) do not apply, but TensorRT must be 10.15 or later.
The matrix is package data (read through importlib.resources, so an installed wheel has it) and is checked
by the PlatformMatrix model (`edgellm schema platforms` prints its JSON Schema).
Stdlib + onnx + pydantic only; no torch, no TensorRT.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from edgellm_core.bindings import Bindings, bindings_for
from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.ops.attention_plugin import DOMAIN as PLUGIN_DOMAIN
from edgellm_core.ops.attention_plugin import kernel_problems  # the AttentionPlugin's head-size and ratio limits
from edgellm_core.schema import StrictModel, explain, no_default

from .export_dir import find_llm_dir

PLATFORMS_ENV = "EDGELLM_PLATFORMS"
# Package data: found the same way in a checkout, an editable install and a wheel.
DEFAULT_PLATFORMS = Path(str(resources.files("edgellm_validate") / "data" / "platforms.json"))

BACKENDS = ("cpu", "trt")
# Precision features an export can use (what `inspect_export` detects).
PRECISIONS = ("fp16", "fp8_embedding", "int8", "int4", "fp8", "fp8_kv", "nvfp4", "mxfp8")

# Edge-LLM 0.7.1 / 0.10.0 XQA decode kernels (DecoderXQARunner::canImplement, contract text.md §3.3).
# SM 90 (H100/H200) is not among them. Thor reports SM 110 under CUDA 13; the plugins renumber it to 101.
DECODE_ATTENTION_SMS = frozenset({80, 86, 87, 89, 100, 101, 120, 121})
SM_RENUMBER = {110: 101}
# Hardware number formats: FP8 from Ada (SM 89) on, FP4 / MX formats on Blackwell (SM 100+).
_FP8_SMS = frozenset({89, 90, 100, 101, 103, 110, 120, 121})
_FP4_SMS = frozenset({100, 101, 103, 110, 120, 121})
_ANY = ("fp16", "fp8_embedding", "int8", "int4")  # fp8_embedding: storage, dequantized in software
# The first TensorRT whose ONNX parser builds RotaryEmbedding, TensorScatter and Attention (0.7.1's
# attention_trt.py: "supported by TensorRT >= 10.15").
NATIVE_MIN_TENSORRT = (10, 15)

# SMs each MoE plugin's kernels run on (a GPU target outside them is refused; the CPU twin lowers both).
# NvFP4MoEPluginGeforce: CuteDslNvfp4MoeRunner::canImplement, SM 120/121 only (0.7.1 nvfp4MoePluginGeforce).
# Int4MoePlugin: Marlin MoE (marlin_moe_wna16/ops.cu refuses below SM 75; its kernels are the sm80
# instantiations, 4-stage cp.async pipelines), so SM 80 and newer: every SM Edge-LLM's attention runs on.
# Nvfp4MoePlugin (Nemotron-H): its prefill grouped GEMMs are CuTeDSL tcgen05 AOT kernels built for Blackwell
# datacenter and Thor (kernelSrcs/nvfp4_moe_cutedsl/README.md: SM 100/101/103, SM 110); not GeForce 120/121.
PLUGIN_SMS = {"NvFP4MoEPluginGeforce": frozenset({120, 121}), "Nvfp4MoePlugin": frozenset({100, 101, 103, 110})}
PLUGIN_MIN_SM = {"Int4MoePlugin": 80}
_PLUGIN_SM_NOTE = {"NvFP4MoEPluginGeforce": "; NVIDIA's 0.7.1 NVFP4 MoE is the GeForce Blackwell CuTeDSL build",
                   "Nvfp4MoePlugin": "; its prefill GEMMs are the Blackwell/Thor tcgen05 CuTeDSL build"}

_WHY = {
    "fp8": "FP8 tensor-core GEMMs (Q/DQ to FLOAT8E4M3FN) need SM 89 or newer",
    "fp8_kv": "an FP8 KV cache needs FP8 attention kernels, SM 89 or newer",
    "nvfp4": "NVFP4 needs Blackwell FP4 tensor cores (SM 100 or newer)",
    "mxfp8": "MXFP8 needs Blackwell block-scaled tensor cores (SM 100 or newer)",
}


class TargetError(ExportError):
    """Unknown target or a malformed platform matrix."""


class TargetRefusal(UnsupportedError):
    """The export cannot run on this target; says every reason at once."""


def precisions_for_sm(sm: int) -> frozenset[str]:
    """Precision features a GPU of this SM can run with Edge-LLM."""
    out = set(_ANY)
    if sm in _FP8_SMS:
        out |= {"fp8", "fp8_kv"}
    if sm in _FP4_SMS:
        out |= {"nvfp4", "mxfp8"}
    return frozenset(out)


def decode_attention_supported(sm: int) -> bool:
    return SM_RENUMBER.get(sm, sm) in DECODE_ATTENTION_SMS


# ---------------------------------------------------------------- the platform matrix


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str  # "cpu": onnxruntime twin only; "trt": TensorRT engine (with the Edge-LLM plugin unless not `plugin`)
    arch: str
    support: str
    base_image: str | None
    base_image_required: bool = False
    sm: int | None = None  # None: whatever GPU the machine has (decided at run time)
    sm_choices: tuple[int, ...] = ()
    tensorrt: str | None = None  # None: whatever the image / JetPack / DriveOS provides
    cuda: str | None = None
    docker_run: dict = field(default_factory=dict)
    precisions: frozenset[str] | None = None  # None: decided by the SM
    plugin_build: dict = field(default_factory=dict)
    notes: str = ""
    plugin: bool = True  # False: an image without the Edge-LLM plugin library, for plugin-free exports only

    def image(self, override: str | None = None) -> str:
        """The base image to use: the override, else the matrix's default."""
        if override:
            return override
        if self.base_image is None:
            raise TargetError(f"target {self.name} has no public base image; pass one explicitly "
                              f"({self.description})")
        return self.base_image

    def docker_run_kwargs(self, docker_module=None) -> dict:
        """Keyword arguments for docker SDK `containers.run`; device requests become
        `docker.types.DeviceRequest` when the docker module is given."""
        kwargs = json.loads(json.dumps(self.docker_run))
        if docker_module is not None and "device_requests" in kwargs:
            kwargs["device_requests"] = [docker_module.types.DeviceRequest(**r) for r in kwargs["device_requests"]]
        return kwargs

    def allowed_precisions(self, sm: int | None) -> frozenset[str] | None:
        """What this target can run on a GPU of `sm` (None when nothing is known yet)."""
        sets = [s for s in (self.precisions, precisions_for_sm(sm) if sm is not None else None) if s is not None]
        if not sets:
            return None
        out = sets[0]
        for s in sets[1:]:
            out = out & s
        return frozenset(out)


def _platforms_path(path: str | os.PathLike | None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(PLATFORMS_ENV)
    return Path(env) if env else DEFAULT_PLATFORMS


class TargetSpec(StrictModel):
    """One row of the platform matrix (a target validation can run on)."""

    backend: Literal["cpu", "trt"] = Field(description="cpu: the onnxruntime twin only; trt: a TensorRT engine "
                                                        "with the Edge-LLM plugin")
    description: str = ""
    arch: str = Field("", description="the machine architecture images are built for (x86_64, aarch64)")
    support: str = Field("", description="Edge-LLM's support level for the platform")
    base_image: str | None = Field(None, description="default base image of the validation image; null: none is "
                                                     "public, one must be passed")
    base_image_required: bool | None = Field(None, description="default: base_image is null",
                                             json_schema_extra=no_default)
    sm: int | None = Field(None, description="the GPU's SM; null: whatever GPU the machine has")
    sm_choices: list[int] = Field(default_factory=list, description="the SMs a target with sm null may have")
    tensorrt: str | None = Field(None, description="TensorRT version; null: whatever the image provides")
    cuda: str | None = None
    jetpack: str | None = Field(None, description="informational", json_schema_extra=no_default)
    driveos: str | None = Field(None, description="informational", json_schema_extra=no_default)
    docker_run: dict[str, Any] = Field(default_factory=dict, description="docker SDK containers.run keyword "
                                                                         "arguments (GPU access)")
    precisions: list[Literal[PRECISIONS]] | None = Field(None, description="null: decided by the GPU's SM")
    plugin_build: dict[str, str | int] = Field(default_factory=dict, description="Dockerfile.tensorrt build args "
                                                                                 "of the plugin library")
    plugin: bool = Field(True, description="false: a TensorRT target whose image has no Edge-LLM plugin library; "
                                           "it runs only plugin-free exports (edgellm export --attention native)")
    notes: str = ""

    def target(self, name: str) -> Target:
        return Target(name=name, description=self.description, backend=self.backend, arch=self.arch,
                      support=self.support, base_image=self.base_image,
                      base_image_required=(self.base_image is None if self.base_image_required is None
                                           else self.base_image_required),
                      sm=self.sm, sm_choices=tuple(self.sm_choices), tensorrt=self.tensorrt, cuda=self.cuda,
                      docker_run=dict(self.docker_run),
                      precisions=None if self.precisions is None else frozenset(self.precisions),
                      plugin_build=dict(self.plugin_build), notes=self.notes, plugin=self.plugin)


class PlatformMatrix(StrictModel):
    """platforms.json: the targets edgellm validates on, and the Edge-LLM release their plugins are built from."""

    model_config = {"title": "edgellm platform matrix"}

    format: Literal[1] = 1
    edgellm_release: str | None = Field(None, description="the TensorRT-Edge-LLM release (git tag without v) the "
                                                          "plugin libraries are built from")
    about: str = ""
    targets: dict[str, TargetSpec]


def load_platforms(path: str | os.PathLike | None = None) -> dict[str, Target]:
    """The platform matrix: target name -> Target (from `path`, $EDGELLM_PLATFORMS, or the shipped one)."""
    p = _platforms_path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TargetError(f"the platform matrix is missing; set {PLATFORMS_ENV} to a platform matrix file (the "
                          f"shipped one is {DEFAULT_PLATFORMS})", p) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TargetError(f"is not valid JSON ({e})", p) from None
    if not isinstance(data, dict) or not isinstance(data.get("targets"), dict):
        raise TargetError("has no 'targets' object", p)
    try:
        matrix = PlatformMatrix.model_validate(data)
    except ValidationError as e:
        raise TargetError(f"is not a valid platform matrix: {explain(e, PlatformMatrix, data)}", p) from None
    return {name: spec.target(name) for name, spec in matrix.targets.items()}


def edgellm_release(path: str | os.PathLike | None = None) -> str | None:
    """The Edge-LLM release the matrix's plugin builds are pinned to."""
    p = _platforms_path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("edgellm_release")
    except (OSError, ValueError):
        return None


def get_target(name: str, *, platforms_path: str | os.PathLike | None = None,
               base_image: str | None = None) -> Target:
    targets = load_platforms(platforms_path)
    if name not in targets:
        raise TargetError(f"unknown target {name!r}; known: {', '.join(targets)}")
    t = targets[name]
    if base_image:
        t = replace(t, base_image=base_image, base_image_required=False)
    return t


def device_target(sm: int, name: str = "this-gpu") -> Target:
    """A target for the GPU the TensorRT backend found on this machine, when no target was named."""
    return Target(name=name, description=f"the local GPU (SM {sm})", backend="trt", arch="", support="local",
                  base_image=None, sm=sm)


# ---------------------------------------------------------------- what an export needs


@dataclass
class ExportFeatures:
    llm_dir: Path
    precisions: set[str]
    evidence: dict[str, list[str]]  # precision -> what showed it (first few)
    custom_ops: list[tuple[str, str]]  # (domain, op_type) outside the standard domains
    edgellm_version: str | None
    head_dim: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    unknown_labels: list[str] = field(default_factory=list)  # golden-bundle precision parts not known here
    native: bool = False  # config.json trt_native_ops: standard-op attention, no Edge-LLM plugin


_FP8_TYPES = {17, 18, 19, 20}  # FLOAT8E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ
_INT8_TYPES = {2, 3}  # UINT8, INT8
_INT4_TYPES = {21, 22}  # UINT4, INT4
_FP4_TYPE = 23  # FLOAT4E2M1
_STANDARD = {"", "ai.onnx", "ai.onnx.ml"}


def _embedding_dtype(path: Path) -> str | None:
    """dtype of the `embedding` tensor from the safetensors header (no data read)."""
    from edgellm_core.safetensors_file import SafetensorsFile

    if not path.is_file():
        return None
    info = SafetensorsFile(path).tensors.get("embedding")
    return info.dtype if info is not None else None


# Golden-bundle precision label parts (`+`-joined, written by the exporter) -> precision features.
BUNDLE_LABELS = {"fp16": "fp16", "fp8_embedding": "fp8_embedding", "fp8": "fp8", "fp8_kv": "fp8_kv",
                 "int8_sq": "int8", "int4_awq_modelopt": "int4", "int4_awq_gemm": "int4", "int4_gptq": "int4",
                 "mxfp8": "mxfp8", "nvfp4": "nvfp4"}


def _bundle_precision(llm: Path) -> str | None:
    try:
        label = json.loads((llm / "golden" / "bundle.json").read_text(encoding="utf-8")).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return label if isinstance(label, str) else None


def _scan_graph(model, note, bindings: Bindings) -> list[tuple[str, str]]:
    """Call `note(precision, evidence)` for every precision the graph's nodes, initializers and KV inputs
    show; returns the (domain, op_type) of its non-standard nodes."""
    g = model.graph
    init_types = {t.name: t.data_type for t in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))

    for inp in g.input:
        if bindings.kv_ordinal(inp.name) is not None and inp.type.tensor_type.elem_type in _FP8_TYPES:
            note("fp8_kv", f"input {inp.name} is FP8")
    custom: dict[tuple[str, str], None] = {}
    for node in g.node:
        attrs = {a.name: a for a in node.attribute}
        op = node.op_type
        if node.domain not in _STANDARD:
            custom[(node.domain, op)] = None
        if op == "AttentionPlugin" and "enable_fp8_kv_cache" in attrs and attrs["enable_fp8_kv_cache"].i:
            note("fp8_kv", f"{op} {node.name or ''} enable_fp8_kv_cache=1".replace("  ", " "))
        elif op in ("Int4GroupwiseGemmPlugin", "Int4MoePlugin"):
            note("int4", f"{op} nodes")
        elif op in ("TRT_FP4DynamicQuantize", "Nvfp4MoePlugin", "NvFP4MoEPluginGeforce"):
            note("nvfp4", f"{op} nodes")
        elif op in ("TRT_MXFP8DynamicQuantize", "TRT_MXFP8DequantizeLinear"):
            note("mxfp8", f"{op} nodes")
        elif op == "QuantizeLinear" and node.domain in _STANDARD:
            if "output_dtype" in attrs and attrs["output_dtype"].i:
                out_type = attrs["output_dtype"].i
            elif len(node.input) > 2 and node.input[2]:
                out_type = init_types.get(node.input[2], 2)
            else:
                out_type = 2  # ONNX default: uint8
            if out_type in _FP8_TYPES:
                note("fp8", "QuantizeLinear to FP8")
            elif out_type in _INT8_TYPES:
                note("int8", "QuantizeLinear to INT8")
            elif out_type in _INT4_TYPES:
                note("int4", "QuantizeLinear to INT4")
        elif op == "DequantizeLinear" and node.input and node.input[0] in init_types:
            dtype = init_types[node.input[0]]
            # An FP8 tensor whose dequantized value is itself a scale (NVFP4 block scales) is not FP8 compute.
            feeds_scale = any(c.op_type == "DequantizeLinear" and k == 1
                              for out in node.output for c, k in consumers.get(out, []))
            if dtype in _FP8_TYPES and not feeds_scale and node.domain in _STANDARD:
                note("fp8", f"FP8 weight {node.input[0]}")
            elif dtype in _INT8_TYPES:
                note("int8", f"INT8 weight {node.input[0]}")
            elif dtype in _INT4_TYPES:
                note("int4", f"INT4 weight {node.input[0]}")
            elif dtype == _FP4_TYPE:
                note("nvfp4", f"FP4 weight {node.input[0]}")
    return list(custom)


def inspect_export(export_dir: str | os.PathLike) -> ExportFeatures:
    """The precision features and custom ops an export uses, from its graph, config and embedding header."""
    import onnx

    llm = find_llm_dir(export_dir)
    try:
        model = onnx.load(str(llm / "model.onnx"), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base class
        raise ExportError(f"cannot be parsed as ONNX ({e})", llm / "model.onnx") from None
    try:
        config = json.loads((llm / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        config = {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"is not valid JSON ({e})", llm / "config.json") from None

    found: dict[str, list[str]] = {"fp16": ["activations"]}

    def note(precision: str, what: str) -> None:
        seen = found.setdefault(precision, [])
        if len(seen) < 3 and what not in seen:
            seen.append(what)

    release = config.get("edgellm_version") if isinstance(config.get("edgellm_version"), str) else None
    try:
        bindings = bindings_for(release)
    except ExportError:  # a release this tool does not know is one of the reasons reported; scan by 0.7's names
        bindings = bindings_for(None)
    custom = _scan_graph(model, note, bindings)
    emb = _embedding_dtype(llm / "embedding.safetensors")
    if emb == "F8_E4M3":
        note("fp8_embedding", "embedding.safetensors holds F8_E4M3")
    unknown_labels = []
    label = _bundle_precision(llm)
    for part in (label or "").split("+") if label else []:
        if part in BUNDLE_LABELS:
            note(BUNDLE_LABELS[part], f"golden bundle precision {label!r}")
        else:
            unknown_labels.append(part)

    def cfg_int(key):
        v = config.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    head_dim = cfg_int("head_dim")
    if head_dim is None and cfg_int("hidden_size") and cfg_int("num_attention_heads"):
        head_dim = cfg_int("hidden_size") // cfg_int("num_attention_heads")
    return ExportFeatures(llm, set(found), found, custom, config.get("edgellm_version"), head_dim,
                          cfg_int("num_attention_heads"), cfg_int("num_key_value_heads"), unknown_labels,
                          native=config.get("trt_native_ops") is True)


# ---------------------------------------------------------------- gating


@dataclass
class CapabilityReport:
    target: str
    backend: str
    sm: int | None
    precisions: list[str]
    evidence: dict[str, list[str]]
    deferred: list[str] = field(default_factory=list)  # checks that need the GPU's SM, not known yet
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _release(version: str | None) -> tuple[str, ...] | None:
    if not isinstance(version, str) or not version:
        return None
    return tuple(version.split(".")[:2])


def target_refusals(target: Target, features: ExportFeatures, *, sm: int | None = None,
                    release: str | None = None) -> tuple[list[str], CapabilityReport]:
    """(reasons the target cannot run the export, report); an empty list means it can."""
    reasons: list[str] = []
    report = CapabilityReport(target.name, target.backend, None, sorted(features.precisions), features.evidence)
    if features.unknown_labels:
        report.warnings.append(f"the golden bundle names precision parts this gate does not know "
                               f"({', '.join(features.unknown_labels)}); judged from the graph alone")
    if release and _release(features.edgellm_version) and _release(features.edgellm_version) != _release(release):
        reasons.append(f"the export targets Edge-LLM {features.edgellm_version}, but {target.name}'s plugin is "
                       f"built from {release}; graphs and engines are not portable across releases")

    if target.backend == "cpu":
        from edgellm_core.ops import CUSTOM_OPS

        unlowered = [f"{d}::{op}" for d, op in features.custom_ops if (d, op) not in CUSTOM_OPS]
        if unlowered:
            reasons.append(f"the onnxruntime twin has no CPU lowering for {', '.join(sorted(unlowered))}")
        allowed = target.precisions
        for p in sorted(features.precisions - (allowed or features.precisions)):
            reasons.append(f"{p} ({'; '.join(features.evidence[p])}) is not supported by the CPU twin")
        return reasons, report

    # GPU targets
    reasons += export_form_problems(target, features.native, features.custom_ops)
    if sm is not None and target.sm is not None and SM_RENUMBER.get(sm, sm) != SM_RENUMBER.get(target.sm, target.sm):
        reasons.append(f"this machine's GPU is SM {sm}, but target {target.name} is SM {target.sm}; engines are "
                       "built where they run")
    if sm is not None and target.sm is None and target.sm_choices and sm not in target.sm_choices:
        hint = (" (a plugin-free export runs on other GPUs through a target without the plugin library, e.g. "
                "x86-cuda-native)" if features.native and target.plugin else "")
        reasons.append(f"this machine's GPU is SM {sm}, but target {target.name} is meant for SM "
                       f"{', '.join(map(str, target.sm_choices))}, as its smoke check requires" + hint)
    eff_sm = target.sm if target.sm is not None else sm
    report.sm = eff_sm
    if features.native:
        _native_tensorrt(target, reasons, report)
    if eff_sm is None:
        report.deferred.append("the GPU's SM is decided at run time: "
                               + ("" if features.native else "decode-attention kernels and ")
                               + "FP8/FP4 support are checked when the backend starts")
    elif not features.native and not decode_attention_supported(eff_sm):  # native: TensorRT's own attention
        reasons.append(f"SM {eff_sm} is not supported by Edge-LLM's decode attention (XQA) kernels, which are "
                       f"built for SM {', '.join(str(s) for s in sorted(DECODE_ATTENTION_SMS))} (Thor's 110 "
                       "maps to 101); H100/H200 (SM 90) cannot run Edge-LLM engines with the AttentionPlugin")
    allowed = target.allowed_precisions(eff_sm)
    if allowed is not None:
        for p in sorted(features.precisions - allowed):
            why = _WHY.get(p, "")
            where = f"SM {eff_sm}" if eff_sm is not None else target.name
            reasons.append(f"{p} ({'; '.join(features.evidence[p])}) cannot run on {target.name} ({where})"
                           + (f": {why}" if why else ""))
    # The head-size and ratio limits are the AttentionPlugin kernels'; a native export has none.
    if not features.native and features.head_dim is not None and features.num_attention_heads \
            and features.num_key_value_heads:
        reasons += kernel_problems(features.head_dim, features.num_attention_heads, features.num_key_value_heads)
    _plugin_sms(features, eff_sm, reasons, report)
    if "nvfp4" in features.precisions and ((target.tensorrt or "").startswith("10.15")
                                           or (features.native and target.tensorrt is None)):
        report.warnings.append("NVIDIA lists an NVFP4 accuracy degradation with TensorRT 10.15 (Edge-LLM's known "
                               "limitations; 10.13.3.9 is unaffected)")
    if target.support and not target.support.startswith(("official", "developer", "local")):
        report.warnings.append(f"{target.name}'s Edge-LLM support level is {target.support!r}: the plugin build "
                               "and engine are less proven there")
    return reasons, report


def export_form_problems(target: Target, native: bool, custom_ops=()) -> list[str]:
    """Why `target` cannot take an export of this form: a plugin-free target (no Edge-LLM plugin library in
    its image) takes only plugin-free exports. Checked before an export is made too (make, qualify)."""
    if target.backend != "trt" or target.plugin or native:
        return []
    ops = sorted({op for domain, op in custom_ops if domain == PLUGIN_DOMAIN}) or ["AttentionPlugin"]
    return [f"target {target.name} has no Edge-LLM plugin library: it runs only plugin-free exports, and this "
            f"export's graph needs the plugin ({', '.join(ops)}); export it with --attention native (a suite "
            "case: options: {attention: native}), or validate it on a target with the plugin"]


def _plugin_sms(features: ExportFeatures, sm: int | None, reasons: list[str], report: CapabilityReport) -> None:
    """Refuse a GPU whose SM a custom op's kernels are not built for (PLUGIN_SMS, PLUGIN_MIN_SM)."""
    for _, op in features.custom_ops:
        sms, low = PLUGIN_SMS.get(op), PLUGIN_MIN_SM.get(op)
        if sms is None and low is None:
            continue
        where = ", ".join(map(str, sorted(sms))) if sms else f"{low} or newer"
        if sm is None:
            report.deferred.append(f"{op} runs on SM {where} only; checked when the backend starts")
        elif (sms is not None and sm not in sms) or (low is not None and sm < low):
            reasons.append(f"{op} (the exported MoE layers) has kernels for SM {where} only, not SM {sm}"
                           + _PLUGIN_SM_NOTE.get(op, ""))


def _version(text: str | None) -> tuple[int, ...] | None:
    parts = []
    for part in (text or "").split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts) or None


def _native_tensorrt(target: Target, reasons: list[str], report: CapabilityReport) -> None:
    """A native export needs TensorRT 10.15 or later: refused where the target pins an older one, deferred where
    the image decides."""
    pinned = _version(target.tensorrt)
    need = ".".join(map(str, NATIVE_MIN_TENSORRT))
    if pinned is None:
        report.deferred.append(f"this plugin-free (trt_native_ops) export needs TensorRT {need} or later; "
                               f"{target.name} takes TensorRT from its image, whose version is checked there")
    elif pinned[:2] < NATIVE_MIN_TENSORRT:
        reasons.append(f"this plugin-free (trt_native_ops) export needs TensorRT {need} or later to parse "
                       f"RotaryEmbedding / TensorScatter / Attention, but {target.name} has TensorRT "
                       f"{target.tensorrt}; export it without --attention native for this target")


def check_target_can_run(target: str | Target, export_dir: str | os.PathLike, *, sm: int | None = None,
                         platforms_path: str | os.PathLike | None = None) -> CapabilityReport:
    """Refuse (TargetRefusal, every reason in one message) an export the target cannot run; else a report.

    `sm` is the GPU actually present, when known (the TensorRT backend passes it); targets with a
    fixed SM are checked against their own.
    """
    tgt = get_target(target, platforms_path=platforms_path) if isinstance(target, str) else target
    features = inspect_export(export_dir)
    reasons, report = target_refusals(tgt, features, sm=sm, release=edgellm_release(platforms_path))
    if reasons:
        raise TargetRefusal(f"target {tgt.name} cannot run this export: " + "; ".join(reasons), features.llm_dir)
    return report
