"""The CPU validation image for real: build it from the root Dockerfile on a local base image, smoke-test it,
and validate a host-made export inside it; the container's verdict and metrics must match the host's.

Needs a docker daemon and the base image $EDGELLM_DOCKER_BASE (default edgellm-base:bookworm, made by
.ci/docker_up.sh with debootstrap; reused when `docker image inspect` finds it, else made here when
debootstrap is installed). Skips without a daemon, unless EDGELLM_REQUIRE_DOCKER=1 (CI), which turns every
skip into a failure. pip inside the build reaches PyPI through the host network with $EDGELLM_CA_BUNDLE
(default: the system CA bundle, which also carries a TLS-intercepting proxy's CA where there is one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edgellm_export.make import containers as C

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "EDGELLM_REQUIRE_DOCKER"
BASE = os.environ.get("EDGELLM_DOCKER_BASE", "edgellm-base:bookworm")
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
TAG = "edgellm-validate:test-x86-cpu"


def _skip_or_fail(reason: str):
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def client():
    try:
        return C.docker_client()
    except C.DockerUnavailable as e:
        _skip_or_fail(f"no docker: {e}")


@pytest.fixture(scope="module")
def base_image(client):
    import docker

    try:
        client.images.get(BASE)
        return BASE
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("debootstrap") is None and os.geteuid() != 0:
        _skip_or_fail(f"base image {BASE} is missing and cannot be made here (run .ci/docker_up.sh)")
    t0 = time.monotonic()
    subprocess.run(["bash", str(ROOT / ".ci/docker_up.sh")], check=True,
                   env={**os.environ, "EDGELLM_DOCKER_BASE": BASE})
    print(f"[containers] base image {BASE} made in {time.monotonic() - t0:.1f} s")
    return BASE


@pytest.fixture(scope="module")
def image(client, base_image):
    ca = os.environ.get(C.CA_ENV) or (SYSTEM_CA if Path(SYSTEM_CA).is_file() else None)
    info = C.build_image("x86-cpu", base_image=base_image, ca_bundle=ca, tag=TAG, client=client)
    print(f"[containers] {TAG} built in {info['seconds']} s")
    return info


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from edgellm_export.demo_checkpoint import write_demo_checkpoint
    from edgellm_export.export import export_checkpoint

    d = tmp_path_factory.mktemp("docker-demo")
    export_checkpoint(write_demo_checkpoint(d / "ckpt"), d / "out")
    return d / "out"


def test_image_labels_and_smoke(client, image):
    labels = image["labels"]
    assert labels["io.edgellm.target"] == "x86-cpu" and labels["io.edgellm.backend"] == "cpu"
    assert labels["io.edgellm.base-image"] == BASE and labels["io.edgellm.version"] == "0.1.0"
    report = C.smoke("x86-cpu", image["tag"], client=client)
    assert report["ok"] and report["validate_import"] and report["edgellm_release"] == "0.7.1"
    packages = report["versions"]["packages"]
    assert packages["onnxruntime"]["version"] == labels["io.edgellm.onnxruntime"]
    assert packages["onnx"]["version"] == labels["io.edgellm.onnx"]
    assert packages["numpy"]["version"] == labels["io.edgellm.numpy"]
    assert "torch" not in packages and "tensorrt" not in packages  # the CPU image stays small
    assert packages["edgellm-export"]["origin"].startswith("/opt/edgellm/python/")
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]


def test_validation_in_container_matches_host(client, image, export, tmp_path):
    from edgellm_validate.validate import validate_export

    host = validate_export(export, result_path=tmp_path / "host.json")
    t0 = time.monotonic()
    res = C.run_validate("x86-cpu", image["tag"], export, tmp_path / "box" / "validation.json", backend="cpu",
                         client=client, timeout=600)
    print(f"[containers] validation in the container: {time.monotonic() - t0:.1f} s")
    assert host["passed"] and res["passed"], res["failures"]
    assert res["backend"] == host["backend"] == "onnxruntime-cpu"
    assert res["container"]["exit_code"] == 0
    assert json.loads((tmp_path / "box" / "validation.json").read_text())["passed"]
    assert "Validation PASSED" in Path(res["container"]["log"]).read_text()
    # the same steps, the same verdicts, the same numbers (onnxruntime CPU kernels on the same machine)
    assert [(s["scenario"], s["step"], s["phase"]) for s in res["steps"]] == \
           [(s["scenario"], s["step"], s["phase"]) for s in host["steps"]]
    for a, b in zip(res["steps"], host["steps"]):
        assert a["top1_agree"] == b["top1_agree"]
        assert abs(a["min_cosine"] - b["min_cosine"]) < 1e-6
        assert abs(a["max_abs"] - b["max_abs"]) <= 1e-3 * max(1.0, b["max_abs"])
    assert res["top1_agreement"] == host["top1_agreement"]
    assert abs(res["worst_cosine"] - host["worst_cosine"]) < 1e-6
    assert not (export / "validation.json").exists()  # the export was mounted read-only, untouched


def _copy_export(export: Path, dst: Path) -> Path:
    shutil.copytree(export, dst)
    (dst / "validation.json").unlink(missing_ok=True)
    return dst


def test_failed_validation_comes_back_as_a_result(client, image, export, tmp_path):
    from safetensors.numpy import load_file, save_file

    from edgellm_export.manifest import write_manifest

    bad = _copy_export(export, tmp_path / "bad")
    logits = bad / "llm" / "golden" / "logits.safetensors"
    save_file({k: -v for k, v in load_file(logits).items()}, logits)  # golden top-1 now wrong everywhere
    write_manifest(bad)
    res = C.run_validate("x86-cpu", image["tag"], bad, tmp_path / "res" / "v.json", backend="cpu", client=client,
                         timeout=600)
    assert res["passed"] is False and res["container"]["exit_code"] == 1 and res["failures"]
    assert res["top1_agreement"] < 1.0 and np.isfinite(res["max_abs"])


def test_tampered_export_is_refused_in_the_container(client, image, export, tmp_path):
    tampered = _copy_export(export, tmp_path / "tampered")
    cfg = tampered / "llm" / "config.json"
    cfg.write_text(cfg.read_text().replace("}", ' }', 1))  # one byte more: the manifest no longer matches
    with pytest.raises(C.ContainerFailed, match=r"bad input \(exit 2\)[\s\S]*manifest") as e:
        C.run_validate("x86-cpu", image["tag"], tampered, tmp_path / "res" / "v.json", backend="cpu", client=client,
                       timeout=600)
    assert e.value.exit_code == 2
    assert not [c for c in client.containers.list(all=True, filters={"label": "io.edgellm.role=validate"})]


# ---------------------------------------------------------------- containers/Dockerfile.tensorrt, for real

FAKE_TRT = '''__version__ = "10.13.3.9"
class _Registry:
    def get_creator(self, name, version, namespace):
        return object()
def get_plugin_registry():
    return _Registry()
'''
FAKE_CMAKE = '''cmake_minimum_required(VERSION 3.18)
project(stand_in_edgellm C)
message(STATUS "STAND-IN ARCHS=${CMAKE_CUDA_ARCHITECTURES} CTK=${CUDA_CTK_VERSION} TRT=${TRT_PACKAGE_DIR}")
add_library(NvInfer_edgellm_plugin SHARED plugin.c)
'''


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture
def stand_in_upstream(tmp_path):
    """A git daemon on 127.0.0.1 serving a stand-in TensorRT-Edge-LLM (tag v0.7.1) whose CMake project builds
    a libNvInfer_edgellm_plugin.so; yields (url, commit)."""
    import socket

    if shutil.which("git") is None:
        _skip_or_fail("git is not installed")
    src = tmp_path / "src"
    (src / "cmake").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(FAKE_CMAKE)
    (src / "plugin.c").write_text("int edgellm_stand_in(void) { return 1; }\n")
    (src / "cmake" / "aarch64_linux_toolchain.cmake").write_text("# stand-in\n")
    _git("init", "-q", cwd=src)
    _git("add", "-A", cwd=src)
    _git("commit", "-qm", "stand-in", cwd=src)
    _git("tag", "v0.7.1", cwd=src)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, check=True, capture_output=True,
                            text=True).stdout.strip()
    served = tmp_path / "served"
    served.mkdir()
    _git("clone", "-q", "--bare", str(src), str(served / "TensorRT-Edge-LLM.git"), cwd=tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={served}",
                               f"--port={port}", "--listen=127.0.0.1"], stderr=subprocess.DEVNULL)
    url = f"git://127.0.0.1:{port}/TensorRT-Edge-LLM.git"
    try:
        for _ in range(50):
            if subprocess.run(["git", "ls-remote", url], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        yield url, commit
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def test_tensorrt_dockerfile_builds_with_a_stand_in_upstream(client, base_image, stand_in_upstream, tmp_path):
    """Everything of containers/Dockerfile.tensorrt but NVIDIA's bits: the base image gets a stand-in `tensorrt`
    module, the upstream a stand-in CMake project; the clone by tag + commit pin, the CMake flags, the venv
    over the base image's packages, the final stage's layout, labels and environment, and the smoke check
    (which must then fail only for want of a GPU) are real."""
    url, commit = stand_in_upstream
    ctx = tmp_path / "base"
    ctx.mkdir()
    (ctx / "tensorrt.py").write_text(FAKE_TRT)
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv "
        "&& rm -rf /var/lib/apt/lists/*\n"
        "COPY tensorrt.py /usr/lib/python3/dist-packages/tensorrt/__init__.py\n")
    fake_base = "edgellm-test:stand-in-tensorrt-base"
    client.images.build(path=str(ctx), tag=fake_base, network_mode="host", rm=True, forcerm=True)
    ca = os.environ.get(C.CA_ENV) or (SYSTEM_CA if Path(SYSTEM_CA).is_file() else None)
    info = C.build_image("x86-cuda", base_image=fake_base, ca_bundle=ca, tag="edgellm-test:stand-in-x86-cuda",
                         client=client, extra_build_args={"EDGELLM_REPO": url, "EDGELLM_COMMIT": commit,
                                                          "WITH_PYCUDA": "0", "MAX_JOBS": "2"})
    print(f"[containers] stand-in TensorRT image built in {info['seconds']} s")
    labels = info["labels"]
    assert labels["io.edgellm.backend"] == "trt" and labels["io.edgellm.target"] == "x86-cuda"
    assert labels["io.edgellm.upstream.tag"] == "v0.7.1" and labels["io.edgellm.upstream.commit"] == commit
    assert labels["io.edgellm.plugin.cuda-architectures"] == "80;86;89;100a;120"
    assert labels["io.edgellm.plugin.cuda-ctk"] == "12.8" and labels["io.edgellm.base-image"] == fake_base
    script = ("cat /opt/edgellm/lib/edgellm-upstream-commit; echo $EDGELLM_PLUGIN_PATH; "
              "python -m edgellm_validate.smoke --json || true")
    out = client.containers.run(info["tag"], ["sh", "-c", script], remove=True, network_mode="none").decode()
    upstream_commit, plugin_path, marker = out.strip().splitlines()[-3:]
    assert upstream_commit == commit and plugin_path == "/opt/edgellm/lib/libNvInfer_edgellm_plugin.so"
    from edgellm_validate.smoke import MARKER

    report = json.loads(marker[len(MARKER):])
    assert report["tensorrt"] == {"version": "10.13.3.9",
                                  "origin": "/usr/lib/python3/dist-packages/tensorrt/__init__.py"}
    assert report["plugin"] == {"path": plugin_path, "source": "EDGELLM_PLUGIN_PATH", "attention_plugin": True}
    assert report["problems"] == [report["gpu_query"]] and "no GPU visible" in report["gpu_query"]
    # and with the target's GPU options, a docker host without the NVIDIA toolkit is told so
    with pytest.raises(C.ContainerFailed, match="NVIDIA Container Toolkit"):
        C.smoke("x86-cuda", info["tag"], client=client)


def test_edgellm_make_validates_inside_the_image_it_built(base_image, tmp_path):
    """The whole command for real: `edgellm make DEMO --target x86-cpu` builds the image through the docker
    SDK, smoke-tests it, validates inside it and collects the reports on the host; a second run with
    nothing changed rewrites nothing outside DIR/report/."""
    from test_make import report, snapshot

    from edgellm_export.cli import main
    from edgellm_export.demo_checkpoint import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "make"
    ca = os.environ.get(C.CA_ENV) or (SYSTEM_CA if Path(SYSTEM_CA).is_file() else None)
    args = ["-q", "make", str(ckpt), "--target", "x86-cpu", "--out", str(out), "--base-image", base_image]
    args += ["--ca-bundle", ca] if ca else []
    assert main(args) == 0
    q = report(out)
    assert q["verdict"] == "pass" and [c["verdict"] for c in q["cases"]] == ["pass"]
    assert (out / "report" / "junit.xml").is_file() and (out / "report" / "summary.md").is_file()
    image = json.loads((out / "images" / "x86-cpu.json").read_text())
    assert image["labels"]  # the tool built (or reused) the image and recorded it
    result = json.loads((out / "validation" / "validation.json").read_text())
    assert result["passed"]
    assert q["environment"]["extra"]["validated_in"] == "target container"
    assert (out / "validation" / "validation.log").stat().st_size > 0  # the container's own log
    before = snapshot(out)
    assert main(args) == 0
    assert snapshot(out) == before
