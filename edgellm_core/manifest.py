"""manifest.json: sha256 of every file of an export, checked before validation trusts it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from edgellm_core import __version__
from edgellm_core.digests import DigestCache, sha256_file
from edgellm_core.errors import ExportError

MANIFEST = "manifest.json"
# Written later by `edgellm validate` into the same directory; not part of the artifact.
NOT_COVERED = {MANIFEST, "validation.json"}
CACHE_ENV = "EDGELLM_CACHE_DIR"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in NOT_COVERED)


def write_manifest(root: Path, known: dict[str, str] | None = None, checkpoint: dict | None = None) -> Path:
    """Digest every file under `root`; `known` holds digests computed while writing. `checkpoint`: where a
    hub checkpoint came from ({"repo_id", "commit"}), recorded as the manifest's `checkpoint`."""
    known = known or {}
    files = {}
    for p in _files(root):
        rel = p.relative_to(root).as_posix()
        files[rel] = {"sha256": known.get(rel) or sha256_file(p), "size": p.stat().st_size}
    doc = {"format": 1, "tool": f"edgellm-export {__version__}", "files": files}
    if checkpoint is not None:
        doc["checkpoint"] = dict(checkpoint)
    path = root / MANIFEST
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def verified_record(root: Path) -> Path:
    """Where `verify_manifest` remembers what it hashed for the export at `root`: a per-user cache
    ($EDGELLM_CACHE_DIR, else $XDG_CACHE_HOME/edgellm, else ~/.cache/edgellm), never inside the export,
    which stays exactly what was exported (a make pipeline checks that it does)."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgellm"
    key = hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:32]
    return Path(base) / "verified" / f"{key}.json"


def _load_cache(root: Path, manifest_digest: str) -> DigestCache:
    try:
        rec = json.loads(verified_record(root).read_text())
    except (OSError, ValueError):
        rec = None
    if not isinstance(rec, dict) or rec.get("manifest_sha256") != manifest_digest:
        rec = {}
    return DigestCache(rec.get("files") if isinstance(rec.get("files"), dict) else None)


def _save_cache(root: Path, manifest_digest: str, cache: DigestCache) -> None:
    """Best effort: without a writable cache directory the export is just hashed again next time."""
    path = verified_record(root)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"export": str(Path(root).absolute()), "manifest_sha256": manifest_digest,
                                   "files": cache.to_json()}, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def verify_manifest(root: Path) -> None:
    """Raise ExportError naming the first file that is missing, extra-short or altered.

    Hashing a whole export takes seconds for 1B and minutes for 8B on a board's
    eMMC, so digests are cached per user (`verified_record`, a DigestCache): a
    file whose stat() is unchanged since it last hashed correctly is not read
    again. `edgellm validate --no-verify` skips this check altogether.
    """
    path = root / MANIFEST
    try:
        raw = path.read_bytes()
        listed = json.loads(raw)["files"]
    except FileNotFoundError:
        raise ExportError("the export has no manifest.json, so its files cannot be trusted; re-export it",
                          path) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"manifest.json is unreadable ({e}); re-export", path) from None
    digest = hashlib.sha256(raw).hexdigest()
    cache = _load_cache(root, digest)
    for rel, meta in sorted(listed.items()):
        f = root / rel
        if not f.is_file():
            raise ExportError("is listed in manifest.json but missing from the export", f)
        if f.stat().st_size != meta["size"]:
            raise ExportError(f"has {f.stat().st_size} bytes but manifest.json says {meta['size']}: "
                              "the export is truncated or altered", f)
        if cache.digest(f) != meta["sha256"]:
            raise ExportError("does not match its sha256 in manifest.json: the export was altered or "
                              "corrupted after it was written", f)
    unlisted = [p.relative_to(root).as_posix() for p in _files(root)
                if p.relative_to(root).as_posix() not in listed]
    if unlisted:
        raise ExportError(f"files not in manifest.json were added to the export: {', '.join(unlisted[:5])}",
                          root)
    if cache.hashed:
        _save_cache(root, digest, cache)
