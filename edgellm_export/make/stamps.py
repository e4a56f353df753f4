"""Stage stamps for the make-style pipeline: redo a stage only when its inputs or its outputs changed.

A stage's fingerprint is sha256 over the canonical JSON of: the stage name, the tool version, its options
(canonical JSON: sorted keys, no whitespace), the upstream stage's token, and the sha256 of every input
file with its path relative to its input root. Content, not metadata, decides: size + mtime cannot be
trusted (a byte rewritten in place and `touch -d` / os.utime put back gives the same size and mtime).

Reading a 15 GiB checkpoint on every run is what a make command must avoid, so digests are cached in the
stamp by `digests.DigestCache` (keyed on path, device, inode, size, mtime_ns and ctime_ns; racy entries
are read again). A file that changes while it is being hashed is an error rather than a guess.

Stamps live in DIR/.stamps/<stage>.json. DIR must not be an export directory (OUT is replaced whole by
each export and its manifest would list the stamps), so a pipeline keeps OUT as a subdirectory of DIR.
Recorded outputs are checked too: an output deleted, altered or joined by an extra file by hand makes
the stage stale. Hidden files (".*") in input directories are not inputs (e.g. huggingface_hub's .cache).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePath

from edgellm_core.digests import RACY_WINDOW_NS, DigestCache
from edgellm_core.errors import ExportError

from .. import __version__

log = logging.getLogger(__name__)

STAMPS_DIR = ".stamps"
STAMP_FORMAT = 1
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def canonical_json(obj) -> str:
    """Key order and whitespace never change a fingerprint; paths become POSIX strings, dataclasses dicts,
    tuples lists. Anything else that JSON cannot hold is an error, not a repr()."""

    def default(o):
        if isinstance(o, PurePath):
            return o.as_posix()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, set | frozenset):
            return sorted(o)
        raise TypeError(f"stage options must be JSON data; {type(o).__name__} is not")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=default)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for a file or every non-hidden regular file under a directory.
    Symlinks are followed (HF cache snapshots are symlinks into blobs/), each real directory once."""
    root = Path(root)
    if root.is_file():
        return {root.name: root}
    if not root.is_dir():
        raise ExportError("is an input of the pipeline but does not exist", root)
    out: dict[str, Path] = {}
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = Path(dirpath) / name
            if f.is_file():
                out[f.relative_to(root).as_posix()] = f
    return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    stage: str
    digest: str
    parts: dict  # what the digest was computed over; kept in the stamp to explain why a stage is stale

    def __str__(self) -> str:
        return self.digest


def _check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE.match(stage):
        raise ValueError(f"stage name {stage!r} must be letters, digits, '.', '_' or '-' (it names a file)")
    return stage


def fingerprint(stage: str, *, inputs: Mapping[str, str | Path] | None = None, options=None,
                tool_version: str = __version__, upstream: str | None = None,
                cache: DigestCache | None = None) -> Fingerprint:
    """`inputs`: label -> file or directory (e.g. {"checkpoint": ckpt_dir}); `options`: JSON data, e.g.
    the export options; `upstream`: StampStore.upstream(previous_stage), None for the first stage."""
    _check_stage(stage)
    cache = cache if cache is not None else DigestCache()
    files = {}
    for label, root in sorted((inputs or {}).items()):
        files[label] = {rel: cache.digest(f) for rel, f in input_files(Path(root)).items()}
    parts = {"format": STAMP_FORMAT, "stage": stage, "tool_version": tool_version,
             "options": json.loads(canonical_json(options)), "upstream": upstream, "inputs": files}
    return Fingerprint(stage, _sha(canonical_json(parts)), parts)


def _explain(old: Mapping, new: Mapping) -> str:
    """Why two fingerprints' parts differ, in words."""
    reasons = []
    if old.get("tool_version") != new.get("tool_version"):
        reasons.append(f"tool version {old.get('tool_version')} -> {new.get('tool_version')}")
    if old.get("options") != new.get("options"):
        o, n = old.get("options"), new.get("options")
        if isinstance(o, dict) and isinstance(n, dict):
            keys = sorted(k for k in set(o) | set(n) if o.get(k, ...) != n.get(k, ...))
            reasons.append(f"options changed ({', '.join(keys)})")
        else:
            reasons.append("options changed")
    if old.get("upstream") != new.get("upstream"):
        reasons.append("the upstream stage changed")
    old_in, new_in = old.get("inputs") or {}, new.get("inputs") or {}
    for label in sorted(set(old_in) | set(new_in)):
        o, n = old_in.get(label) or {}, new_in.get(label) or {}
        changed = sorted(k for k in set(o) & set(n) if o[k] != n[k])
        added, removed = sorted(set(n) - set(o)), sorted(set(o) - set(n))
        for what, names in (("changed", changed), ("added", added), ("removed", removed)):
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                reasons.append(f"{label} file(s) {what}: {', '.join(names[:3])}{more}")
    return "; ".join(reasons) or "fingerprint changed"


class StampStore:
    """DIR/.stamps/<stage>.json for the stages of one pipeline directory."""

    def __init__(self, root: str | Path, *, racy_window_ns: int = RACY_WINDOW_NS,
                 clock: Callable[[], int] = time.time_ns):
        self.root = Path(root).absolute()
        self.dir = self.root / STAMPS_DIR
        self._racy = racy_window_ns
        self._clock = clock
        self._caches: dict[str, DigestCache] = {}

    def path(self, stage: str) -> Path:
        return self.dir / f"{_check_stage(stage)}.json"

    def load(self, stage: str) -> dict | None:
        """The stage's stamp, or None if there is none or it is unreadable (then the stage just reruns)."""
        path = self.path(stage)
        try:
            stamp = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable stamp (%s); the stage will run again", path, e)
            return None
        if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT or stamp.get("stage") != stage:
            log.warning("%s: not a stamp of this tool's format; the stage will run again", path)
            return None
        return stamp

    def digest_cache(self, stage: str) -> DigestCache:
        """A digest cache seeded from the stage's last stamp: unchanged input files are not read again."""
        stamp = self.load(stage) or {}
        return DigestCache(stamp.get("input_digests") if isinstance(stamp.get("input_digests"), dict) else None,
                           racy_window_ns=self._racy, clock=self._clock)

    def fingerprint(self, stage: str, **kwargs) -> Fingerprint:
        """fingerprint() with this store's cached input digests for the stage; record() stores them back."""
        self._caches[stage] = kwargs.setdefault("cache", self.digest_cache(stage))
        return fingerprint(stage, **kwargs)

    # ------------------------------------------------------------ queries

    def why_stale(self, stage: str, fp: Fingerprint, *, force: bool = False) -> str | None:
        """None when the stage is up to date, else the reason in words. May refresh the stamp's cached
        output digests (never its fingerprint) after re-reading outputs that had been written recently."""
        if force:
            return "forced"
        stamp = self.load(stage)
        if stamp is None:
            return "no stamp (never run, or its stamp is unreadable)"
        if stamp.get("fingerprint") != fp.digest:
            return _explain(stamp.get("parts") or {}, fp.parts)
        return self._outputs_changed(stage, stamp)

    def _outputs_changed(self, stage: str, stamp: dict) -> str | None:
        recorded = stamp.get("outputs") or {}
        declared, files = recorded.get("declared"), recorded.get("files")
        if not isinstance(declared, list) or not isinstance(files, dict):
            return "the stamp lists no outputs"
        try:
            current = self._expand(declared)
        except ExportError as e:
            return f"an output is missing ({e.path})"
        missing = sorted(set(files) - set(current))
        if missing:
            return f"output(s) deleted: {', '.join(missing[:3])}"
        extra = sorted(set(current) - set(files))
        if extra:
            return f"file(s) added to the outputs: {', '.join(extra[:3])}"
        cache = DigestCache({os.path.abspath(current[rel]): e for rel, e in files.items() if isinstance(e, dict)},
                            racy_window_ns=self._racy, clock=self._clock)
        for rel, path in current.items():
            try:
                if cache.digest(path) != files[rel].get("sha256"):
                    return f"output altered since it was written: {rel}"
            except (OSError, ExportError) as e:
                return f"output unreadable or changing: {rel} ({e})"
        if cache.hashed:  # re-read racy entries: keep the fresh ones so the next check is cheap
            stamp["outputs"]["files"] = {rel: cache.entries[os.path.abspath(p)] for rel, p in current.items()}
            self._write(stage, stamp)
        return None

    def upstream(self, stage: str) -> str | None:
        """The token a downstream stage puts into its fingerprint: the stage's fingerprint and the digests
        of its recorded outputs, so that downstream reruns if upstream's outputs differ even where its
        inputs did not (a nondeterministic step, a hand-restored output). None if the stage has no stamp."""
        stamp = self.load(stage)
        if stamp is None:
            return None
        files = (stamp.get("outputs") or {}).get("files") or {}
        outs = {rel: e.get("sha256") for rel, e in sorted(files.items()) if isinstance(e, dict)}
        return _sha(canonical_json({"fingerprint": stamp.get("fingerprint"), "outputs": outs}))

    # ------------------------------------------------------------ updates

    def record(self, stage: str, fp: Fingerprint, outputs: Iterable[str | Path], *,
               cache: DigestCache | None = None, known_digests: Mapping[str, str] | None = None) -> Path:
        """After the stage succeeded: store its fingerprint, the input digests `cache` holds (the one the
        fingerprint was computed with; StampStore.fingerprint's is the default), and the digest of every
        output file. `outputs` are files or directories, relative to DIR or absolute; `known_digests`
        (output-relative path -> sha256, e.g. from the export's manifest.json) saves reading outputs that
        were just written."""
        if fp.stage != stage:
            raise ValueError(f"fingerprint is for stage {fp.stage!r}, not {stage!r}")
        cache = cache if cache is not None else self._caches.get(stage)
        declared = [self._rel(Path(o)) for o in outputs]
        current = self._expand(declared)
        out_cache = DigestCache(racy_window_ns=self._racy, clock=self._clock)
        known = dict(known_digests or {})
        files = {}
        for rel, path in current.items():
            out_cache.digest(path, known=known.get(rel))
            files[rel] = out_cache.entries[os.path.abspath(path)]
        stamp = {
            "format": STAMP_FORMAT,
            "stage": stage,
            "fingerprint": fp.digest,
            "parts": fp.parts,
            "tool_version": fp.parts.get("tool_version"),
            "recorded": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "outputs": {"declared": declared, "files": files},
            "input_digests": cache.to_json() if cache is not None else {},
        }
        return self._write(stage, stamp)

    def invalidate(self, stage: str) -> None:
        """Forget the stage (call before running it, so a crash midway leaves it stale)."""
        try:
            self.path(stage).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ helpers

    def _rel(self, p: Path) -> str:
        p = p if p.is_absolute() else self.root / p
        p = Path(os.path.abspath(p))
        if p == self.root or p == self.dir or self.dir in p.parents or p in self.dir.parents:
            raise ValueError(f"{p}: a stage output cannot be the pipeline directory or its stamps")
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return p.as_posix()

    def _expand(self, declared: list[str]) -> dict[str, Path]:
        """Output-relative path -> file for every file of the declared outputs (hidden files included:
        an output is checked exactly)."""
        out: dict[str, Path] = {}
        for d in declared:
            p = Path(d) if Path(d).is_absolute() else self.root / d
            if p.is_file():
                out[d] = p
            elif p.is_dir():
                for dirpath, _, filenames in os.walk(p):
                    for name in filenames:
                        f = Path(dirpath) / name
                        out[f"{d}/{f.relative_to(p).as_posix()}"] = f
            else:
                raise ExportError("is a declared output of the stage but does not exist", p)
        return dict(sorted(out.items()))

    def _write(self, stage: str, stamp: dict) -> Path:
        path = self.path(stage)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
