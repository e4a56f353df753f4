"""`validate` trusts an export only after checking it against manifest.json, without re-hashing
unchanged files on every call; `--no-verify` skips the check for pipelines that already trust OUT."""

from __future__ import annotations

import json
import os
import time

import pytest

import edgellm_core.digests as digests_mod
from edgellm_core.errors import ExportError
from edgellm_core.manifest import MANIFEST, verified_record, verify_manifest
from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    out = root / "out"
    assert main(["-q", "export", str(write_demo_checkpoint(root / "ckpt")), str(out)]) == 0
    time.sleep(2.1)  # past the racy window: files written just now are always hashed again
    return out


@pytest.fixture()
def reads(monkeypatch):
    seen = []
    real = digests_mod.sha256_file

    def counting(path):
        seen.append(os.path.relpath(path))
        return real(path)

    monkeypatch.setattr(digests_mod, "sha256_file", counting)
    return seen


def test_unchanged_files_are_hashed_once(export_dir, reads):
    listed = json.loads((export_dir / MANIFEST).read_text())["files"]
    verified_record(export_dir).unlink(missing_ok=True)
    verify_manifest(export_dir)
    assert len(reads) == len(listed)
    reads.clear()
    verify_manifest(export_dir)
    assert reads == []
    assert verified_record(export_dir).is_file()
    assert sorted(p.name for p in export_dir.iterdir()) == ["llm", "manifest.json"]  # the export is untouched


def test_same_size_rewrite_with_mtime_put_back_is_caught(export_dir, reads):
    verify_manifest(export_dir)
    data = export_dir / "llm" / "model.onnx.data"
    st = data.stat()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before; ctime moves
    reads.clear()
    with pytest.raises(ExportError, match="does not match its sha256"):
        verify_manifest(export_dir)
    assert any(r.endswith("model.onnx.data") for r in reads)
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))
    verify_manifest(export_dir)


def test_a_forged_cache_record_for_another_manifest_is_ignored(export_dir, reads):
    verify_manifest(export_dir)
    rec = json.loads(verified_record(export_dir).read_text())
    rec["manifest_sha256"] = "0" * 64
    verified_record(export_dir).write_text(json.dumps(rec))
    reads.clear()
    verify_manifest(export_dir)
    assert len(reads) == len(json.loads((export_dir / MANIFEST).read_text())["files"])


def test_no_verify_skips_the_manifest_check(export_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(export_dir, out)
    (out / MANIFEST).unlink()
    assert main(["-q", "validate", str(out)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["-q", "validate", "--no-verify", str(out)]) == 0
    assert json.loads((out / "validation.json").read_text())["manifest_verified"] is False
