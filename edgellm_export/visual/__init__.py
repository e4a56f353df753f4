"""Vision encoders: `OUT/visual/` next to the language model (families.md §5, §7).

One module per tower family, chosen by the checkpoint's root `model_type` (`FAMILIES`). Each gives
`parse(raw, text_hidden, path) -> spec`, `prepare(ckpt, spec)` (tensor names), `runtime_config(raw, spec,
ckpt_dir)`, `emit_graph(g, weights, spec)`, `golden_inputs(spec)`, `eager(inputs, tensors, spec)` and
`PREFIXES` (every tensor under them must be read). Here: planning (graph and config before a byte is
written), and the golden bundle the validation side replays: the family's inputs (preprocessing included)
and the eager face's outputs for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import GraphBuilder

from . import internvl, phi4mm, qwen2_5_vl, qwen3_vl

SUBDIR = "visual"
FAMILIES = {"internvl": internvl, "internvl_chat": internvl, "qwen2_5_vl": qwen2_5_vl,  # root model_type
            "qwen3_vl": qwen3_vl, "qwen3_5": qwen3_vl, "phi4mm": phi4mm, "phi4_multimodal": phi4mm}
GOLDEN_DIR, GOLDEN_FILE, GOLDEN_TENSORS = "golden", "bundle.json", "tensors.safetensors"
PREPROCESSOR_FILES = ("preprocessor_config.json",)


def exportable(raw: dict) -> bool:
    """This version can export the checkpoint's vision tower."""
    return raw.get("model_type") in FAMILIES


@dataclass
class PlannedVisual:
    module: object
    spec: object
    graph: GraphBuilder
    runtime_config: dict
    quant: dict = field(default_factory=dict)  # the tower's quantized linears (name -> LinearQuant)


class WrittenWeights:
    """The graph's initializers read back from the data file just written (still in the page cache), one at a
    time as the eager face asks for them: the golden pass never holds the whole tower (a 7B VLM's is 1.3 GB)."""

    def __init__(self, graph: GraphBuilder, data_path: Path, quant: dict | None = None):
        self.path, self.weights, self.quant = data_path, {w.name: w for w in graph.weights}, quant or {}

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def get(self, name: str, default=None):
        return self[name] if name in self.weights else default

    def __getitem__(self, name: str):
        import torch
        from onnx import helper

        from edgellm_core.onnx_graph.builder import FLOAT4E2M1, FLOAT8E4M3FN

        w = self.weights[name]
        count = int(np.prod(w.shape, dtype=np.int64)) if w.shape else 1
        if w.dtype == FLOAT4E2M1:  # [N, K] codes, two a byte: as the checkpoint packs them, [N, K/2] uint8
            arr = np.fromfile(self.path, dtype=np.uint8, count=count // 2, offset=w.offset)
            return torch.from_numpy(arr.reshape(w.shape[0], -1))
        if w.dtype == FLOAT8E4M3FN:
            arr = np.fromfile(self.path, dtype=np.uint8, count=count, offset=w.offset)
            return torch.from_numpy(arr).view(torch.float8_e4m3fn).reshape(w.shape)
        dtype = helper.tensor_dtype_to_np_dtype(w.dtype)
        arr = np.fromfile(self.path, dtype=dtype, count=count, offset=w.offset).reshape(w.shape)
        return torch.from_numpy(arr)


def plan(ckpt, text_hidden: int, vocab_size: int, clamp: bool = False) -> PlannedVisual:
    """Config, runtime config and the graph with every weight declared; refuses tensors of the tower the
    graph does not read (they would change its meaning)."""
    from ..models.weights import WeightSource

    module = FAMILIES[ckpt.config.get("model_type")]
    spec = module.parse(ckpt.config, text_hidden, ckpt.config_path)
    _check_preprocessor(ckpt.path, module, spec)
    runtime_config = module.runtime_config(ckpt.config, spec, ckpt.path)
    outside = {k: v for k, v in runtime_config.items() if k.endswith("_token_id") and isinstance(v, int)
               and not 0 <= v < vocab_size}
    if outside:
        raise ExportError(f"multimodal token ids {outside} lie outside the language model's vocabulary of "
                          f"{vocab_size}; the runtime looks them up in its embedding table", ckpt.config_path)
    module.prepare(ckpt, spec)
    g = GraphBuilder("edgellm_visual")
    weights = WeightSource(ckpt, g, clamp=clamp)
    weights.quant = _tower_quant(ckpt, module, spec)
    module.emit_graph(g, weights, spec)
    stray = sorted(n for n in ckpt.names() if n.startswith(module.PREFIXES) and n not in weights.used)
    if stray:
        shown = ", ".join(stray[:4]) + (f" and {len(stray) - 4} more" if len(stray) > 4 else "")
        raise ExportError(f"the vision tower has tensors this export does not read ({shown}); exporting without "
                          "them would compute something else", ckpt.path)
    return PlannedVisual(module, spec, g, runtime_config, weights.quant)


TOWER_FORMATS = ("fp8", "nvfp4", "mxfp8")  # quant.plan's names of the formats a tower's linears may have


def _tower_quant(ckpt, module, spec) -> dict:
    """The tower's quantized linears from the checkpoint's quantization metadata (a ModelOpt tower quantized
    with the language model, or left out through exclude_modules), checked against their tensors. FP8, NVFP4
    and MXFP8 towers go through the language model's quantized linears; other formats, or a quantized tower
    of a family without them, are refused."""
    from ..quant.plan import FP16, parse_quant_plan, resolve

    plan = parse_quant_plan(ckpt.path, ckpt.config)
    if plan is None:
        return {}
    names = getattr(module, "linear_names", None)
    if names is None:
        quantized = sorted(n for n in ckpt.names() if n.startswith(module.PREFIXES)
                           and (n.endswith(("_scale", "_scale_2", ".qweight"))
                                or ckpt.ref(n).dtype in ("F8_E4M3", "U8", "I8")))
        if quantized:
            raise UnsupportedError(f"the vision tower is quantized ({quantized[0]}, ...); quantized towers of this "
                                   f"family are not implemented (FP8, NVFP4, MXFP8 towers: Qwen VLs, Phi-4-MM). "
                                   "Quantize the language model alone (exclude the tower)", plan.source)
        return {}
    decisions = resolve(plan, ckpt, names(spec))
    bad = sorted({lq.algo or lq.format for lq in decisions.values() if lq.format not in (FP16, *TOWER_FORMATS)})
    if bad:
        raise UnsupportedError(f"the vision tower's linears are quantized as {', '.join(bad)}; towers take FP8, "
                               "NVFP4 or MXFP8 (the runtime's visual builder has no INT4 / INT8 paths). Exclude the "
                               "tower from quantization", plan.source)
    return {name: lq for name, lq in decisions.items() if lq.format != FP16}


def write_golden(out: Path, planned: PlannedVisual, data_path: Path) -> dict[str, np.ndarray]:
    """visual/golden/: the family's golden inputs (every graph input, preprocessing included) and what the eager
    face computes for them over the weights as written; returns those outputs (fp32 holding fp16 values)."""
    import torch
    from safetensors.numpy import save_file

    inputs = planned.module.golden_inputs(planned.spec)
    with torch.no_grad():
        want = planned.module.eager(inputs, WrittenWeights(planned.graph, data_path, planned.quant), planned.spec)
    if not isinstance(want, dict):  # one output (most towers); Qwen3-VL's also has its deepstack features
        want = {planned.module.OUTPUT: want}
    expected = {f"expected_{name}": rows.numpy().astype(np.float32) for name, rows in want.items()}
    d = out / GOLDEN_DIR
    d.mkdir()
    save_file({**inputs, **expected}, str(d / GOLDEN_TENSORS))
    (d / GOLDEN_TENSORS).chmod(0o644)
    (d / GOLDEN_FILE).write_text(json.dumps({"format": 1, "inputs": {name: name for name in inputs},
                                             "outputs": {name: f"expected_{name}" for name in want}}, indent=1)
                                 + "\n")
    return {name: expected[f"expected_{name}"] for name in want}


def preprocessor_config(ckpt_dir: Path) -> tuple[dict | None, Path | None]:
    """The image preprocessor's settings: `preprocessor_config.json`, else `processor_config.json`'s
    `image_processor` (newer processors save that); (None, None) when there are none."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = ckpt_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot be read as JSON ({e})", path) from None
        data = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(data, dict):
            return data, path
    return None, None


def _check_preprocessor(ckpt_dir: Path, module, spec) -> None:
    """The runtime preprocesses images by this file's settings: refuse one that contradicts the tower's config
    (the tower would get patches or tiles of another size than it was exported for)."""
    data, path = preprocessor_config(ckpt_dir)
    if data is None:
        return
    problems = module.preprocessor_problems(data, spec)
    if problems:
        raise ExportError("contradicts config.json's vision_config: " + "; ".join(problems), path)


def copy_preprocessor(ckpt_dir: Path, out: Path) -> None:
    """The image preprocessor's config as the runtime's multimodal runner reads it: copied, or extracted from
    processor_config.json (families.md §7)."""
    data, path = preprocessor_config(ckpt_dir)
    if path is not None and path.name == PREPROCESSOR_FILES[0]:
        (out / path.name).write_bytes(path.read_bytes())
    elif data is not None:
        (out / PREPROCESSOR_FILES[0]).write_text(json.dumps(data, indent=2) + "\n")


def write_sidecars(out: Path, planned: PlannedVisual, ckpt, data_path: Path) -> None:
    """The family's sidecars next to the graph (Phi-4-MM's phi4mm_gn_proj.safetensors), computed over the
    weights as written."""
    hook = getattr(planned.module, "write_sidecars", None)
    if hook is not None:
        hook(out, planned.spec, ckpt, WrittenWeights(planned.graph, data_path, planned.quant))



def assemble(how: dict, rows: np.ndarray, vdir: Path) -> np.ndarray:
    """The encoder's rows laid out as the runtime does before they are scattered (the bundle's `assemble`)."""
    from safetensors.numpy import load_file

    from edgellm_core.multimodal import assemble as layout

    return layout(how, rows, load_file(str(vdir / how["sidecar"])))
