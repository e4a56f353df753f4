"""Checkpoints named by hub id (edgellm_export/checkpoint/hub.py), offline-first.

Every test lays out its own HuggingFace cache (models--owner--name/{blobs, refs/<branch>, snapshots/<sha>/}
with the snapshot files as relative symlinks into blobs/, as huggingface_hub writes it) from the built-in
tiny demo checkpoint. Nothing reaches the network: HF_HUB_OFFLINE=1 is set, and HF_ENDPOINT points at a
closed loopback port, which is also how "the hub cannot be reached" is exercised (in a fresh process,
where huggingface_hub reads the environment as the test sets it). The one test of what a download
fetches stands in for the hub with fakes of huggingface_hub's two entry points.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgellm_core.errors import ExportError
from edgellm_export.checkpoint.hub import HubId, looks_like_hub_id, parse_checkpoint, resolve_checkpoint
from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "acme/tiny-llama"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def put_files(cache: Path, repo_id: str, commit: str, files: list[tuple[str, bytes]]) -> Path:
    """Add files to snapshots/<commit> as symlinks into blobs/ (named by content); returns the snapshot."""
    repo = repo_dir(cache, repo_id)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for rel, data in files:
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def add_snapshot(cache: Path, repo_id: str, src: Path, refs=("main",), *, skip=()) -> str:
    """Put the files of `src` into the cache as one commit and point refs at it; returns the commit hash.
    `skip`: files left out (a partial download)."""
    files = [(f.relative_to(src).as_posix(), f.read_bytes())
             for f in sorted(src.rglob("*")) if f.is_file() and f.name not in skip]
    h = hashlib.sha1()
    for rel, data in files:
        h.update(rel.encode() + b"\0" + data)
    commit = h.hexdigest()
    put_files(cache, repo_id, commit, files)
    for ref in refs:
        (repo_dir(cache, repo_id) / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir(cache, repo_id) / "refs" / ref).write_text(commit)
    return commit


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub-sources")
    return write_demo_checkpoint(base / "seed0", seed=0), write_demo_checkpoint(base / "seed1", seed=1)


@pytest.fixture
def hub(tmp_path, monkeypatch, sources):
    """HF_HOME=tmp/hf (so the cache is tmp/hf/hub) holding acme/tiny-llama: main -> seed 0, dev -> seed 1;
    offline; the working directory an empty tmp/cwd."""
    home = tmp_path / "hf"
    cache = home / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    main_commit = add_snapshot(cache, REPO, sources[0], refs=("main",))
    dev_commit = add_snapshot(cache, REPO, sources[1], refs=("dev",))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return SimpleNamespace(home=home, cache=cache, main=main_commit, dev=dev_commit, cwd=cwd, sources=sources)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def data_sha(out: Path) -> str:
    return manifest(out)["files"]["llm/model.onnx.data"]["sha256"]


def error_paragraph(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("edgellm: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- what is an id


def test_what_is_a_hub_id_and_local_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ("Qwen/Qwen3-0.6B", "acme/tiny_llama.v2", "a/b"):
        assert looks_like_hub_id(text), text
        assert parse_checkpoint(text) == HubId(text)
    for text in ("./Qwen/Qwen3-0.6B", "/models/Qwen3", "a/b/c", "Qwen/Qwen3-0.6B/", "gpt2", "a--b/c", "a/b..c",
                 "a/b.git", "-a/b", "a/ b"):
        assert not looks_like_hub_id(text), text
        assert isinstance(parse_checkpoint(text), Path), text
    assert parse_checkpoint("Qwen/Qwen3-0.6B", "dev") == HubId("Qwen/Qwen3-0.6B", "dev")
    # A directory (or any path) named like an id is a path, whatever the cache holds.
    (tmp_path / "Qwen" / "Qwen3-0.6B").mkdir(parents=True)
    assert parse_checkpoint("Qwen/Qwen3-0.6B") == Path("Qwen/Qwen3-0.6B")
    with pytest.raises(ExportError, match="applies to a hub id only, and Qwen/Qwen3-0.6B is a local path"):
        parse_checkpoint("Qwen/Qwen3-0.6B", "main")
    with pytest.raises(ExportError, match="neither that nor an existing local path"):
        parse_checkpoint("./nowhere", "main")
    for bad in ("", "../x", "-rf", "a b", "/abs"):
        with pytest.raises(ExportError, match="is not a branch, tag or commit hash name"):
            parse_checkpoint("acme/x", bad)
    # relative to a suite's directory: the same rule there
    assert parse_checkpoint("Qwen/Qwen3-0.6B", base=tmp_path / "elsewhere") == HubId("Qwen/Qwen3-0.6B")
    assert parse_checkpoint("Qwen/Qwen3-0.6B", base=tmp_path) == tmp_path / "Qwen" / "Qwen3-0.6B"


# ---------------------------------------------------------------- export


def test_export_by_id_branch_and_commit_hash(hub, capsys):
    assert main(["-q", "export", REPO, "main-out"]) == 0
    assert manifest(hub.cwd / "main-out")["checkpoint"] == {"repo_id": REPO, "commit": hub.main}
    assert main(["-q", "export", REPO, "dev-out", "--revision", "dev"]) == 0
    assert manifest(hub.cwd / "dev-out")["checkpoint"] == {"repo_id": REPO, "commit": hub.dev}
    assert main(["-q", "export", REPO, "sha-out", "--revision", hub.main]) == 0
    assert manifest(hub.cwd / "sha-out")["checkpoint"] == {"repo_id": REPO, "commit": hub.main}
    # The weights are the snapshot's: main and its commit hash agree, the dev branch differs.
    assert data_sha(hub.cwd / "main-out") == data_sha(hub.cwd / "sha-out") != data_sha(hub.cwd / "dev-out")
    # The manifest names the commit, not how it was asked for: main and its hash give the same manifest.
    assert (hub.cwd / "main-out" / "manifest.json").read_bytes() == (hub.cwd / "sha-out" / "manifest.json").read_bytes()
    # The cache was only read.
    assert not capsys.readouterr().err


def test_hf_hub_cache_beats_hf_home(hub, tmp_path, monkeypatch):
    other = tmp_path / "other-cache"
    commit = add_snapshot(other, REPO, hub.sources[1], refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    ref = resolve_checkpoint(HubId(REPO))
    assert ref.commit == commit == hub.dev
    assert ref.path.resolve() == (repo_dir(other, REPO) / "snapshots" / commit).resolve()
    assert ref.record() == {"repo_id": REPO, "revision": "main", "commit": commit, "snapshot": str(ref.path)}


def test_local_directory_named_like_the_id_wins(hub, capsys):
    shutil.copytree(hub.sources[1], hub.cwd / "acme" / "tiny-llama")
    assert main(["-q", "export", REPO, "out"]) == 0
    assert "checkpoint" not in manifest(hub.cwd / "out")  # a local directory: no hub record
    assert main(["-q", "export", REPO, "out2", "--revision", "dev"]) == 2
    assert "is a local path" in error_paragraph(capsys) and not (hub.cwd / "out2").exists()


def test_missing_id_offline_is_exit_2_with_the_fetch_command_and_nothing_left(hub, capsys):
    before_cwd, before_cache = tree(hub.cwd), tree(hub.cache)
    assert main(["export", "acme/absent", "OUT"]) == 2
    msg = error_paragraph(capsys)
    for part in ("acme/absent is not a local directory", f"there is no {hub.cwd / 'acme' / 'absent'}",
                 "revision main is not in the hub cache", f"at {hub.cache} (HF_HOME/hub)",
                 "HF_HUB_OFFLINE is set, so the hub was not asked",
                 "`hf download acme/absent --include '*.json' --include '*.safetensors'",
                 "huggingface-cli download acme/absent", "HF_HOME or HF_HUB_CACHE", "nothing was exported"):
        assert part in msg, (part, msg)
    assert tree(hub.cwd) == before_cwd and tree(hub.cache) == before_cache  # no OUT, no temp dir, no cache entry
    # a revision the cache does not have: the same, naming it and passing it on to the fetch command
    assert main(["export", REPO, "OUT", "--revision", "v2"]) == 2
    msg = error_paragraph(capsys)
    assert "revision v2 is not in the hub cache" in msg and f"hf download {REPO} --revision v2 " in msg
    assert tree(hub.cwd) == before_cwd


def test_partly_cached_snapshot_offline_is_exit_2(hub, capsys):
    ref = repo_dir(hub.cache, REPO) / "refs" / "partial"
    commit = add_snapshot(hub.cache, REPO, hub.sources[0], refs=(), skip=("model.safetensors",))
    ref.write_text(commit)
    assert main(["export", REPO, "OUT", "--revision", "partial"]) == 2
    msg = error_paragraph(capsys)
    assert "revision partial is only partly in the hub cache" in msg
    assert f"snapshot {commit} lacks *.safetensors weights" in msg and not (hub.cwd / "OUT").exists()


def test_cached_id_needs_no_hub_even_online(hub, monkeypatch):
    """Offline-first: with HF_HUB_OFFLINE unset and the hub unreachable, a cached id still resolves."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_checkpoint(HubId(REPO)).commit == hub.main
    assert resolve_checkpoint(HubId(REPO, hub.dev)).commit == hub.dev


def run_cli(args: list[str], hub, **env) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (huggingface_hub reads some variables once, at import)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "edgellm_export", *args], cwd=hub.cwd, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_unreachable_hub_is_exit_2_at_once(hub):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for args, revision in ((["acme/absent", "OUT"], "main"), ([REPO, "OUT", "--revision", "f" * 40], "f" * 40)):
        t0 = time.monotonic()
        proc = run_cli(["export", *args], hub, HF_ENDPOINT=endpoint)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 2, proc.stderr
        msg = proc.stderr.strip().splitlines()[-1]
        assert msg.startswith("edgellm: error: ") and f"revision {revision} is not in the hub cache" in msg
        assert f"the hub at {endpoint} could not be reached" in msg and "hf download" in msg
        assert not (hub.cwd / "OUT").exists()
        assert elapsed < 60, f"an unreachable hub took {elapsed:.0f} s to report (retries?)"


# ---------------------------------------------------------------- what a download fetches


def test_download_fetches_only_what_the_exporter_reads(hub, tmp_path, monkeypatch):
    """The hub stood in for by fakes of HfApi.model_info and snapshot_download (which writes the cache as the
    real one does); the cache lookups stay the real library's."""
    import huggingface_hub

    remote_commit = "c0ffee" + "0" * 34
    remote = tmp_path / "remote"
    remote.mkdir()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "consolidated.safetensors", "pytorch_model.bin", "modeling_acme.py", "README.md", *shards):
        (remote / name).write_text(name)
    (remote / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": shards[0], "b": shards[1]}}))
    real = huggingface_hub.snapshot_download
    asked: list[tuple] = []

    def fake_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None,
                      **kw):
        if local_files_only:
            return real(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                        allow_patterns=allow_patterns, **kw)
        asked.append((revision, tuple(allow_patterns)))
        files = [(f.name, f.read_bytes()) for f in sorted(remote.iterdir())
                 if any(fnmatch.fnmatchcase(f.name, p) for p in allow_patterns)]
        snapshot = put_files(Path(cache_dir), repo_id, remote_commit, files)
        if revision != remote_commit:  # as the library does: remember which commit the branch named
            refs = repo_dir(Path(cache_dir), repo_id) / "refs"
            refs.mkdir(exist_ok=True)
            (refs / revision).write_text(remote_commit)
        return str(snapshot)

    infos = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda endpoint=None: SimpleNamespace(
        model_info=lambda repo_id, revision=None, timeout=None: infos.append((repo_id, revision))))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    ref = resolve_checkpoint(HubId("acme/sharded"))
    assert ref.commit == remote_commit and infos == [("acme/sharded", "main")]
    fetched = {p.name for p in ref.path.iterdir()}
    assert fetched == {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                       "model.safetensors.index.json", *shards}
    everything = [p for _, patterns in asked for p in patterns]
    assert not [p for p in everything if p.endswith((".bin", ".pt", ".py", ".pth"))]
    assert asked[0][0] == "main" and all(rev == remote_commit for rev, _ in asked[1:])  # the weights: one commit
    # Offline-first: now cached, so resolving again asks the hub nothing.
    asked.clear()
    infos.clear()
    assert resolve_checkpoint(HubId("acme/sharded")).path == ref.path and asked == [] and infos == []


# ---------------------------------------------------------------- make, qualify


def report(out: Path) -> dict:
    return json.loads((out / "qualification.json").read_text())


def test_make_records_the_commit_and_a_new_commit_reexports(hub, capsys):
    out = hub.cwd / "DIR"
    args = ["-q", "make", REPO, "--target", "x86-cpu", "--out", str(out), "--no-container"]
    assert main(args) == 0
    (case,) = report(out / "report")["cases"]
    assert case["name"] == "tiny-llama@x86-cpu" and case["checkpoint"] == REPO and case["verdict"] == "pass"
    snapshot = (repo_dir(hub.cache, REPO) / "snapshots" / hub.main).resolve()
    assert case["checkpoint_hub"] == {"repo_id": REPO, "revision": "main", "commit": hub.main,
                                      "snapshot": str(snapshot)}
    assert manifest(out / "export")["checkpoint"] == {"repo_id": REPO, "commit": hub.main}
    summary = (out / "report" / "summary.md").read_text()
    assert "## Hub checkpoints" in summary and f"| tiny-llama@x86-cpu | {REPO} | main | `{hub.main}` |" in summary
    stamp = json.loads((out / ".stamps" / "export.json").read_text())
    assert stamp["parts"]["options"]["hub_checkpoint"] == {"repo_id": REPO, "commit": hub.main}

    # The branch moves (as `hf download` would record it): the export and validation are redone.
    (repo_dir(hub.cache, REPO) / "refs" / "main").write_text(hub.dev)
    assert main(args) == 0
    assert manifest(out / "export")["checkpoint"]["commit"] == hub.dev
    (case,) = report(out / "report")["cases"]
    assert case["checkpoint_hub"]["commit"] == hub.dev
    summary = (out / "report" / "summary.md").read_text()
    assert f"commit {hub.main[:12]} -> {hub.dev[:12]}" in summary and f"`{hub.dev}`" in summary
    capsys.readouterr()

    # An id that cannot be had: exit 2 before anything is written.
    assert main(["make", "acme/absent", "--target", "x86-cpu", "--out", str(hub.cwd / "DIR2"), "--no-container"]) == 2
    assert "acme/absent is not a local directory" in error_paragraph(capsys)
    assert not (hub.cwd / "DIR2").exists()


def write_suite(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_suite_with_a_hub_id(hub, capsys):
    suite = write_suite(hub.cwd / "suite.yaml", f"""\
        name: hub
        defaults: {{target: x86-cpu}}
        cases:
          - name: dev
            checkpoint: {REPO}
            revision: dev
          - name: later
            checkpoint: acme/not-fetched-for-a-skipped-case
            skip: not today
        """)
    work = hub.cwd / "WORK"
    assert main(["-q", "qualify", str(suite), "--out", str(work), "--no-container"]) == 0
    q = report(work / "report")
    dev = q["cases"][0]
    assert dev["verdict"] == "pass" and dev["checkpoint"] == f"{REPO}@dev"
    assert dev["checkpoint_hub"]["revision"] == "dev" and dev["checkpoint_hub"]["commit"] == hub.dev
    assert q["cases"][1]["verdict"] == "skipped" and q["cases"][1]["checkpoint_hub"] is None
    assert manifest(work / "cases" / "dev" / "export")["checkpoint"] == {"repo_id": REPO, "commit": hub.dev}
    assert f"| dev | {REPO} | dev | `{hub.dev}` |" in (work / "report" / "summary.md").read_text()

    # A hub id the cache lacks stops the suite before anything runs or is written.
    bad = write_suite(hub.cwd / "bad.yaml", f"""\
        cases:
          - {{name: ok, checkpoint: {REPO}, target: x86-cpu}}
          - {{name: absent, checkpoint: acme/absent, target: x86-cpu}}
        """)
    capsys.readouterr()
    assert main(["qualify", str(bad), "--out", str(hub.cwd / "WORK2"), "--no-container"]) == 2
    msg = error_paragraph(capsys)
    assert f"{bad}: case 'absent': acme/absent is not a local directory" in msg and "hf download acme/absent" in msg
    assert not (hub.cwd / "WORK2").exists()
    # A revision on a local checkpoint is a mistake in the suite.
    shutil.copytree(hub.sources[0], hub.cwd / "local" / "ckpt")
    local = write_suite(hub.cwd / "local.yaml", """\
        cases: [{name: a, checkpoint: local/ckpt, revision: main, target: x86-cpu}]
        """)
    assert main(["qualify", str(local), "--out", str(hub.cwd / "WORK3"), "--no-container"]) == 2
    msg = error_paragraph(capsys)
    assert f"{local}: " in msg and "case 'a'" in msg and "a revision (main) applies to a hub id only" in msg
