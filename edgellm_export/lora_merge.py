"""`edgellm merge-lora`: merge LoRA deltas into a checkpoint's weights, W' = W + scale * (B @ A).

Two sources, which may combine (builtin first):
- a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), as `merge_and_unload` would merge it;
- adapters stored inside the checkpoint, as the original Phi-4-multimodal (`phi4mm`) ships them:
  `<module>.base_layer.weight`, `<module>.lora_A.<name>.weight` [r, in], `<module>.lora_B.<name>.weight` [out, r]
  and config.json's `<name>_lora` = {"r", "lora_alpha", ...}. One of them is merged (--builtin NAME), the others
  are dropped; the output is a plain checkpoint (no `.base_layer.`, no LoRA tensors, no `<name>_lora` keys).

Streaming: tensors are read through lazily mapped files and written one at a time into one output shard per
input shard (safetensors written here: header, then raw bytes); tensors the merge does not touch are copied byte
for byte. The delta is computed in fp32 (fp64 for fp64 weights) and cast back to the weight's dtype. The output is
built in a temporary sibling of OUT and renamed into place at the end; on any error nothing is left behind.
Nothing is unpickled: adapters and checkpoints must be safetensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgellm_core.errors import EnvironmentProblem, ExportError
from edgellm_core.safetensors_file import SafetensorsFile

from . import interrupts
from .checkpoint.reader import load_json

INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# <module>.lora_A.<name>.weight (builtin, phi4mm) and <module>.lora_A[.<name>].weight (PEFT adapter files)
_BUILTIN_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<name>[^.]+)\.weight$")
_UNNAMED_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_FLOAT = {"F64", "F32", "F16", "BF16"}
# Files of CKPT that are weights in another format (or a stray adapter): never copied into the merged checkpoint.
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class _Delta:
    a: tuple[SafetensorsFile, str]  # [r, in]
    b: tuple[SafetensorsFile, str]  # [out, r]
    scale: float
    transpose: bool  # PEFT fan_in_fan_out: the base weight is [in, out]


@dataclass
class _OutTensor:
    name: str
    file: SafetensorsFile
    key: str
    deltas: list[_Delta] = field(default_factory=list)


@dataclass
class _Source:
    label: str
    scales: list[float] = field(default_factory=list)  # one per merged module

    def describe(self) -> str:
        distinct = sorted(set(self.scales))
        scale = (f"scale {distinct[0]:g}" if len(distinct) == 1
                 else "scales " + ", ".join(f"{s:g}" for s in distinct))
        return f"{len(self.scales)} modules ({scale}) from {self.label}"


@dataclass
class MergeResult:
    out: Path
    sources: list[_Source]
    dropped: list[str]  # one line per builtin adapter dropped

    def summary(self) -> str:
        parts = " and ".join(s.describe() for s in self.sources) or "0 modules"
        return f"merged {parts} into {self.out}"


# -- paths ---------------------------------------------------------------------------------------------------------
def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_out(out: Path, inputs: list[tuple[Path, str]]) -> None:
    real = _real(out)
    for forbidden, what in ((Path("/"), "the filesystem root"), (Path.home(), "your home directory"),
                            (Path.cwd(), "the current directory")):
        if real == _real(forbidden):
            raise ExportError(f"the output directory is {what}; choose a new directory for the merged checkpoint",
                              out)
    for src, what in inputs:
        if _inside(real, src):
            raise ExportError(f"the output directory is inside the {what} {src}; choose a directory outside it",
                              out)
        if _inside(src, real):
            raise ExportError(f"the output directory contains the {what} {src}; choose a directory outside it",
                              out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExportError("the output path exists and is not a directory", out)
        if any(out.iterdir()):
            raise ExportError("the output directory exists and is not empty; merge-lora writes a new checkpoint "
                              "directory and never replaces one (choose a new or empty directory)", out)


def _load_json(path: Path, what: str):
    return load_json(path, what)


# -- the checkpoint's tensors --------------------------------------------------------------------------------------
class _Shards:
    """The checkpoint's safetensors files (in order) and which file holds each tensor."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self.sharded = False
        self.files: list[tuple[str, SafetensorsFile]] = []
        self.owner: dict[str, SafetensorsFile] = {}
        index_path = ckpt / INDEX_NAME
        weight_map = None
        if index_path.exists():
            index = _load_json(index_path, INDEX_NAME)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ExportError("the index has no 'weight_map' of tensor -> shard names", index_path)
            names = sorted(set(weight_map.values()))
            for n in names:
                norm = os.path.normpath(n)
                if not n or os.path.isabs(n) or os.sep in norm or norm in (".", ".."):
                    raise ExportError(f"the index names shard {n!r}, which is not a file of the checkpoint "
                                      "directory; refusing to read it", index_path)
                if not (ckpt / norm).is_file():
                    raise ExportError(f"the index names shard {n!r} but that file is missing", index_path)
            self.sharded = True
        elif (ckpt / "model.safetensors").is_file():
            names = ["model.safetensors"]
        else:
            names = sorted(p.name for p in ckpt.glob("*.safetensors") if p.is_file())
            self.sharded = len(names) > 1
            if not names:
                pickled = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pt", ".pth")
                                 and p.name != "training_args.bin")
                if pickled:
                    raise ExportError(f"the checkpoint has only pickled weights ({', '.join(pickled[:3])}); "
                                      "merge-lora unpickles nothing. Convert them to safetensors first (e.g. "
                                      "transformers' save_pretrained(safe_serialization=True)).", ckpt)
                raise ExportError("no *.safetensors weight files in the checkpoint directory", ckpt)
        self.files = [(n, SafetensorsFile(ckpt / n)) for n in names]
        by_name = dict(self.files)
        if weight_map is not None:
            for key, n in weight_map.items():
                if key not in by_name[n].tensors:
                    raise ExportError(f"the index says tensor {key!r} is in {n!r}, but that shard does not "
                                      "contain it", index_path)
                self.owner[key] = by_name[n]
        for n, sf in self.files:
            for key in sf.tensors:
                prev = self.owner.get(key)
                if prev is None:
                    self.owner[key] = sf
                elif weight_map is None or key not in weight_map:
                    raise ExportError(f"tensor {key!r} is in both {prev.path.name} and {n}; the checkpoint is "
                                      "ambiguous", ckpt)

    def ordered(self, sf: SafetensorsFile) -> list[str]:
        """The tensors this file owns, in file order."""
        return sorted((k for k in sf.tensors if self.owner[k] is sf), key=lambda k: sf.tensors[k].start)

    def close(self) -> None:
        for _, sf in self.files:
            sf.close()


def _shape_error(where: Path, key: str, problem: str) -> ExportError:
    return ExportError(f"tensor {key!r}: {problem}", where)


def _check_pair(w: tuple[SafetensorsFile, str], a: tuple[SafetensorsFile, str], b: tuple[SafetensorsFile, str],
                r: int, transpose: bool) -> None:
    """A [r, in], B [out, r], W [out, in] (W [in, out] with fan_in_fan_out); all floating point."""
    (wf, wk), (af, ak), (bf, bk) = w, a, b
    wi, ai, bi = wf.tensors[wk], af.tensors[ak], bf.tensors[bk]
    if wi.dtype not in _FLOAT:
        raise _shape_error(wf.path, wk, f"is {wi.dtype}; merging LoRA into a quantized or integer weight is not "
                                        "supported (merge into the unquantized checkpoint, then quantize)")
    for sf, k, info in ((af, ak, ai), (bf, bk, bi)):
        if info.dtype not in _FLOAT:
            raise _shape_error(sf.path, k, f"is {info.dtype}; LoRA factors must be floating point")
        if len(info.shape) != 2:
            raise _shape_error(sf.path, k, f"has shape {list(info.shape)}; LoRA factors must be 2-D (only linear "
                                           "layers can be merged)")
    if ai.shape[0] != r:
        raise _shape_error(af.path, ak, f"has shape {list(ai.shape)}, but the adapter's rank is {r} "
                                        f"(expected [{r}, in])")
    if bi.shape[1] != r:
        raise _shape_error(bf.path, bk, f"has shape {list(bi.shape)}, but the adapter's rank is {r} "
                                        f"(expected [out, {r}])")
    want = (ai.shape[1], bi.shape[0]) if transpose else (bi.shape[0], ai.shape[1])
    if tuple(wi.shape) != want:
        raise _shape_error(af.path, ak, f"and {bk!r} ({list(ai.shape)} and {list(bi.shape)}) give a delta of shape "
                                        f"{list(want)}, but the base weight {wk!r} in {wf.path} has shape "
                                        f"{list(wi.shape)}")


def _number(value, what: str, where: Path, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise ExportError(f"{what} must be a {'positive ' if positive else ''}number, not {value!r}", where)
    return value


# -- builtin adapters (phi4mm) -------------------------------------------------------------------------------------
def _builtin(shards: _Shards, config: dict, config_path: Path, out_names: dict[str, str],
             out_tensors: dict[str, _OutTensor], builtin: str | None,
             drop: bool) -> tuple[list[_Source], list[str], set[str]]:
    """Plan the builtin adapters: returns (sources, one line per dropped adapter, config keys to remove)."""
    found: dict[str, dict[str, dict[str, str]]] = {}  # name -> module -> {"A": key, "B": key}
    for key in shards.owner:
        m = _BUILTIN_KEY.match(key)
        if m:
            found.setdefault(m["name"], {}).setdefault(m["module"], {})[m["ab"]] = key
        elif _UNNAMED_KEY.match(key):
            raise ExportError(f"tensor {key!r} is a LoRA factor without an adapter name; merge-lora knows builtin "
                              "adapters as <module>.lora_A.<name>.weight with a <name>_lora entry in config.json",
                              shards.owner[key].path)
    declared = {k[: -len("_lora")] for k, v in config.items()
                if k.endswith("_lora") and isinstance(v, dict) and "r" in v and "lora_alpha" in v}
    names = sorted(set(found) | declared)
    if not names:
        if builtin is not None or drop:
            flag = "--builtin" if builtin is not None else "--drop-builtin"
            raise ExportError(f"{flag} was given, but the checkpoint has no builtin LoRA adapters "
                              "(no <module>.lora_A.<name>.weight tensors, no <name>_lora entries in config.json)",
                              shards.ckpt)
        return [], [], set()
    listed = ", ".join(names)
    if builtin is None and not drop:
        raise ExportError(f"the checkpoint carries builtin LoRA adapters ({listed}); choose the one to merge with "
                          "--builtin NAME (the others are dropped), or --drop-builtin to drop them all and keep the "
                          "base weights. Merging nothing would leave weights that compute something else.",
                          shards.ckpt)
    if builtin is not None and builtin not in names:
        raise ExportError(f"--builtin {builtin}: the checkpoint has no builtin adapter of that name (it has "
                          f"{listed})", shards.ckpt)
    sources: list[_Source] = []
    for name in names:
        modules = found.get(name, {})
        for ab in modules.values():
            if set(ab) != {"A", "B"}:
                have, miss = ("A", "B") if "A" in ab else ("B", "A")
                raise ExportError(f"builtin adapter {name!r}: {ab[have]!r} has no matching lora_{miss} tensor",
                                  shards.owner[ab[have]].path)
        if name != builtin:
            continue
        entry = config.get(f"{name}_lora")
        if not isinstance(entry, dict):
            raise ExportError(f"builtin adapter {name!r} has LoRA tensors but config.json has no {name}_lora entry "
                              "with its r and lora_alpha", config_path)
        if not modules:
            raise ExportError(f"config.json declares {name}_lora, but the checkpoint has no "
                              f"<module>.lora_A.{name}.weight tensors to merge", config_path)
        r = _number(entry.get("r"), f"{name}_lora.r", config_path, positive=True)
        alpha = _number(entry.get("lora_alpha"), f"{name}_lora.lora_alpha", config_path, positive=False)
        if r != int(r):
            raise ExportError(f"{name}_lora.r must be an integer, not {r!r}", config_path)
        scale = alpha / r
        source = _Source(f"builtin adapter '{name}' of {shards.ckpt}")
        for module, ab in sorted(modules.items()):
            base = next((k for k in (f"{module}.base_layer.weight", f"{module}.weight") if k in shards.owner), None)
            if base is None:
                raise ExportError(f"builtin adapter {name!r} adapts {module!r}, but the checkpoint has neither "
                                  f"{module}.base_layer.weight nor {module}.weight", shards.owner[ab["A"]].path)
            a, b = (shards.owner[ab["A"]], ab["A"]), (shards.owner[ab["B"]], ab["B"])
            _check_pair((shards.owner[base], base), a, b, int(r), False)
            out_tensors[out_names[base]].deltas.append(_Delta(a, b, scale, False))
            source.scales.append(scale)
        sources.append(source)
    dropped = []
    for name in names:
        if name != builtin:
            key = f" and config key {name}_lora" if name in declared else ""
            dropped.append(f"dropped builtin adapter '{name}' ({2 * len(found.get(name, {}))} tensors{key})")
    return sources, dropped, {f"{n}_lora" for n in names if f"{n}_lora" in config}


# -- PEFT adapters -------------------------------------------------------------------------------------------------
def _pattern(patterns: dict, module: str):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module path (on a dot boundary)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _adapter_config(adapter: Path) -> dict:
    cfg_path = adapter / ADAPTER_CONFIG
    cfg = _load_json(cfg_path, ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise ExportError(f"{ADAPTER_CONFIG} must hold a JSON object", cfg_path)

    def refuse(why: str):
        raise ExportError(f"{why}; merge-lora merges plain LoRA adapters only", cfg_path)

    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        refuse(f"peft_type is {peft_type!r}, not LORA")
    if cfg.get("use_dora"):
        refuse("use_dora is set: DoRA rescales each weight column by a learned magnitude, it is not a plain LoRA "
               "delta")
    if cfg.get("bias", "none") != "none":
        refuse(f"bias is {cfg.get('bias')!r}: the adapter trains biases, which merge-lora does not merge")
    if cfg.get("lora_bias"):
        refuse("lora_bias is set: lora_B carries a bias")
    if cfg.get("modules_to_save"):
        refuse(f"modules_to_save is {cfg['modules_to_save']!r}: the adapter replaces whole modules")
    for key, what in (("layer_replication", "it replicates layers"),
                      ("alora_invocation_tokens", "activated LoRA applies only after its invocation tokens"),
                      ("trainable_token_indices", "it trains token embeddings"),
                      ("target_parameters", "it adapts bare parameters (MoE experts)"),
                      ("use_qalora", "QALoRA pools its inputs"),
                      ("monteclora_config", "MonteCLoRA samples its factors"),
                      ("use_bdlora", "block-diagonal LoRA"),
                      ("arrow_config", "Arrow routes between adapters")):
        if cfg.get(key):
            refuse(f"{key} is set ({what})")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), dict):
            raise ExportError(f"{key} must be a JSON object of module pattern -> value", cfg_path)
    _number(cfg.get("r", 8), "r", cfg_path, positive=True)
    _number(cfg.get("lora_alpha", 8), "lora_alpha", cfg_path, positive=False)
    return cfg


def _adapter(adapter: Path, shards: _Shards, out_names: dict[str, str], out_tensors: dict[str, _OutTensor],
             opened: list[SafetensorsFile]) -> _Source:
    cfg = _adapter_config(adapter)
    cfg_path = adapter / ADAPTER_CONFIG
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in adapter.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:
            raise ExportError(f"the adapter's weights are pickled ({', '.join(pickled)}); merge-lora unpickles "
                              f"nothing (unpickling can run arbitrary code). The adapter must be safetensors: "
                              f"{ADAPTER_WEIGHTS} (PEFT's save_pretrained writes it by default).", adapter)
        raise ExportError(f"the adapter directory has no {ADAPTER_WEIGHTS}", adapter)
    sf = SafetensorsFile(weights)
    opened.append(sf)
    modules: dict[str, dict[str, str]] = {}
    names: set[str | None] = set()
    for key in sf.tensors:
        m = _BUILTIN_KEY.match(key) or _UNNAMED_KEY.match(key)
        if m is None:
            raise ExportError(f"tensor {key!r} is not a LoRA factor (<module>.lora_A.weight / .lora_B.weight); "
                              "DoRA magnitudes, LoRA biases, embedding LoRAs, trained tokens and saved modules are "
                              "not merged", weights)
        names.add(m.groupdict().get("name"))
        module = m["module"].removeprefix(_PEFT_PREFIX)
        modules.setdefault(module, {})[m["ab"]] = key
    if len(names) > 1:
        raise ExportError(f"the file holds several adapters ({', '.join(sorted(n or '(unnamed)' for n in names))}); "
                          "give it one adapter", weights)
    if not modules:
        raise ExportError("the adapter holds no LoRA tensors", weights)
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora, transpose = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    source = _Source(str(adapter))
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            have, miss = ("A", "B") if "A" in ab else ("B", "A")
            raise ExportError(f"{ab[have]!r} has no matching lora_{miss} tensor", weights)
        target = f"{module}.weight"
        if target not in out_tensors:
            raise ExportError(f"the adapter adapts module {module!r}, but the checkpoint {shards.ckpt} has no tensor "
                              f"{target!r} to merge it into (an adapter for another model?)", weights)
        r = _pattern(ranks, module)
        r = r0 if r is None else _number(r, f"rank_pattern value for {module}", cfg_path, positive=True)
        alpha = _pattern(alphas, module)
        alpha = alpha0 if alpha is None else _number(alpha, f"alpha_pattern value for {module}", cfg_path,
                                                     positive=False)
        if r != int(r):
            raise ExportError(f"the rank of {module} must be an integer, not {r!r}", cfg_path)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        out = out_tensors[target]
        _check_pair((out.file, out.key), (sf, ab["A"]), (sf, ab["B"]), int(r), transpose)
        out.deltas.append(_Delta((sf, ab["A"]), (sf, ab["B"]), scale, transpose))
        source.scales.append(scale)
    return source


# -- writing -------------------------------------------------------------------------------------------------------
def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_bytes(src: SafetensorsFile, key: str, src_fd: int, dst_fd: int) -> None:
    info = src.tensors[key]
    pos, end = info.start, info.end
    while pos < end:
        n = min(_COPY_CHUNK, end - pos)
        try:
            done = os.copy_file_range(src_fd, dst_fd, n, pos)
        except (AttributeError, OSError):
            done = 0
        if done <= 0:  # not supported here (or a filesystem that declines): plain reads and writes
            chunk = os.pread(src_fd, n, pos)
            if not chunk:
                raise ExportError("was truncated while it was being read", src.path)
            _write_all(dst_fd, chunk)
            done = len(chunk)
        pos += done


def _merged_bytes(t: _OutTensor):
    import torch

    info = t.file.tensors[t.key]
    compute = torch.float64 if info.dtype == "F64" else torch.float32
    w = t.file.view(t.key)
    dtype = w.dtype
    acc = w.to(compute, copy=True)
    t.file.release(t.key)
    for d in t.deltas:
        (af, ak), (bf, bk) = d.a, d.b
        delta = bf.view(bk).to(compute) @ af.view(ak).to(compute)
        af.release(ak)
        bf.release(bk)
        if d.transpose:
            delta = delta.T
        delta.mul_(d.scale)  # (B @ A) * scale, then added: PEFT's order of rounding
        acc.add_(delta)
        del delta
    return acc.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()


def _metadata(sf: SafetensorsFile) -> dict:
    with open(sf.path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(hlen)).get("__metadata__")
    if isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return meta
    return {"format": "pt"}


def _write_shard(path: Path, items: list[_OutTensor], metadata: dict) -> int:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in items:
        info = t.file.tensors[t.key]
        header[t.name] = {"dtype": info.dtype, "shape": list(info.shape),
                          "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    src_fds: dict[Path, int] = {}
    try:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw)
        for t in items:
            interrupts.check()
            if t.deltas:
                _write_all(fd, _merged_bytes(t))
            else:
                if t.file.path not in src_fds:
                    src_fds[t.file.path] = os.open(t.file.path, os.O_RDONLY)
                _copy_bytes(t.file, t.key, src_fds[t.file.path], fd)
        os.fsync(fd)
    finally:
        os.close(fd)
        for sfd in src_fds.values():
            os.close(sfd)
    return offset


def _skipped_file(name: str, used: set[str]) -> bool:
    return (name in used or name == INDEX_NAME or name == "config.json" or name.endswith(_WEIGHT_SUFFIXES)
            or name in _WEIGHT_INDEXES or name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def _publish(tmp: Path, out: Path) -> None:
    with interrupts.deferred():
        try:
            os.rename(tmp, out)  # onto a missing or empty directory
        except OSError as e:
            raise EnvironmentProblem(f"cannot move the merged checkpoint into place ({e.strerror})", out) from None


# -- the command ---------------------------------------------------------------------------------------------------
def merge_lora(ckpt: str | Path, out: str | Path, *, adapter: str | Path | None = None, builtin: str | None = None,
               drop_builtin: bool = False, note: Callable[[str], None] = lambda msg: None) -> MergeResult:
    """Write OUT: CKPT with the chosen LoRA deltas merged into its weights (see the module docstring)."""
    ckpt, out = Path(ckpt), Path(os.path.abspath(out))
    if not ckpt.is_dir():
        raise ExportError("checkpoint directory does not exist or is not a directory", ckpt)
    inputs = [(_real(ckpt), "checkpoint directory")]
    if adapter is not None:
        adapter = Path(adapter)
        if not adapter.is_dir():
            raise ExportError("adapter directory does not exist or is not a directory", adapter)
        inputs.append((_real(adapter), "adapter directory"))
    _check_out(out, inputs)

    config_path = ckpt / "config.json"
    config = _load_json(config_path, "config.json")
    if not isinstance(config, dict):
        raise ExportError("config.json must hold a JSON object", config_path)
    shards = _Shards(ckpt)
    opened: list[SafetensorsFile] = []
    try:
        # output name of every checkpoint tensor but the LoRA factors (wrappers' `.base_layer.` dropped)
        out_names = {key: key.replace(".base_layer.", ".") for key in shards.owner
                     if not (_BUILTIN_KEY.match(key) or _UNNAMED_KEY.match(key))}
        out_tensors: dict[str, _OutTensor] = {}
        for key, name in sorted(out_names.items()):
            if name in out_tensors:
                raise ExportError(f"tensors {out_tensors[name].key!r} and {key!r} would both be written as {name!r}",
                                  shards.ckpt)
            out_tensors[name] = _OutTensor(name, shards.owner[key], key)
        sources, dropped, config_drop = _builtin(shards, config, config_path, out_names, out_tensors, builtin,
                                                 drop_builtin)
        if adapter is not None:
            sources.append(_adapter(adapter, shards, out_names, out_tensors, opened))
        if not sources and not dropped:
            raise ExportError("nothing to merge: give a PEFT adapter with --adapter DIR (or --builtin NAME for a "
                              "checkpoint that carries its own adapters)", ckpt)
        _write(ckpt, out, shards, config, config_drop, out_names, out_tensors, note)
        for sf in [sf for _, sf in shards.files] + opened:
            sf.check_unchanged()
    finally:
        shards.close()
        for sf in opened:
            sf.close()
    for line in dropped:
        note(line)
    return MergeResult(out, sources, dropped)


def _write(ckpt: Path, out: Path, shards: _Shards, config: dict, config_drop: set[str], out_names: dict[str, str],
           out_tensors: dict[str, _OutTensor], note: Callable[[str], None]) -> None:
    plan = []  # (input shard file, tensors it contributes)
    for _, sf in shards.files:
        items = [out_tensors[out_names[k]] for k in shards.ordered(sf) if k in out_names]
        if items:
            plan.append((sf, items))
    if len(plan) > 1 or shards.sharded:
        names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    else:
        names = ["model.safetensors"]
    used = {name for name, _ in shards.files}
    others = sorted(p for p in ckpt.iterdir() if not p.is_dir())
    copies = [p for p in others if not _skipped_file(p.name, used)]
    clash = sorted({p.name for p in copies} & (set(names) | {INDEX_NAME}))
    if clash:
        raise ExportError(f"the checkpoint has a file named {clash[0]!r}, which the merged checkpoint writes itself; "
                          "remove or rename it", ckpt / clash[0])
    skipped = [p.name for p in others if _skipped_file(p.name, used) and p.name not in used
               and p.name not in (INDEX_NAME, "config.json")]
    subdirs = sorted(p.name + "/" for p in ckpt.iterdir() if p.is_dir())

    made: list[Path] = []  # parents created for OUT, removed again on failure
    parent = out.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    tmp = out.parent / f".{out.name}.merge-partial-{os.getpid()}"
    try:
        for d in reversed(made):
            d.mkdir()
        tmp.mkdir()
        weight_map, total, params = {}, 0, 0
        for name, (sf, items) in zip(names, plan):
            total += _write_shard(tmp / name, items, _metadata(sf))
            for t in items:
                weight_map[t.name] = name
                params += t.file.tensors[t.key].numel
        if len(names) > 1 or shards.sharded:
            index = {"metadata": {"total_parameters": params, "total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if config_drop:
            merged = {k: v for k, v in config.items() if k not in config_drop}
            (tmp / "config.json").write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(ckpt / "config.json", tmp / "config.json")
        for p in copies:
            interrupts.check()
            shutil.copy2(p, tmp / p.name)  # follows symlinks (HF cache snapshots)
        interrupts.check()
        for sf, _ in plan:
            sf.check_unchanged()
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    if skipped:
        note(f"not copied (weights in other formats, or an adapter): {', '.join(skipped)}")
    if subdirs:
        note(f"not copied (subdirectories): {', '.join(subdirs)}")
