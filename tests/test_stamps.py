"""Stage stamps: content fingerprints with a stat-keyed digest cache, output verification, --force."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edgellm_core.digests import DigestCache
from edgellm_core.errors import ExportError
from edgellm_export.make.stamps import (
    StampStore,
    canonical_json,
    fingerprint,
    input_files,
)


def up_to_date(store: StampStore, stage: str, fp, *, force: bool = False) -> bool:
    return store.why_stale(stage, fp, force=force) is None


FUTURE = time.time_ns() + 3600 * 10**9  # a clock an hour ahead: every cache entry counts as old (not racy)


def checkpoint(root: Path) -> Path:
    ck = root / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "llama"}')
    (ck / "model-00001-of-00002.safetensors").write_bytes(bytes(range(256)) * 64)
    (ck / "model-00002-of-00002.safetensors").write_bytes(b"\x01" * 4096)
    (ck / ".cache").mkdir()
    (ck / ".cache" / "download.lock").write_text("hf bookkeeping")
    return ck


def rewrite_byte_keep_size_and_mtime(path: Path, offset: int = 100) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_canonical_options_and_fingerprint_parts(tmp_path):
    ck = checkpoint(tmp_path)
    assert canonical_json({"b": 1, "a": [Path("x/y"), 2]}) == '{"a":["x/y",2],"b":1}'
    with pytest.raises(TypeError, match="JSON data"):
        canonical_json({"x": object()})
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    fp1 = fingerprint("export", inputs={"checkpoint": ck}, options={"target": "0.7", "fp8_embedding": False})
    fp2 = fingerprint("export", inputs={"checkpoint": ck}, options={"fp8_embedding": False, "target": "0.7"})
    assert fp1.digest == fp2.digest and len(fp1.digest) == 64
    assert fingerprint("export", inputs={"checkpoint": ck}, options={"target": "0.7", "fp8_embedding": True}).digest \
        != fp1.digest
    assert fingerprint("export", inputs={"checkpoint": ck}, options={"target": "0.7", "fp8_embedding": False},
                       tool_version="9.9").digest != fp1.digest
    assert fingerprint("build", inputs={"checkpoint": ck}, options={}, upstream="a").digest \
        != fingerprint("build", inputs={"checkpoint": ck}, options={}, upstream="b").digest
    assert set(fp1.parts["inputs"]["checkpoint"]) == {"config.json", "model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"}  # hidden files skipped
    with pytest.raises(ValueError, match="stage name"):
        fingerprint("../evil")


def test_moved_checkpoint_with_same_content_keeps_its_fingerprint(tmp_path):
    ck = checkpoint(tmp_path)
    fp = fingerprint("export", inputs={"checkpoint": ck})
    moved = tmp_path / "elsewhere"
    ck.rename(moved)
    assert fingerprint("export", inputs={"checkpoint": moved}).digest == fp.digest
    (moved / "extra.json").write_text("{}")
    assert fingerprint("export", inputs={"checkpoint": moved}).digest != fp.digest


def test_changed_shard_byte_with_same_size_and_mtime_is_detected(tmp_path):
    """The realistic sequence: export recorded, a shard byte changed in place, mtime put back."""
    ck = checkpoint(tmp_path)
    store = StampStore(tmp_path / "work")
    fp = store.fingerprint("export", inputs={"checkpoint": ck}, options={"target": "0.7"})
    (tmp_path / "work" / "out").mkdir(parents=True)
    (tmp_path / "work" / "out" / "model.onnx").write_bytes(b"graph")
    store.record("export", fp, ["out"])
    assert up_to_date(store, "export", store.fingerprint("export", inputs={"checkpoint": ck},
                                                           options={"target": "0.7"}))
    rewrite_byte_keep_size_and_mtime(ck / "model-00001-of-00002.safetensors")
    fp2 = store.fingerprint("export", inputs={"checkpoint": ck}, options={"target": "0.7"})
    assert fp2.digest != fp.digest
    why = store.why_stale("export", fp2)
    assert why == "checkpoint file(s) changed: model-00001-of-00002.safetensors"


def test_cache_skips_unchanged_files_and_ctime_catches_utime(tmp_path):
    """With entries old enough to be trusted, unchanged shards are not read again; a rewrite whose
    mtime is put back still moves ctime, so the shard is read again and the change is seen."""
    ck = checkpoint(tmp_path)
    store = StampStore(tmp_path / "work", clock=lambda: FUTURE)
    fp = store.fingerprint("export", inputs={"checkpoint": ck})
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "o.txt").write_text("out")
    store.record("export", fp, ["o.txt"])
    stamp = json.loads(store.path("export").read_text())
    assert len(stamp["input_digests"]) == 3 and all("ctime_ns" in e for e in stamp["input_digests"].values())

    cache = store.digest_cache("export")
    assert fingerprint("export", inputs={"checkpoint": ck}, cache=cache).digest == fp.digest
    assert cache.hashed == []  # nothing re-read

    time.sleep(0.05)  # past the filesystem's timestamp tick, so the new ctime differs
    shard = ck / "model-00002-of-00002.safetensors"
    rewrite_byte_keep_size_and_mtime(shard, offset=7)
    cache = store.digest_cache("export")
    fp2 = fingerprint("export", inputs={"checkpoint": ck}, cache=cache)
    assert cache.hashed == [os.path.abspath(shard)]  # only the touched shard
    assert fp2.digest != fp.digest


def test_racy_entries_are_not_trusted():
    cache = DigestCache({"/x": {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 10, "ctime_ns": 10, "hashed_at_ns": 11,
                                "sha256": "0" * 64}})
    entry = cache.entries["/x"]
    key = {k: entry[k] for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")}
    assert not cache._trusted(entry, key)  # changed 1 ns before it was hashed: could change again unseen
    entry["hashed_at_ns"] = 10 + 3_000_000_000
    assert cache._trusted(entry, key)
    assert not cache._trusted(entry, {**key, "ino": 3})


def test_stamp_round_trip_force_and_reasons(tmp_path):
    ck = checkpoint(tmp_path)
    work = tmp_path / "work"
    store = StampStore(work)
    opts = {"target": "0.7", "fp8_embedding": False}
    fp = store.fingerprint("export", inputs={"checkpoint": ck}, options=opts)
    assert store.why_stale("export", fp).startswith("no stamp")
    (work / "export" / "llm").mkdir(parents=True)
    (work / "export" / "llm" / "model.onnx").write_bytes(b"graph")
    (work / "export" / "manifest.json").write_text("{}")
    path = store.record("export", fp, ["export"])
    assert path == work / ".stamps" / "export.json"
    assert sorted(os.listdir(work / ".stamps")) == ["export.json"]  # no temp file left
    assert up_to_date(store, "export", fp)
    assert not up_to_date(store, "export", fp, force=True)
    assert store.why_stale("export", fp, force=True) == "forced"
    fp_opts = store.fingerprint("export", inputs={"checkpoint": ck}, options={**opts, "fp8_embedding": True})
    assert store.why_stale("export", fp_opts) == "options changed (fp8_embedding)"
    fp_tool = store.fingerprint("export", inputs={"checkpoint": ck}, options=opts, tool_version="0.2.0")
    assert "tool version" in store.why_stale("export", fp_tool)
    store.invalidate("export")
    assert not up_to_date(store, "export", fp)


def test_outputs_deleted_altered_or_added_make_the_stage_stale(tmp_path):
    ck = checkpoint(tmp_path)
    work = tmp_path / "work"
    store = StampStore(work)
    fp = store.fingerprint("export", inputs={"checkpoint": ck})
    out = work / "export"
    (out / "llm").mkdir(parents=True)
    data = out / "llm" / "model.onnx.data"
    data.write_bytes(b"\x00" * 1000)
    (out / "llm" / "config.json").write_text("{}")

    def fresh():
        store.record("export", fp, ["export"])
        assert up_to_date(store, "export", fp)

    fresh()
    rewrite_byte_keep_size_and_mtime(data, offset=10)
    assert store.why_stale("export", fp) == "output altered since it was written: export/llm/model.onnx.data"
    fresh()
    (out / "llm" / "config.json").unlink()
    assert store.why_stale("export", fp) == "output(s) deleted: export/llm/config.json"
    (out / "llm" / "config.json").write_text("{}")
    fresh()
    (out / "llm" / "stray.txt").write_text("x")
    assert store.why_stale("export", fp) == "file(s) added to the outputs: export/llm/stray.txt"
    (out / "llm" / "stray.txt").unlink()
    fresh()
    import shutil

    shutil.rmtree(out)
    assert "missing" in store.why_stale("export", fp)


def test_recheck_refreshes_racy_output_entries(tmp_path):
    """Outputs just written are re-read once at the next check (they were racy), then trusted."""
    clock = [time.time_ns()]
    store = StampStore(tmp_path, clock=lambda: clock[0])
    (tmp_path / "o.bin").write_bytes(b"abc")
    fp = fingerprint("s")
    store.record("s", fp, ["o.bin"], known_digests={"o.bin": __import__("hashlib").sha256(b"abc").hexdigest()})
    clock[0] += 10 * 10**9
    before = json.loads(store.path("s").read_text())["outputs"]["files"]["o.bin"]["hashed_at_ns"]
    assert up_to_date(store, "s", fp)
    after = json.loads(store.path("s").read_text())["outputs"]["files"]["o.bin"]["hashed_at_ns"]
    assert after > before
    # a wrong known digest is caught by that re-read
    store.record("s", fp, ["o.bin"], known_digests={"o.bin": "0" * 64})
    assert store.why_stale("s", fp) == "output altered since it was written: o.bin"


def test_upstream_token_follows_outputs(tmp_path):
    store = StampStore(tmp_path)
    assert store.upstream("export") is None
    (tmp_path / "o.bin").write_bytes(b"abc")
    fp = fingerprint("export", options={"a": 1})
    store.record("export", fp, ["o.bin"])
    token = store.upstream("export")
    assert fingerprint("build", upstream=token).digest == fingerprint("build", upstream=store.upstream("export")).digest
    (tmp_path / "o.bin").write_bytes(b"abd")
    store.record("export", fp, ["o.bin"])  # same inputs, different output (nondeterministic step)
    assert store.upstream("export") != token


def test_corrupt_or_foreign_stamp_means_rerun_not_crash(tmp_path, caplog):
    store = StampStore(tmp_path)
    fp = fingerprint("export")
    store.dir.mkdir()
    store.path("export").write_text("{oops")
    assert store.why_stale("export", fp).startswith("no stamp")
    store.path("export").write_text(json.dumps({"format": 99, "stage": "export"}))
    assert not up_to_date(store, "export", fp)
    assert "unreadable stamp" in caplog.text


def test_bad_outputs_and_inputs(tmp_path):
    store = StampStore(tmp_path)
    fp = fingerprint("x")
    with pytest.raises(ExportError, match="does not exist"):
        store.record("x", fp, ["nope"])
    with pytest.raises(ValueError, match="cannot be the pipeline directory"):
        store.record("x", fp, ["."])
    with pytest.raises(ValueError, match="not 'y'"):
        store.record("y", fp, [])
    with pytest.raises(ExportError, match="does not exist"):
        fingerprint("x", inputs={"checkpoint": tmp_path / "absent"})


def test_input_files_follow_symlinks_like_an_hf_snapshot(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_bytes(b"weights")
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blobs / "abc")
    (snap / "loop").symlink_to(snap)  # a cycle is walked once
    files = input_files(snap)
    assert list(files) == ["model.safetensors"]
    fp = fingerprint("export", inputs={"checkpoint": snap})
    (blobs / "abc").write_bytes(b"weightz")
    assert fingerprint("export", inputs={"checkpoint": snap}).digest != fp.digest
