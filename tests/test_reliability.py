"""Issue 4: manifest, lock, stale cleanup, signals, range checks, pickle opt-in, clamping."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgellm_core.digests import sha256_file
from edgellm_core.manifest import MANIFEST
from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo(tmp_path):
    return write_demo_checkpoint(tmp_path / "ckpt")


def digests(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# -- manifest -------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_its_digest(demo, tmp_path):
    out = tmp_path / "out"
    assert main(["-q", "export", str(demo), str(out)]) == 0
    listed = json.loads((out / MANIFEST).read_text())["files"]
    files = {k: v for k, v in digests(out).items() if k != MANIFEST}
    assert {k: v["sha256"] for k, v in listed.items()} == files
    assert "llm/model.onnx.data" in listed and "llm/golden/bundle.json" in listed


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "add", "no_manifest"])
def test_validate_refuses_an_altered_export(demo, tmp_path, capsys, damage):
    out = tmp_path / "out"
    assert main(["-q", "export", str(demo), str(out)]) == 0
    data = out / "llm" / "model.onnx.data"
    if damage == "flip_byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        os.truncate(data, data.stat().st_size - 4096)
    elif damage == "delete":
        (out / "llm" / "embedding.safetensors").unlink()
    elif damage == "add":
        (out / "llm" / "extra.onnx").write_bytes(b"x")
    else:
        (out / MANIFEST).unlink()
    capsys.readouterr()
    assert main(["validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = {"flip_byte": "model.onnx.data", "truncate": "model.onnx.data", "delete": "embedding.safetensors",
                "add": "extra.onnx", "no_manifest": "manifest.json"}[damage]
    assert expected in err


# -- lock and stale temporaries -----------------------------------------------------------
def test_second_export_to_the_same_output_fails_clearly(demo, tmp_path, capsys):
    from edgellm_export.output_dir import output_lock

    out = tmp_path / "out"
    with output_lock(out.absolute()):
        assert main(["-q", "export", str(demo), str(out)]) == 3
    err = capsys.readouterr().err
    assert "another export" in err and str(os.getpid()) in err
    assert not out.exists()
    assert main(["-q", "export", str(demo), str(out)]) == 0  # lock released


def test_lock_file_exists_only_while_held(demo, tmp_path, capsys):
    """After a success and after bad input, OUT's parent holds OUT (or nothing) and the checkpoint: no lock."""
    from edgellm_export.output_dir import lock_path_for, output_lock

    parent = tmp_path / "work"
    parent.mkdir()
    out = parent / "out"
    with output_lock(out.absolute()):
        assert lock_path_for(out.absolute()).is_file()
    assert list(parent.iterdir()) == []
    assert main(["-q", "export", str(demo), str(out)]) == 0
    assert [p.name for p in parent.iterdir()] == ["out"]
    (demo / "config.json").write_text("{not json")
    assert main(["-q", "export", str(demo), str(parent / "bad")]) == 2
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_waiter_on_an_unlinked_lock_file_locks_the_path_again(tmp_path, monkeypatch):
    """The race the unlink opens: B opens the lock file, A releases (unlinks) it, B's flock succeeds on the
    orphaned inode. B must notice and lock the path anew, or a third process C could hold a lock on a new
    file at the same time."""
    import edgellm_export.output_dir as od

    final = (tmp_path / "out").absolute()
    lock = od.lock_path_for(final)
    with od.output_lock(final):
        stale_fd = os.open(lock, os.O_RDWR)  # B opened the path just before A's release
    assert not lock.exists()
    real_open, calls = os.open, []

    def open_first_the_stale_fd(path, flags, mode=0o777):
        calls.append(path)
        return stale_fd if len(calls) == 1 else real_open(path, flags, mode)

    monkeypatch.setattr(od.os, "open", open_first_the_stale_fd)
    with od.output_lock(final):
        assert len(calls) == 2  # the orphaned inode was dropped and the path locked again
        monkeypatch.setattr(od.os, "open", real_open)
        assert lock.is_file()
        with pytest.raises(od.EnvironmentProblem, match="another export"):
            with od.output_lock(final):
                pass
    assert not lock.exists()


def test_stale_partial_and_old_from_a_killed_run_are_cleaned(demo, tmp_path):
    out = tmp_path / "out"
    assert main(["-q", "export", str(demo), str(out)]) == 0
    before = digests(out)
    # A run killed between its two renames leaves the old export aside and OUT missing.
    os.rename(out, tmp_path / ".out.old-999999")
    (tmp_path / ".out.partial-999999" / "llm").mkdir(parents=True)
    assert main(["-q", "export", str(demo), str(out)]) == 0
    assert digests(out) == before
    assert leftovers(tmp_path) == []


# -- signals ---------------------------------------------------------------------------------
def _big_checkpoint(tmp_path) -> Path:
    from test_memory import write_checkpoint

    return write_checkpoint(tmp_path / "big", 12)


# Both ways a user starts the tool: `python -m edgellm_export` and the `edgellm` console script.
ENTRY_POINTS = {"module": [sys.executable, "-m", "edgellm_export"],
                "console": [str(Path(sys.executable).with_name("edgellm"))]}


def _start_export(ckpt: Path, out: Path, entry: str = "module") -> subprocess.Popen:
    return subprocess.Popen(ENTRY_POINTS[entry] + ["-q", "export", str(ckpt), str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_partial(parent: Path, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if [p for p in parent.iterdir() if ".partial-" in p.name]:
            return True
        time.sleep(0.01)
    return False


def _wait_until_published(parent: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the partial directory has been renamed into place: the process is then finishing up."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if not [p for p in parent.iterdir() if ".partial-" in p.name]:
            return
        time.sleep(0.002)


def _interrupt_once(tmp_path: Path, ckpt: Path, out: Path, sig, code, when, before, entry="module") -> bool:
    """One export interrupted at `when` (seconds after its partial directory appears, or
    "published": right after the rename, while the process shuts down). Returns whether the
    signal landed mid-export."""
    proc = _start_export(ckpt, out, entry)
    partial = _wait_for_partial(tmp_path, proc)
    if when == "published":
        _wait_until_published(tmp_path, proc)
    else:
        time.sleep(when)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    # The documented code or a normal finish, never a kill by the signal (rc -2 / -15).
    assert rc in (code, 0), f"exit status {rc} for {sig!r} at {when} ({entry}): {err}"
    if rc == code:
        assert "no partial output was left" in err
    assert "Traceback" not in err
    # Same checkpoint, deterministic export: either way OUT is byte-identical, and nothing is left beside it.
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out"]
    return partial


SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_interrupt_at_random_points_keeps_previous_output(tmp_path, sig, code):
    ckpt = _big_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert subprocess.run([sys.executable, "-m", "edgellm_export", "-q", "export", str(ckpt), str(out)],
                          cwd=ROOT, timeout=300).returncode == 0
    before = digests(out)
    rng = random.Random(int(sig))  # random points, reproducible per signal
    whens = [0.0] + [rng.uniform(0.05, 1.6) for _ in range(3)] + ["published"]
    seen_partial = sum(_interrupt_once(tmp_path, ckpt, out, sig, code, w, before, entry)
                       for w in whens for entry in ENTRY_POINTS)
    assert seen_partial >= 4  # the signals really landed mid-export


@pytest.mark.stress
@pytest.mark.parametrize("sig,code", SIGNALS)
def test_interrupt_exit_codes_stress(tmp_path, sig, code):
    """`pytest -m stress`: STRESS_RUNS (default 50) interrupted exports per signal, at points spread
    over the whole run including its shutdown; every one must end 0 or 130/143 with OUT intact."""
    ckpt = _big_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert subprocess.run([sys.executable, "-m", "edgellm_export", "-q", "export", str(ckpt), str(out)],
                          cwd=ROOT, timeout=300).returncode == 0
    before = digests(out)
    runs = int(os.environ.get("STRESS_RUNS", "50"))
    rng = random.Random(1000 + int(sig))
    for i in range(runs):
        when = "published" if i % 5 == 4 else rng.uniform(0.0, 3.0)
        _interrupt_once(tmp_path, ckpt, out, sig, code, when, before, "console" if i % 2 else "module")


def test_sigkill_keeps_previous_output_and_next_run_cleans_up(tmp_path):
    ckpt = _big_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert main(["-q", "export", str(ckpt), str(out)]) == 0
    before = digests(out)
    proc = _start_export(ckpt, out)
    assert _wait_for_partial(tmp_path, proc)
    time.sleep(0.1)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-export, not finished before
    assert digests(out) == before
    assert ".out.lock" in {p.name for p in tmp_path.iterdir()}  # a SIGKILLed holder cannot clean up
    assert main(["-q", "export", str(ckpt), str(out)]) == 0  # the clean-up run
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out"]


# -- config ranges, pickles, clamping, changing checkpoints --------------------------------
@pytest.mark.parametrize("field,value,phrase", [
    ("num_hidden_layers", 10**9, "beyond any real model"),
    ("num_attention_heads", -4, "positive integer"),
    ("vocab_size", 2**40, "beyond any real model"),
    ("hidden_size", "128", "positive integer"),
    ("intermediate_size", 1.5, "positive integer"),
])
def test_config_values_are_range_checked_first(demo, tmp_path, capsys, field, value, phrase):
    cfg = json.loads((demo / "config.json").read_text())
    cfg[field] = value
    (demo / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    assert main(["export", str(demo), str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "config.json" in err and field in err and phrase in err
    assert not (tmp_path / "out").exists()


def test_overlapping_tensors_are_refused(tmp_path, capsys):
    import struct

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = {"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "overlap" in err and "model.safetensors" in err


def test_pickled_weights_opt_in_converts_with_weights_only(tmp_path, capsys):
    from safetensors.torch import load_file

    demo = write_demo_checkpoint(tmp_path / "ckpt")
    state = load_file(str(demo / "model.safetensors"))
    (demo / "model.safetensors").unlink()
    torch.save(state, demo / "pytorch_model.bin")
    assert main(["-q", "export", str(demo), str(tmp_path / "refused")]) == 2
    assert "--convert-pickle" in capsys.readouterr().err
    assert main(["-q", "export", "--convert-pickle", str(demo), str(tmp_path / "out")]) == 0
    assert main(["-q", "validate", str(tmp_path / "out")]) == 0
    reference = write_demo_checkpoint(tmp_path / "ref")
    assert main(["-q", "export", str(reference), str(tmp_path / "ref-out")]) == 0
    assert (tmp_path / "out" / "llm" / "model.onnx.data").read_bytes() == (
        tmp_path / "ref-out" / "llm" / "model.onnx.data").read_bytes()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/edgellm-evil-marker')}",))


def test_malicious_pickle_never_runs(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"model.embed_tokens.weight": _Evil()}, ckpt / "pytorch_model.bin")
    assert main(["export", "--convert-pickle", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "weights-only" in err and "pytorch_model.bin" in err
    assert not marker.exists()


def test_clamp_option_clamps_with_a_warning(tmp_path, capsys, caplog):
    from safetensors.torch import load_file, save_file

    demo = write_demo_checkpoint(tmp_path / "ckpt")
    state = load_file(str(demo / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][3, 5] = 1e6
    save_file(state, str(demo / "model.safetensors"))
    assert main(["-q", "export", str(demo), str(tmp_path / "refused")]) == 2
    assert "--clamp-fp16" in capsys.readouterr().err
    assert main(["export", "--clamp-fp16", str(demo), str(tmp_path / "out")]) == 0
    assert "clamped to +-65504" in caplog.text and "up_proj" in caplog.text


def test_checkpoint_changing_during_export_is_refused(demo, tmp_path, capsys, monkeypatch):
    import edgellm_export.export as export_mod

    real = export_mod._write_weights

    def write_and_touch(*a, **k):
        digest = real(*a, **k)
        st = (demo / "model.safetensors").stat()
        os.utime(demo / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return digest

    monkeypatch.setattr(export_mod, "_write_weights", write_and_touch)
    assert main(["-q", "export", str(demo), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "changed while it was being read" in err and "model.safetensors" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_read_only_output_is_an_environment_problem(demo, tmp_path, capsys, monkeypatch):
    import errno

    from edgellm_export import output_dir as od

    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if ".partial-" in self.name:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(od.Path, "mkdir", mkdir)
    assert main(["-q", "export", str(demo), str(tmp_path / "out")]) == 3
    assert "Read-only file system" in capsys.readouterr().err


def test_exit_codes_are_documented():
    r = subprocess.run([sys.executable, "-m", "edgellm_export", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    for code in ("0", "1", "2", "3"):
        assert f"  {code}  " in r.stdout


def test_missing_backend_is_an_environment_problem(demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["-q", "export", str(demo), str(out)]) == 0
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "edgellm_validate.cpu_backend", raising=False)
    assert main(["validate", str(out)]) == 3
    assert "onnxruntime" in capsys.readouterr().err
