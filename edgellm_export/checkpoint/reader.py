"""A checkpoint directory: config.json, safetensors shards, canonical tensor names.

Canonical names drop the wrapper prefixes HF uses (`model.`, `language_model.`,
PEFT `.base_layer.`), so model code asks for `layers.0.self_attn.q_proj.weight`,
`embed_tokens.weight`, `norm.weight`, `lm_head.weight` whatever the checkpoint
calls them. Fused tensors (`qkv_proj`, `gate_up_proj`) are exposed as row
slices of the fused tensor once the model family declares how to split them.
Nothing is read until a tensor is asked for.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgellm_core.errors import ExportError
from edgellm_core.safetensors_file import SafetensorsFile, TensorInfo

from .pickled import convert_pickled

INDEX_NAME = "model.safetensors.index.json"
# backbone: Nemotron-H; thinker: Qwen3-ASR / Qwen3-Omni (`thinker.model.layers.*`, `thinker.audio_tower.*`)
_WRAPPERS = ("language_model", "text_model", "llm", "model", "transformer", "backbone", "thinker")
_LAYER_RE = re.compile(r"^layers\.\d+\.")


@dataclass(frozen=True)
class TensorRef:
    """A tensor in the checkpoint, optionally a row range of a fused tensor."""

    file: SafetensorsFile
    key: str  # key inside the file
    rows: tuple[int, int] | None = None

    @property
    def info(self) -> TensorInfo:
        return self.file.tensors[self.key]

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.info.shape
        if self.rows is None:
            return shape
        return (self.rows[1] - self.rows[0], *shape[1:])

    @property
    def nbytes(self) -> int:
        n = self.info.nbytes
        if self.rows is not None and self.info.shape[0]:
            n = n // self.info.shape[0] * (self.rows[1] - self.rows[0])
        return n

    def view(self):
        """Zero-copy torch view over the mapped file; call release() when done."""
        t = self.file.view(self.key)
        if self.rows is not None:
            t = t[self.rows[0] : self.rows[1]]
        return t

    def release(self) -> None:
        self.file.release(self.key)

    def release_rows(self, start: int, end: int) -> None:
        """Drop the mapped pages of rows [start, end) (relative to this ref)."""
        info = self.info
        if not info.shape or not info.shape[0]:
            self.file.release(self.key)
            return
        base = self.rows[0] if self.rows else 0
        row_bytes = info.nbytes // info.shape[0]
        self.file.release_range(info.start + (base + start) * row_bytes, info.start + (base + end) * row_bytes)

    def where(self) -> str:
        return f"{self.file.path.name}:{self.key}"


def load_json(path: Path, what: str, missing: str = "is missing"):
    """A JSON file, or an ExportError naming it (missing, unreadable, not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{what} {missing}", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{what} is not valid JSON ({e})", path) from None
    except OSError as e:
        raise ExportError(f"cannot read {what} ({e.strerror})", path) from None


def canonical_name(raw: str) -> str:
    """Strip wrapper prefixes and PEFT's `.base_layer.` from a checkpoint key."""
    name = raw.replace(".base_layer.", ".")
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return ".".join(parts)


class Checkpoint:
    """Config and lazily read tensors of one HuggingFace checkpoint directory."""

    def __init__(self, path: Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._scratch: tempfile.TemporaryDirectory | None = None
        if not self.path.is_dir():
            raise ExportError("checkpoint directory does not exist or is not a directory", path)
        self.config_path = self.path / "config.json"
        self.config = self._load_json(self.config_path, "config.json")
        if not isinstance(self.config, dict):
            raise ExportError("config.json must hold a JSON object", self.config_path)
        self.files: dict[str, SafetensorsFile] = {}
        self._refs: dict[str, TensorRef] = {}
        self._open_shards()

    # -- loading ---------------------------------------------------------------------------
    def _load_json(self, path: Path, what: str):
        return load_json(path, what, missing="is missing from the checkpoint directory")

    def _shard_path(self, name: str, index_path: Path) -> Path:
        # Names come from an untrusted index: plain relative names only. The file
        # itself may be a symlink (HF cache snapshots point into ../../blobs).
        norm = os.path.normpath(name)
        if not name or os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
            raise ExportError(
                f"the index names shard {name!r}, a path outside the checkpoint directory; "
                "refusing to read it",
                index_path,
            )
        path = self.path / norm
        if not path.exists():
            raise ExportError(
                f"the index names shard {name!r} but that file is missing (or a broken symlink) "
                "in the checkpoint directory",
                index_path,
            )
        return path

    def _open_shards(self) -> None:
        index_path = self.path / INDEX_NAME
        weight_map: dict[str, str] | None = None
        if index_path.exists():
            index = self._load_json(index_path, INDEX_NAME)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ExportError("the index has no 'weight_map' of tensor -> shard names", index_path)
            shard_names = sorted(set(weight_map.values()))
            paths = {n: self._shard_path(n, index_path) for n in shard_names}
        elif (self.path / "model.safetensors").exists():
            paths = {"model.safetensors": self.path / "model.safetensors"}
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            paths = {}
            if not found:
                pickled = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
                    p.name for p in self.path.glob("*.pt")
                )
                pickled = [n for n in pickled if n != "training_args.bin"]  # trainer state, not weights
                if pickled and self.allow_pickle:
                    self._scratch = tempfile.TemporaryDirectory(prefix="edgellm-unpickled-")
                    paths = convert_pickled([self.path / n for n in pickled], Path(self._scratch.name))
                    pickled = []
                if pickled:
                    raise ExportError(
                        f"the checkpoint has only pickled weights ({', '.join(pickled[:3])}); "
                        "edgellm-export does not unpickle checkpoint files by default because that can "
                        "run arbitrary code. Convert them to safetensors first (for example with "
                        "transformers' save_pretrained(safe_serialization=True)), or pass "
                        "--convert-pickle to load them with torch's weights-only unpickler.",
                        self.path,
                    )
                if not paths:
                    raise ExportError("no *.safetensors weight files in the checkpoint directory", self.path)
            else:
                paths = {n: self.path / n for n in found}
        for name, p in paths.items():
            self.files[name] = SafetensorsFile(p)
        raw_to_file: dict[str, str] = {}
        for fname, sf in self.files.items():
            for key in sf.tensors:
                raw_to_file.setdefault(key, fname)
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self.files[fname].tensors:
                    raise ExportError(
                        f"the index says tensor {key!r} is in {fname!r}, but that shard "
                        "does not contain it",
                        index_path,
                    )
                raw_to_file[key] = fname
        for raw in sorted(raw_to_file):
            canon = canonical_name(raw)
            ref = TensorRef(self.files[raw_to_file[raw]], raw)
            prev = self._refs.get(canon)
            if prev is not None:
                raise ExportError(
                    f"tensors {prev.key!r} and {raw!r} both map to {canon!r} after "
                    "stripping wrapper prefixes; the checkpoint is ambiguous",
                    self.path,
                )
            self._refs[canon] = ref

    # -- access ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._refs)

    def has(self, name: str) -> bool:
        return name in self._refs

    def has_layer_tensor(self, suffix: str) -> bool:
        """Any decoder layer has a tensor whose name ends with `suffix`."""
        return any(_LAYER_RE.match(n) and n.endswith(suffix) for n in self._refs)

    def ref(self, name: str) -> TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            raise ExportError(
                f"tensor {name!r} is missing from the checkpoint's safetensors files "
                f"({', '.join(sorted(self.files))})",
                self.path,
            ) from None

    def rename(self, old: str, new: str) -> None:
        """Expose tensor `old` under the canonical name `new` (a family's weight-name mapping); messages
        still name the file's own key."""
        ref = self._refs.pop(old, None)
        if ref is None:
            return
        if new in self._refs:
            raise ExportError(f"tensors {self._refs[new].key!r} and {ref.key!r} both map to {new!r}; the "
                              "checkpoint is ambiguous", self.path)
        self._refs[new] = ref

    def split_fused(self, fused: str, parts: list[tuple[str, int]], *, keep: bool = True) -> None:
        """Expose row slices of `fused` under the names in `parts` (name, rows); `keep=False` retires the fused
        name (a family that reads only the parts, and checks every remaining tensor is read)."""
        if fused not in self._refs:
            return
        base = self._refs[fused] if keep else self._refs.pop(fused)
        total = sum(rows for _, rows in parts)
        if base.shape[0] != total:
            raise ExportError(
                f"fused tensor {base.key!r} has {base.shape[0]} rows but the config implies "
                f"{total} ({' + '.join(f'{n.rsplit(chr(46), 2)[-2]}={r}' for n, r in parts)})",
                base.file.path,
            )
        start = 0
        for name, rows in parts:
            self._refs[name] = TensorRef(base.file, base.key, (start, start + rows))
            start += rows

    def check_unchanged(self) -> None:
        """Refuse if any shard changed while it was being read (the output would mix versions)."""
        for sf in self.files.values():
            sf.check_unchanged()

    def close(self) -> None:
        for sf in self.files.values():
            sf.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    return Checkpoint(Path(path), allow_pickle=allow_pickle)
