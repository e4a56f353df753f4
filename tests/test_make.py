"""`edgellm make`: stages with fingerprints (export -> image -> validate -> report), skipped while up to date;
`edgellm validate` with --target gating and --report. The container module is faked (no docker): its
validations run the real CPU backend on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fake_containers import install

from edgellm_core.errors import EnvironmentProblem
from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint
from edgellm_export.make.pipeline import MakeSettings, image_inputs, make
from edgellm_export.make.suite import SuiteCase

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path):
    return write_demo_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def fake(monkeypatch, tmp_path):
    return install(monkeypatch, tmp_path)


def run_make(ckpt: Path, out: Path, *extra: str) -> int:
    return main(["-q", "make", str(ckpt), "--target", "x86-cpu", "--out", str(out), *extra])


def snapshot(root: Path, skip: str = "report") -> dict[str, tuple]:
    """Every file and directory under root except root/skip: identity and change times (ctime moves on any
    write, rename or utime, so an unchanged ctime means the file was not touched)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parts[:1] == (skip,):
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if rel_dir == Path(".") and name == skip:
                continue
            st = p.lstat()
            out[(rel_dir / name).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def flip_shard_byte(path: Path) -> None:
    """Change the lowest mantissa bit of the file's last bf16 value, putting size and mtime back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        b = f.read(1)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def report(out: Path) -> dict:
    return json.loads((out / "report" / "qualification.json").read_text())


def test_make_in_container_passes_then_rewrites_nothing(ckpt, tmp_path, fake):
    out = tmp_path / "DIR"
    assert run_make(ckpt, out) == 0
    q = report(out)
    assert q["verdict"] == "pass" and q["summary"]["pass"] == 1
    (case,) = q["cases"]
    assert case["name"] == "ckpt@x86-cpu" and case["target"] == "x86-cpu" and case["backend"] == "onnxruntime-cpu"
    assert case["metrics"]["worst_cosine"] >= 0.999 and case["metrics"]["top1_agreement"] == 1.0
    assert case["metrics"]["steps"] >= 10
    assert {c["metric"] for c in case["checks"]} >= {"worst_cosine", "top1_agreement"}
    assert all(c["passed"] for c in case["checks"])
    assert case["artifacts"]["files"]["llm/model.onnx.data"]["size"] > 0
    suite = ET.parse(out / "report" / "junit.xml").getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0" and suite.get("errors") == "0"
    assert "PASS" in (out / "report" / "summary.md").read_text()
    # The stages: built once, smoke-tested, validated with the target's backend, inside the image.
    assert [c[0] for c in fake.calls] == ["build_image", "smoke", "run_validate"]
    assert fake.calls[0] == ("build_image", "x86-cpu", "python:3.11-slim-bookworm")
    assert fake.calls[2][3] == "cpu"
    image = json.loads((out / "images" / "x86-cpu.json").read_text())
    assert image["id"] == fake.calls[2][2] and image["smoke"]["problems"] == []
    assert sorted(p.name for p in (out / "export").iterdir()) == ["llm", "manifest.json"]  # nothing foreign
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["validation.json", "validation.log"]
    assert q["environment"]["extra"]["validated_in"] == "target container"

    before = snapshot(out)
    report_inode = (out / "report" / "qualification.json").stat().st_ino
    assert run_make(ckpt, out) == 0
    assert snapshot(out) == before  # not one file outside report/ written, renamed or touched
    assert len(fake.calls) == 3  # no build, no smoke, no validation
    assert (out / "report" / "qualification.json").stat().st_ino != report_inode  # the report was rewritten
    assert report(out)["verdict"] == "pass"
    assert "No regressions." in (out / "report" / "summary.md").read_text()


def test_changed_shard_byte_reruns_export_and_validation(ckpt, tmp_path, fake):
    out = tmp_path / "DIR"
    assert run_make(ckpt, out) == 0
    data = out / "export" / "llm" / "model.onnx.data"
    old_data, old_manifest = data.read_bytes(), (out / "export" / "manifest.json").read_text()
    flip_shard_byte(ckpt / "model.safetensors")  # same size, same mtime: only the content says it changed
    assert run_make(ckpt, out) == 0
    assert data.read_bytes() != old_data and (out / "export" / "manifest.json").read_text() != old_manifest
    assert fake.count("run_validate") == 2 and fake.count("build_image") == 1  # the image did not change
    case = report(out)["cases"][0]
    assert case["verdict"] == "pass"
    old_sha = json.loads(old_manifest)["files"]["llm/model.onnx.data"]["sha256"]
    assert case["artifacts"]["files"]["llm/model.onnx.data"]["sha256"] != old_sha  # the new export was judged


def degrade(result: dict) -> dict:
    """A flaky device: one step's logits came back wrong."""
    result["steps"][1]["min_cosine"] = 0.5
    result["passed"], result["failures"] = False, ["prefill_decode[1] decode: cosine 0.500000 < 0.999"]
    return result


def test_failed_validation_reruns_without_reexport(ckpt, tmp_path, fake):
    out = tmp_path / "DIR"
    fake.fail_next = [EnvironmentProblem("the GPU fell off the bus"), degrade]
    assert run_make(ckpt, out) == 3  # an environment problem during validation
    case = report(out)["cases"][0]
    assert case["verdict"] == "error" and case["stage"] == "validate" and "fell off the bus" in case["reason"]
    assert not (out / ".stamps" / "validate.json").exists()
    export_state = snapshot(out / "export")

    assert run_make(ckpt, out) == 1  # validated again: this time it ran and failed
    case = report(out)["cases"][0]
    assert case["verdict"] == "fail" and case["metrics"]["worst_cosine"] == 0.5
    assert not (out / ".stamps" / "validate.json").exists()

    assert run_make(ckpt, out) == 0  # and again, now passing; the export was never redone
    assert report(out)["cases"][0]["verdict"] == "pass"
    assert snapshot(out / "export") == export_state
    assert fake.count("run_validate") == 3 and fake.count("build_image") == 1
    assert (out / ".stamps" / "validate.json").is_file()
    summary = (out / "report" / "summary.md").read_text()
    assert "note ckpt@x86-cpu (fixed): verdict fail -> pass" in summary


def test_pruned_image_is_rebuilt_before_validating(ckpt, tmp_path, fake):
    out = tmp_path / "DIR"
    assert run_make(ckpt, out) == 0
    first = json.loads((out / "images" / "x86-cpu.json").read_text())["id"]
    fake.removed.add(first)  # `docker image prune` since the last run
    (out / "validation" / "validation.json").unlink()  # the validate stage is stale now
    assert run_make(ckpt, out) == 0
    second = json.loads((out / "images" / "x86-cpu.json").read_text())["id"]
    assert second != first and fake.count("build_image") == 2
    assert fake.calls[-1][:3] == ("run_validate", "x86-cpu", second)


def test_force_redoes_every_stage(ckpt, tmp_path, fake):
    out = tmp_path / "DIR"
    assert run_make(ckpt, out) == 0
    inode = (out / "export" / "manifest.json").stat().st_ino
    assert run_make(ckpt, out, "--force") == 0
    assert (out / "export" / "manifest.json").stat().st_ino != inode
    assert fake.count("build_image") == 2 and fake.count("run_validate") == 2


def test_make_on_the_host_with_the_cpu_backend(ckpt, tmp_path, capsys):
    out = tmp_path / "DIR"
    assert main(["make", str(ckpt), "--target", "x86-cpu", "--out", str(out), "--no-container"]) == 0
    stdout = capsys.readouterr().out
    assert "ckpt@x86-cpu: PASS (worst_cosine 1.000000, top1_agreement 1.000)" in stdout
    assert "Qualification PASS" in stdout
    assert not (out / "images").exists() and (out / "validation" / "validation.json").is_file()
    q = report(out)
    assert q["verdict"] == "pass" and q["environment"]["extra"]["validated_in"] == "this host"
    before = snapshot(out)
    assert main(["-q", "make", str(ckpt), "--target", "x86-cpu", "--out", str(out), "--on-host"]) == 0
    assert snapshot(out) == before


def test_bad_checkpoint_is_an_error_case_with_exit_2(tmp_path, fake):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    out = tmp_path / "DIR"
    assert run_make(bad, out) == 2
    case = report(out)["cases"][0]
    assert case["verdict"] == "error" and case["stage"] == "export" and "config.json" in case["reason"]
    assert fake.calls == []


def test_refusals_before_any_work(ckpt, tmp_path, fake, capsys, monkeypatch):
    platforms = tmp_path / "platforms.json"
    platforms.write_text(json.dumps({"edgellm_release": "0.7.1", "targets": {
        "x86-cpu": {"backend": "cpu", "base_image": "python:3.11-slim-bookworm"},
        "h200": {"backend": "trt", "sm": 90, "base_image": "nvcr.io/nvidia/pytorch:25.12-py3"},
        "drive": {"backend": "trt", "sm": 110, "base_image": None}}}))
    monkeypatch.setenv("EDGELLM_PLATFORMS", str(platforms))
    out = tmp_path / "DIR"
    make_for = lambda target: main(["-q", "make", str(ckpt), "--target", target, "--out", str(out)])
    assert make_for("nope") == 2
    assert make_for("drive") == 2
    assert "no public base image" in capsys.readouterr().err and not out.exists()
    # SM 90: refused after the (cheap) export, before an image is built or anything is validated
    assert make_for("h200") == 2
    case = report(out)["cases"][0]
    assert case["stage"] == "gate" and "SM 90" in case["reason"] and fake.calls == []
    # edgellm validate --target: the same gate before the backend is opened (TensorRT is not even installed)
    assert main(["validate", str(out / "export"), "--target", "h200"]) == 2
    assert "target h200 cannot run this export" in capsys.readouterr().err
    monkeypatch.delenv("EDGELLM_PLATFORMS")
    assert main(["make", str(ckpt), "--target", "x86-cpu", "--out", str(out / "export")]) == 2
    assert "is an export directory" in capsys.readouterr().err
    assert main(["validate", str(out / "export"), "--target", "x86-cpu", "--backend", "trt"]) == 2
    assert main(["validate", str(out / "export"), "--plugin", "/x.so"]) == 2


def test_plugin_free_target_refuses_a_plugin_export_before_any_work(ckpt, tmp_path, fake, capsys):
    """x86-cuda-native's image has no plugin library: a plugin export for it is refused before it is made
    (exit 2, nothing written), and `edgellm validate --target` refuses an existing one the same way."""
    out = tmp_path / "DIR"
    assert main(["-q", "make", str(ckpt), "--target", "x86-cuda-native", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "x86-cuda-native has no Edge-LLM plugin library" in err and "--attention native" in err
    assert not out.exists() and fake.calls == []
    plugin_export = tmp_path / "plugin-export"
    assert main(["-q", "export", str(ckpt), str(plugin_export), "--no-golden"]) == 0
    assert main(["validate", str(plugin_export), "--target", "x86-cuda-native"]) == 2
    assert "needs the plugin (AttentionPlugin)" in capsys.readouterr().err


def test_validate_report_previous_and_regressions(ckpt, tmp_path, capsys):
    out = tmp_path / "OUT"
    assert main(["-q", "export", str(ckpt), str(out)]) == 0
    r1 = tmp_path / "r1"
    assert main(["-q", "validate", str(out), "--target", "x86-cpu", "--report", str(r1)]) == 0
    q = json.loads((r1 / "qualification.json").read_text())
    assert q["verdict"] == "pass" and q["cases"][0]["name"] == "OUT" and q["cases"][0]["target"] == "x86-cpu"
    assert (r1 / "junit.xml").is_file() and (r1 / "summary.md").is_file()
    # A previous qualification with a perfect max |diff|: today's 0.0078 is a regression (tolerance 1e-3).
    q["cases"][0]["metrics"]["max_abs"] = 0.0
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps(q))
    r2 = tmp_path / "r2"
    assert main(["-q", "validate", str(out), "--report", str(r2), "--previous", str(prev)]) == 0
    assert "REGRESSION **OUT** (metric): max_abs 0 -> " in (r2 / "summary.md").read_text()
    capsys.readouterr()
    assert main(["validate", str(out), "--report", str(r2), "--previous", str(prev), "--fail-on-regression"]) == 1
    assert "REGRESSION OUT (metric)" in capsys.readouterr().out
    assert main(["validate", str(out), "--previous", str(prev)]) == 2  # needs --report
    (tmp_path / "junk.json").write_text("{}")
    assert main(["validate", str(out), "--report", str(r2), "--previous", str(tmp_path / "junk.json")]) == 2
    # An export that cannot be validated is an error case in the report, and the error's exit code.
    (out / "llm" / "config.json").write_text("{}")
    assert main(["-q", "validate", str(out), "--report", str(r2)]) == 2
    q = json.loads((r2 / "qualification.json").read_text())
    assert q["verdict"] == "error" and "the export is truncated or altered" in q["cases"][0]["reason"]


def test_validate_with_target_and_report_runs_without_torch(ckpt, tmp_path):
    out = tmp_path / "OUT"
    assert main(["-q", "export", str(ckpt), str(out)]) == 0
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgellm_export.cli import main\n"
            f"rc = main(['-q', 'validate', {str(out)!r}, '--target', 'x86-cpu', '--report', {str(tmp_path / 'r')!r}])\n"
            "assert rc == 0, rc\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    assert json.loads((tmp_path / "r" / "qualification.json").read_text())["verdict"] == "pass"


def test_pipeline_api_with_thresholds_and_expectations(ckpt, tmp_path, fake):
    """The same pipeline from Python: a suite case's thresholds re-judge a stored validation without
    re-running it, and a negative control that fails as expected is a pass."""
    settings = MakeSettings(containers=fake)
    case = SuiteCase(name="demo", checkpoint=ckpt, target="x86-cpu", backend="cpu", release="0.7")
    assert make(case, tmp_path / "DIR", settings).exit_code == 0
    strict = SuiteCase(name="demo", checkpoint=ckpt, target="x86-cpu", backend="cpu", release="0.7",
                       thresholds={"max_abs": 1e-6})
    outcome = make(strict, tmp_path / "DIR", MakeSettings(containers=fake))
    (c,) = outcome.report["cases"]
    assert outcome.exit_code == 1 and c["verdict"] == "fail" and c["reason"].startswith("max_abs ")
    assert fake.count("run_validate") == 1  # judged again from the stored result
    control = SuiteCase(name="demo", checkpoint=ckpt, target="x86-cpu", backend="cpu", release="0.7",
                        thresholds={"max_abs": 1e-6}, expect="fail")
    outcome = make(control, tmp_path / "DIR", MakeSettings(containers=fake))
    assert outcome.exit_code == 0 and outcome.report["cases"][0]["verdict"] == "pass"


def test_container_build_command(fake, capsys):
    assert main(["-q", "container", "build", "x86-cpu", "--base-image", "edgellm-base:bookworm"]) == 0
    assert [c[0] for c in fake.calls] == ["build_image", "smoke"]
    assert fake.calls[0] == ("build_image", "x86-cpu", "edgellm-base:bookworm")
    assert "Built edgellm-validate:test-x86-cpu (sha256:" in capsys.readouterr().out


def test_image_inputs_are_the_build_context(tmp_path):
    files = image_inputs()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "edgellm_validate/data/platforms.json",
                 "containers/Dockerfile.tensorrt", "edgellm_validate/validate.py", "edgellm_export/cli.py"):
        assert files[name] == ROOT / name
    assert not any(k.startswith("containers/suites/") or "__pycache__" in k or k.endswith(".pyc") for k in files)
    assert "README.md" not in files and "ca_bundle" not in files
    ca = tmp_path / "ca.pem"
    assert image_inputs(ca)["ca_bundle"] == ca


def test_a_new_ca_bundle_rebuilds_the_image_only(ckpt, tmp_path, fake):
    out = tmp_path / "DIR"
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert run_make(ckpt, out, "--ca-bundle", str(ca)) == 0
    export_state = snapshot(out / "export")
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n")
    assert run_make(ckpt, out, "--ca-bundle", str(ca)) == 0
    assert fake.count("build_image") == 2 and fake.count("run_validate") == 2  # a new image id: validated in it
    assert snapshot(out / "export") == export_state
