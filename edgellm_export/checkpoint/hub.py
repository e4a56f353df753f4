"""Checkpoints named by HuggingFace hub id (`owner/name`), resolved through the local HF cache first.

Rules (`parse_checkpoint`): an existing local path always wins, whatever it looks like (a directory
called `Qwen/Qwen3-0.6B` is a directory); something shaped like `owner/name` that is not a local path is a
hub id; anything else is a local path (whose absence the checkpoint reader reports).

Resolution (`resolve_checkpoint`) is offline-first: the cache (HF_HUB_CACHE, else HF_HOME/hub, else the
default) is asked first, with huggingface_hub.snapshot_download(local_files_only=True), for the revision
(a branch or tag through refs/<revision>, a full commit hash through snapshots/<hash>); only when the
snapshot is not there, or lacks files the exporter needs, and HF_HUB_OFFLINE is not set, is the hub asked.
Only what the exporter reads is ever fetched (METADATA_PATTERNS, then the weight shards the index lists,
else model.safetensors, else the top-level *.safetensors): never pickled weights or code. Environment
variables are read when a checkpoint is resolved, not when huggingface_hub was imported, so a process
that changes them (a test, a long-lived tool) gets what they say now.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgellm_core.errors import ExportError

from .reader import INDEX_NAME

# Everything the exporter reads besides the weights (checkpoint/reader.py, quant/plan.py,
# sidecars/tokenizer_files.py, sidecars/chat_template.py); a pattern matching nothing is fine.
METADATA_PATTERNS = (
    "config.json", "generation_config.json", "hf_quant_config.json", INDEX_NAME,
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json",
)
# What the fetch advice names (hf download --include ...): a superset that is easy to type.
FETCH_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "chat_template.jinja")
DEFAULT_REVISION = "main"
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_PART}/{_PART}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` as the hub spells repository ids (no `--` or `..`, no trailing `.git`)."""
    return bool(_HUB_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


@dataclass(frozen=True)
class HubId:
    """A checkpoint to be found by repository id; `revision` None means the default branch."""

    repo_id: str
    revision: str | None = None
    local: Path | None = field(default=None, compare=False)  # the local path that was looked at and is absent

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[1]

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint directory to read, and where it came from: for a hub id, the repository, the revision
    asked for and the commit whose cached snapshot `path` is."""

    path: Path
    hub: HubId | None = None
    commit: str | None = None

    def record(self) -> dict | None:
        """For reports: None for a local directory."""
        if self.hub is None:
            return None
        return {"repo_id": self.hub.repo_id, "revision": self.hub.revision or DEFAULT_REVISION,
                "commit": self.commit, "snapshot": str(self.path)}

    def identity(self) -> dict | None:
        """What the export's manifest.json records and make's export stamp keys on: the repository and the
        commit (not the revision's spelling: `main` and its commit hash are the same snapshot)."""
        if self.hub is None:
            return None
        return {"repo_id": self.hub.repo_id, "commit": self.commit}


def _check_revision(revision: str) -> str:
    bad = (not revision or revision != revision.strip() or revision.startswith(("-", "/")) or ".." in revision
           or "\\" in revision or any(c.isspace() or ord(c) < 32 for c in revision))
    if bad:
        raise ExportError(f"revision {revision!r} is not a branch, tag or commit hash name")
    return revision


def parse_checkpoint(text: str | Path, revision: str | None = None, *, base: Path | None = None) -> Path | HubId:
    """A local path or a hub id, by the rules above (no cache or network access). `base`: the directory
    relative paths are relative to (a suite file's), else the working directory."""
    raw = str(text)
    if revision is not None:
        _check_revision(revision)
    local = Path(os.path.expanduser(raw))
    if base is not None and not local.is_absolute():
        local = Path(base) / local
    if os.path.lexists(local):
        if revision is not None:
            raise ExportError(f"a revision ({revision}) applies to a hub id only, and {raw} is a local path (an "
                              "existing path always wins over a hub id); drop the revision, or name the id "
                              "from a directory where no such path exists")
        return local
    if looks_like_hub_id(raw):
        return HubId(raw, revision, local=local.absolute())
    if revision is not None:
        raise ExportError(f"a revision ({revision}) applies to a hub id (owner/name) only, and {raw} is neither "
                          "that nor an existing local path")
    return local


def resolve_checkpoint(spec: str | Path | HubId | CheckpointRef, *, progress=None) -> CheckpointRef:
    """The directory to export: a local path as it is; a hub id through the cache, else the hub."""
    if isinstance(spec, CheckpointRef):
        return spec
    if isinstance(spec, str):
        spec = parse_checkpoint(spec)
    if isinstance(spec, HubId):
        return _resolve_hub(spec, progress or (lambda msg, done=None, total=None: None))
    return CheckpointRef(Path(spec))


# ---------------------------------------------------------------- environment


def hub_cache_dir() -> tuple[Path, str]:
    """(cache directory, what chose it), by huggingface_hub's rules, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var]))), f"set by {var}"
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub", "HF_HOME/hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub", "the default, as HF_HOME and HF_HUB_CACHE are unset"


def offline_mode() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE


# ---------------------------------------------------------------- resolution


def _resolve_hub(hub: HubId, progress) -> CheckpointRef:
    cache, cache_from = hub_cache_dir()
    revision = hub.revision or DEFAULT_REVISION
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise ExportError(f"{hub.repo_id} is not a local directory, so it names a hub checkpoint, and reading "
                          "those needs huggingface_hub, which is not installed (pip install huggingface_hub)") \
            from None
    snapshot, problem = _cached(hub, revision, cache)
    if snapshot is not None and problem is None:
        progress(f"{hub.repo_id}: cached snapshot {snapshot.name} ({revision}) in {cache}")
        return CheckpointRef(snapshot, hub, snapshot.name)
    if offline_mode():
        raise _unavailable(hub, revision, cache, cache_from, problem,
                           "HF_HUB_OFFLINE is set, so the hub was not asked")
    progress(f"{hub.repo_id}: {problem or 'not in the cache'}; fetching {revision} into {cache}")
    snapshot = _download(hub, revision, cache, cache_from, problem, quiet=getattr(progress, "quiet", False))
    missing = _missing(snapshot)
    if missing:
        raise _unavailable(hub, revision, cache, cache_from, f"snapshot {snapshot.name} lacks {_names(missing)}",
                           "the hub did not provide them")
    return CheckpointRef(snapshot, hub, snapshot.name)


def _snapshot(folder: str, cache: Path, hub: HubId) -> Path:
    """The snapshot directory, checked to be <cache>/models--owner--name/snapshots/<commit hash>."""
    path = Path(folder)
    expected = cache.resolve() / ("models--" + hub.repo_id.replace("/", "--")) / "snapshots"
    if not _COMMIT.match(path.name) or path.parent.resolve() != expected:
        raise ExportError(f"the hub cache gave {path} for {hub}, which is not a snapshot directory "
                          f"({expected}/<commit hash>); the cache is damaged", cache)
    return path


def _cached(hub: HubId, revision: str, cache: Path) -> tuple[Path | None, str | None]:
    """(snapshot, None) when the cache holds everything the export needs; (snapshot or None, what is
    missing) otherwise. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(hub.repo_id, revision=revision, cache_dir=str(cache), local_files_only=True,
                                   allow_patterns=list(METADATA_PATTERNS))
    except LocalEntryNotFoundError as e:
        # IncompleteSnapshotError (a subclass) names a snapshot that lacks some of the optional metadata its
        # cached file listing names (a generation_config.json, say): it is used if it holds what the export
        # needs; the exporter's own warnings name a missing tokenizer or chat template.
        folder = getattr(e, "snapshot_path", None)
        if not folder:
            return None, None
    snapshot = _snapshot(folder, cache, hub)
    missing = _missing(snapshot)
    if missing:
        return snapshot, f"snapshot {snapshot.name} lacks {_names(missing)}"
    return snapshot, None


def _missing(snapshot: Path) -> list[str]:
    """Files the export needs that the snapshot lacks (a broken symlink counts as missing). A malformed
    index is the checkpoint reader's to report, with its own precise message."""
    out = [] if (snapshot / "config.json").is_file() else ["config.json"]
    index = snapshot / INDEX_NAME
    if index.is_file():
        shards = _index_shards(index)
        out += [n for n in shards if not (snapshot / n).is_file()]
    elif not any(p.is_file() for p in snapshot.glob("*.safetensors")):
        out.append("*.safetensors weights")
    return out


def _index_shards(index: Path) -> list[str]:
    """Shard names the index lists that are plain relative paths (the reader refuses the others)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        names = sorted({v for v in weight_map.values() if isinstance(v, str)})
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if n and not os.path.isabs(n) and ".." not in Path(n).parts]


def _names(missing: list[str]) -> str:
    return ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")


@contextlib.contextmanager
def _progress_bars(quiet: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    if quiet and not was:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was:
            enable_progress_bars()


def _download(hub: HubId, revision: str, cache: Path, cache_from: str, problem: str | None, *,
              quiet: bool) -> Path:
    """Ask the hub about the repository and revision first (one request without retries, so an unreachable
    hub or a wrong name is known at once), then fetch the metadata (which also records refs/<revision> in
    the cache), then the weights the index lists (else model.safetensors, else *.safetensors) of the very
    commit the metadata came from. Every failure is an ExportError saying what the hub answered; a local
    write error (disk full) stays an OSError."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or None
    where = f"the hub at {endpoint}" if endpoint else "the hub"
    fetch = lambda rev, patterns: _snapshot(  # noqa: E731
        snapshot_download(hub.repo_id, revision=rev, cache_dir=str(cache), allow_patterns=list(patterns),
                          endpoint=endpoint), cache, hub)

    def unreachable(e: BaseException) -> ExportError:
        return _unavailable(hub, revision, cache, cache_from, problem, f"{where} could not be reached "
                            f"({_root_cause(e)})")

    try:
        try:
            timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
        except ValueError:
            timeout = 10.0
        try:
            HfApi(endpoint=endpoint).model_info(hub.repo_id, revision=revision, timeout=timeout)
        except HfHubHTTPError:
            raise
        except Exception as e:  # DNS, refused, proxy, TLS, timeout, the library's own offline switch
            raise unreachable(e) from None
        with _progress_bars(quiet):
            snapshot = fetch(revision, METADATA_PATTERNS)
            commit = snapshot.name  # the weights from this very commit, whatever the branch does meanwhile
            index = snapshot / INDEX_NAME
            if index.is_file():
                shards = _index_shards(index)
                if shards:
                    snapshot = fetch(commit, [glob.escape(n) for n in shards])
            else:
                snapshot = fetch(commit, ["model.safetensors"])
                if not (snapshot / "model.safetensors").is_file():
                    snapshot = fetch(commit, ["*.safetensors"])
    except ExportError:
        raise
    except RevisionNotFoundError:
        raise ExportError(f"{where} has repository {hub.repo_id} but no revision {revision!r} in it (a branch, "
                          "tag or full commit hash); check --revision") from None
    except GatedRepoError:
        raise ExportError(f"{hub.repo_id} is gated on {where}: accept its terms on the repository's page, then "
                          "log in (`hf auth login`) or set HF_TOKEN, and run again") from None
    except RepositoryNotFoundError:
        raise ExportError(f"{hub.repo_id} is not a local directory, and {where} has no repository of that "
                          "name that this machine may read (a typo, or a private repository: log in with "
                          "`hf auth login` or set HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:  # the connection dropped mid-way (the library then tried the cache)
        raise unreachable(e) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise ExportError(f"fetching {hub} from {where} failed (HTTP {status}: {_first_line(e)}); nothing was "
                          "exported, run again later") from None
    except OSError as e:
        if e.errno is None:  # the network layer's errors carry no errno; this machine's disk errors do
            raise unreachable(e) from None
        raise
    except Exception as e:  # the HTTP client's own errors (a dropped connection, TLS)
        raise unreachable(e) from None
    return snapshot


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {_first_line(e)}"


def _unavailable(hub: HubId, revision: str, cache: Path, cache_from: str, problem: str | None,
                 why: str) -> ExportError:
    rev = f" --revision {revision}" if hub.revision else ""
    include = " ".join(f"--include '{p}'" for p in FETCH_PATTERNS)
    old = " ".join(f"'{p}'" for p in FETCH_PATTERNS)
    local = f" (there is no {hub.local})" if hub.local is not None else ""
    state = f"is only partly in the hub cache at {cache} ({cache_from}; {problem})" if problem else \
        f"is not in the hub cache at {cache} ({cache_from})"
    return ExportError(
        f"{hub.repo_id} is not a local directory{local}, so it was taken as a HuggingFace hub id; its revision "
        f"{revision} {state}, and {why}. Fetch it where the hub can be reached with "
        f"`hf download {hub.repo_id}{rev} {include}` (older huggingface_hub: `huggingface-cli download "
        f"{hub.repo_id}{rev} --include {old}`) into this cache or one you then point HF_HOME or HF_HUB_CACHE "
        "at; nothing was exported.")
