"""manifest.json: sha256 of every file of an export, checked before validation trusts it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import __version__
from .errors import ExportError

MANIFEST = "manifest.json"
# Written later by `edgellm validate` into the same directory; not part of the artifact.
NOT_COVERED = {MANIFEST, "validation.json"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in NOT_COVERED)


def write_manifest(root: Path, known: dict[str, str] | None = None) -> Path:
    """Digest every file under `root`; `known` holds digests computed while writing."""
    known = known or {}
    files = {}
    for p in _files(root):
        rel = p.relative_to(root).as_posix()
        files[rel] = {"sha256": known.get(rel) or sha256_file(p), "size": p.stat().st_size}
    path = root / MANIFEST
    path.write_text(json.dumps({"format": 1, "tool": f"edgellm-export {__version__}", "files": files},
                               indent=1, sort_keys=True) + "\n")
    return path


def verify_manifest(root: Path) -> None:
    """Raise ExportError naming the first file that is missing, extra-short or altered."""
    path = root / MANIFEST
    try:
        listed = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        raise ExportError("the export has no manifest.json, so its files cannot be trusted; re-export it",
                          path) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"manifest.json is unreadable ({e}); re-export", path) from None
    for rel, meta in sorted(listed.items()):
        f = root / rel
        if not f.is_file():
            raise ExportError("is listed in manifest.json but missing from the export", f)
        if f.stat().st_size != meta["size"]:
            raise ExportError(f"has {f.stat().st_size} bytes but manifest.json says {meta['size']}: "
                              "the export is truncated or altered", f)
        if sha256_file(f) != meta["sha256"]:
            raise ExportError("does not match its sha256 in manifest.json: the export was altered or "
                              "corrupted after it was written", f)
    unlisted = [p.relative_to(root).as_posix() for p in _files(root)
                if p.relative_to(root).as_posix() not in listed]
    if unlisted:
        raise ExportError(f"files not in manifest.json were added to the export: {', '.join(unlisted[:5])}",
                          root)
