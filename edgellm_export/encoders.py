"""What every encoder component (`OUT/visual/`, `OUT/audio/`) shares: planning (config, runtime config and the
graph with every weight declared, before a byte is written), the sidecars and the golden bundle the validation
side replays: the family's inputs (the runtime's preprocessing included) and its eager face's outputs for them,
computed over the weights as written.

A family module (visual/*.py, audio/*.py) gives `parse(raw, text_hidden, path) -> spec`, `prepare(ckpt, spec)`
(tensor names), `runtime_config(raw, spec, ckpt_dir)`, `preprocessor_problems(settings, spec)`,
`emit_graph(g, weights, spec)`, `golden_inputs(spec)`, `eager(inputs, tensors, spec)`, `PREFIXES` (every tensor
under them must be read) and `OUTPUT`; optionally `linear_names(spec)` (its linears may be quantized) and
`write_sidecars(out, spec, ckpt, tensors)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm_core.errors import ExportError, UnsupportedError
from edgellm_core.onnx_graph.builder import GraphBuilder

GOLDEN_DIR, GOLDEN_FILE, GOLDEN_TENSORS = "golden", "bundle.json", "tensors.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
QUANT_FORMATS = ("fp8", "nvfp4", "mxfp8")  # quant.plan's names of the formats an encoder's linears may have
NAMES = {"visual": "vision tower", "audio": "audio encoder"}  # for messages


MAX_SIZE = 1 << 20  # no real encoder has a size (width, depth, patch, table length) beyond this


def config_fields(section, what: str, path):
    """`need(key, *alternatives, default=None, size=True)` over config section `section` (named `what` in
    messages): the first of the keys it has, else the default, else an error naming the key. `size`: a positive
    integer up to MAX_SIZE (checked before anything is sized from it); `size=False`: any value."""
    if not isinstance(section, dict):
        raise ExportError(f"has no {what} object", path)

    def need(key, *alternatives, default=None, size=True):
        found = next((k for k in (key, *alternatives) if section.get(k) is not None), None)
        if found is None:
            if default is None:
                raise ExportError(f"{what} lacks {key!r}", path)
            return default
        value = section[found]
        if size and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE):
            raise ExportError(f"{what}.{found} is {value!r}; expected a positive integer (at most {MAX_SIZE})", path)
        return value

    return need


def index_list(value, what: str, path) -> tuple[int, ...]:
    """A config list of layer indexes (fullatt_block_indexes, deepstack_visual_indexes)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ExportError(f"{what} is {value!r}; expected a list of layer indexes", path)
    return tuple(value)


def number(value, what: str, path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ExportError(f"{what} is {value!r}; expected a number", path)
    return float(value)


@dataclass
class Preprocessor:
    """Where a component's preprocessing settings live: `preprocessor_config.json` when it holds `marker`, else
    `processor_config.json`'s `key` (newer processors save that); `what` names the config section they must
    agree with."""

    key: str  # image_processor / feature_extractor
    what: str  # vision_config / audio_config
    marker: str | None = None  # a key the settings have (audio: feature_size), when one file may hold others'


@dataclass
class PlannedEncoder:
    component: str  # visual / audio: its OUT/ subdirectory
    module: object
    spec: object
    graph: GraphBuilder
    runtime_config: dict
    preprocessor: Preprocessor
    quant: dict = field(default_factory=dict)  # quantized linears (name -> LinearQuant)


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


def plan(component: str, module, ckpt, text_hidden: int, vocab_size: int, preprocessor: Preprocessor,
         clamp: bool = False) -> PlannedEncoder:
    """Config, runtime config and the graph with every weight declared; refuses tensors of the encoder the graph
    does not read (they would change its meaning)."""
    from .models.weights import WeightSource

    spec = module.parse(ckpt.config, text_hidden, ckpt.config_path)
    check_preprocessor(ckpt.path, preprocessor, module, spec)
    runtime_config = module.runtime_config(ckpt.config, spec, ckpt.path)
    outside = {k: v for k, v in runtime_config.items() if k.endswith("_token_id") and isinstance(v, int)
               and not 0 <= v < vocab_size}
    if outside:
        raise ExportError(f"multimodal token ids {outside} lie outside the language model's vocabulary of "
                          f"{vocab_size}; the runtime looks them up in its embedding table", ckpt.config_path)
    module.prepare(ckpt, spec)
    g = GraphBuilder(f"edgellm_{component}")
    weights = WeightSource(ckpt, g, clamp=clamp)
    weights.quant = _quantized_linears(ckpt, module, spec, component)
    module.emit_graph(g, weights, spec)
    stray = sorted(n for n in ckpt.names() if n.startswith(module.PREFIXES) and n not in weights.used)
    if stray:
        shown = ", ".join(stray[:4]) + (f" and {len(stray) - 4} more" if len(stray) > 4 else "")
        raise ExportError(f"the {NAMES[component]} has tensors this export does not read ({shown}); exporting "
                          "without them would compute something else", ckpt.path)
    return PlannedEncoder(component, module, spec, g, runtime_config, preprocessor, weights.quant)


def _quantized_linears(ckpt, module, spec, component: str) -> dict:
    """The encoder's quantized linears from the checkpoint's quantization metadata (a ModelOpt tower quantized
    with the language model, or left out through exclude_modules), checked against their tensors. FP8, NVFP4
    and MXFP8 go through the language model's quantized linears; other formats, or a quantized encoder of a
    family without them, are refused."""
    from .quant.plan import FP16, parse_quant_plan, resolve

    plan_ = parse_quant_plan(ckpt.path, ckpt.config)
    if plan_ is None:
        return {}
    names = getattr(module, "linear_names", None)
    if names is None:
        quantized = sorted(n for n in ckpt.names() if n.startswith(module.PREFIXES)
                           and (n.endswith(("_scale", "_scale_2", ".qweight"))
                                or ckpt.ref(n).dtype in ("F8_E4M3", "U8", "I8")))
        if quantized:
            raise UnsupportedError(f"the {NAMES[component]} is quantized ({quantized[0]}, ...); quantized encoders "
                                   "of this family are not implemented (FP8, NVFP4, MXFP8 towers: Qwen VLs, "
                                   "Phi-4-MM). Quantize the language model alone (exclude the encoder)",
                                   plan_.source)
        return {}
    decisions = resolve(plan_, ckpt, names(spec))
    bad = sorted({lq.algo or lq.format for lq in decisions.values() if lq.format not in (FP16, *QUANT_FORMATS)})
    if bad:
        raise UnsupportedError(f"the {NAMES[component]}'s linears are quantized as {', '.join(bad)}; encoders take "
                               "FP8, NVFP4 or MXFP8 (the runtime's encoder builders have no INT4 / INT8 paths). "
                               "Exclude the encoder from quantization", plan_.source)
    return {name: lq for name, lq in decisions.items() if lq.format != FP16}


def preprocessor_settings(ckpt_dir: Path, how: Preprocessor) -> tuple[dict | None, Path | None]:
    """The component's preprocessing settings and the file they came from ((None, None) when there are none)."""
    for name, key in ((PREPROCESSOR_FILE, None), ("processor_config.json", how.key)):
        path = ckpt_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot be read as JSON ({e})", path) from None
        data = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(data, dict) and (how.marker is None or how.marker in data):
            return data, path
    return None, None


def check_preprocessor(ckpt_dir: Path, how: Preprocessor, module, spec) -> None:
    """The runtime preprocesses by this file's settings: refuse one that contradicts the encoder's config (it
    would get patches, tiles or mel bins of another size than it was exported for)."""
    data, path = preprocessor_settings(ckpt_dir, how)
    if data is None:
        return
    problems = module.preprocessor_problems(data, spec)
    if problems:
        raise ExportError(f"contradicts config.json's {how.what}: " + "; ".join(problems), path)


def copy_preprocessor(ckpt_dir: Path, how: Preprocessor, out: Path) -> None:
    """The preprocessing settings as the runtime's runner reads them: copied, or extracted from
    processor_config.json (families.md §7)."""
    data, path = preprocessor_settings(ckpt_dir, how)
    if path is not None and path.name == PREPROCESSOR_FILE:
        (out / path.name).write_bytes(path.read_bytes())
    elif data is not None:
        (out / PREPROCESSOR_FILE).write_text(json.dumps(data, indent=2) + "\n")


def write_sidecars(out: Path, planned: PlannedEncoder, ckpt, data_path: Path) -> None:
    """The family's sidecars next to the graph (Phi-4-MM's phi4mm_gn_proj.safetensors), computed over the
    weights as written."""
    hook = getattr(planned.module, "write_sidecars", None)
    if hook is not None:
        hook(out, planned.spec, ckpt, WrittenWeights(planned.graph, data_path, planned.quant))


def write_golden(out: Path, planned: PlannedEncoder, data_path: Path) -> dict[str, np.ndarray]:
    """<component>/golden/: the family's golden inputs (every graph input, preprocessing included) and what the
    eager face computes for them over the weights as written; returns those outputs (fp32 holding fp16 values)."""
    import torch
    from safetensors.numpy import save_file

    inputs = planned.module.golden_inputs(planned.spec)
    with torch.no_grad():
        want = planned.module.eager(inputs, WrittenWeights(planned.graph, data_path, planned.quant), planned.spec)
    if not isinstance(want, dict):  # one output (most encoders); Qwen3-VL's also has its deepstack features
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
