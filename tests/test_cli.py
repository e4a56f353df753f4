"""The `edgellm` command: demo, export, validate, help, verbosity, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgellm_export", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300)


def test_demo_end_to_end(tmp_path):
    r = cli("demo", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    assert "Validation PASSED" in r.stdout
    assert "llm/model.onnx.data" in r.stdout and "total" in r.stdout  # file summary
    assert "writing model.onnx.data" in r.stderr  # progress
    result = json.loads((tmp_path / "demo" / "validation.json").read_text())
    assert result["passed"] and result["worst_cosine"] >= 0.999 and result["top1_agreement"] == 1.0
    assert len(result["steps"]) >= 10


def test_export_then_validate_quiet(tmp_path, capsys):
    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    assert main(["--quiet", "export", str(ckpt), str(tmp_path / "out")]) == 0
    assert main(["-q", "validate", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "[edgellm]" not in captured.err


def test_validate_fails_with_exit_1_on_wrong_logits(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    assert main(["-q", "export", str(ckpt), str(tmp_path / "out")]) == 0
    bundle = tmp_path / "out" / "llm" / "golden" / "logits.safetensors"
    logits = load_file(str(bundle))
    key = sorted(logits)[3]
    logits[key] = logits[key][:, ::-1].copy()  # a wrong expectation must be caught
    save_file(logits, str(bundle))
    from edgellm_core.manifest import write_manifest

    write_manifest(tmp_path / "out")  # an exporter bug, not tampering: the manifest agrees
    assert main(["validate", str(tmp_path / "out"), "--result", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "Validation FAILED" in out
    assert not json.loads((tmp_path / "r.json").read_text())["passed"]


def test_help_texts():
    r = cli("--help")
    assert r.returncode == 0 and "export" in r.stdout and "validate" in r.stdout and "demo" in r.stdout
    r = cli("export", "--help")
    assert r.returncode == 0 and "--fp8-embedding" in r.stdout and "unsafe" not in r.stdout


def test_validate_on_non_export_dir(tmp_path):
    r = cli("validate", tmp_path)
    assert r.returncode == 2 and "not an export directory" in r.stderr and "Traceback" not in r.stderr
