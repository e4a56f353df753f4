"""The CPU validation image for real: build it from the root Dockerfile on a local base image, smoke-test it,
and validate a host-made export inside it; the container's verdict and metrics must match the host's.

Needs a docker daemon and the base image $EDGELLM_DOCKER_BASE (default edgellm-base:bookworm, made by
.ci/docker_up.sh with debootstrap; reused when `docker image inspect` finds it, else made here when
debootstrap is installed). Skips without a daemon, unless EDGELLM_REQUIRE_DOCKER=1 (CI), which turns every
skip into a failure. pip inside the build reaches PyPI through the host network with $EDGELLM_CA_BUNDLE
(default: the system CA bundle, which also carries a TLS-intercepting proxy's CA where there is one).
The TLS trust tests serve their own package index over HTTPS on 127.0.0.1 with a throwaway CA (made with the
openssl command) and build through build_image with the host network: PIP_CERT alone makes the build trust it,
no bundle at all gives the one-line TLS trust error.
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

    from edgellm_core.manifest import write_manifest

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

STAND_IN_TRT_VERSION = "10.15.1.29"  # in both images' ranges: the plugin's [10.3, 11), the plugin-free [10.15, 11)
FAKE_TRT = f'''__version__ = "{STAND_IN_TRT_VERSION}"
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


@pytest.fixture(scope="module")
def stand_in_trt_base(client, base_image, tmp_path_factory):
    """A base image with a stand-in `tensorrt` module where JetPack / NGC images keep theirs, and the package
    metadata pip would have left (the image build checks the version from it)."""
    ctx = tmp_path_factory.mktemp("stand-in-trt-base")
    (ctx / "tensorrt.py").write_text(FAKE_TRT)
    (ctx / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt\nVersion: {STAND_IN_TRT_VERSION}\n")
    site = "/usr/lib/python3/dist-packages"
    (ctx / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv "
        "&& rm -rf /var/lib/apt/lists/*\n"
        f"COPY tensorrt.py {site}/tensorrt/__init__.py\n"
        f"COPY METADATA {site}/tensorrt-{STAND_IN_TRT_VERSION}.dist-info/METADATA\n")
    tag = "edgellm-test:stand-in-tensorrt-base"
    client.images.build(path=str(ctx), tag=tag, network_mode="host", rm=True, forcerm=True)
    return tag


def test_tensorrt_dockerfile_builds_with_a_stand_in_upstream(client, stand_in_trt_base, stand_in_upstream, tmp_path):
    """Everything of containers/Dockerfile.tensorrt but NVIDIA's bits: the base image gets a stand-in `tensorrt`
    module, the upstream a stand-in CMake project; the clone by tag + commit pin, the CMake flags, the venv
    over the base image's packages, the final stage's layout, labels and environment, and the smoke check
    (which must then fail only for want of a GPU) are real."""
    url, commit = stand_in_upstream
    fake_base = stand_in_trt_base
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
    assert report["tensorrt"] == {"version": STAND_IN_TRT_VERSION,
                                  "origin": "/usr/lib/python3/dist-packages/tensorrt/__init__.py"}
    assert labels["io.edgellm.plugin"] == "edgellm"
    from edgellm_validate.trt.plugin import exported_plugins

    assert report["plugin"] == {"path": plugin_path, "source": "EDGELLM_PLUGIN_PATH", "attention_plugin": True,
                                "creators": [name for name, _, _ in exported_plugins()]}
    assert report["problems"] == [report["gpu_query"]] and "no GPU visible" in report["gpu_query"]
    # and with the target's GPU options, a docker host without the NVIDIA toolkit is told so
    with pytest.raises(C.ContainerFailed, match="NVIDIA Container Toolkit"):
        C.smoke("x86-cuda", info["tag"], client=client)


def test_plugin_free_image_has_no_plugin_and_checks_tensorrt(client, stand_in_trt_base):
    """x86-cuda-native: the same Dockerfile stopped at its `native` stage. No upstream clone (no git daemon is
    even running), no plugin library or its variables; the smoke check asks nothing of a plugin and fails only
    for want of a GPU. A base image whose TensorRT is outside the range fails the build, saying so."""
    ca = os.environ.get(C.CA_ENV) or (SYSTEM_CA if Path(SYSTEM_CA).is_file() else None)
    info = C.build_image("x86-cuda-native", base_image=stand_in_trt_base, ca_bundle=ca,
                         tag="edgellm-test:stand-in-x86-cuda-native", client=client,
                         extra_build_args={"WITH_PYCUDA": "0"})
    print(f"[containers] plugin-free stand-in TensorRT image built in {info['seconds']} s")
    labels = info["labels"]
    assert labels["io.edgellm.target"] == "x86-cuda-native" and labels["io.edgellm.plugin"] == "none"
    assert not any(k.startswith(("io.edgellm.upstream", "io.edgellm.plugin.")) for k in labels), labels
    assert labels["io.edgellm.sm"] == "80,86,89,90,100,103,120"
    script = ("ls /opt/edgellm/lib 2>/dev/null | wc -l; echo \"plugin=$EDGELLM_PLUGIN_PATH\"; "
              "python -m edgellm_validate.smoke --json || true")
    out = client.containers.run(info["tag"], ["sh", "-c", script], remove=True, network_mode="none").decode()
    libs, plugin_env, marker = out.strip().splitlines()[-3:]
    assert libs == "0" and plugin_env == "plugin="
    from edgellm_validate.smoke import MARKER

    report = json.loads(marker[len(MARKER):])
    assert report["target"] == "x86-cuda-native" and report["plugin"] is None
    assert report["tensorrt"]["version"] == STAND_IN_TRT_VERSION
    assert report["problems"] == [report["gpu_query"]] and "no GPU visible" in report["gpu_query"]
    with pytest.raises(C.ImageBuildError, match=rf"has TensorRT {STAND_IN_TRT_VERSION} .*10\.16 up to"):
        C.build_image("x86-cuda-native", base_image=stand_in_trt_base, ca_bundle=ca, tag="edgellm-test:too-old",
                      client=client, extra_build_args={"WITH_PYCUDA": "0", "TENSORRT_RANGE": "10.16,11.0"})


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
    if ca:  # and the CA bundle it was built with
        assert image["ca_bundle"]["source"] == "--ca-bundle" and image["ca_bundle"]["path"] == str(Path(ca).absolute())
    result = json.loads((out / "validation" / "validation.json").read_text())
    assert result["passed"]
    assert q["environment"]["extra"]["validated_in"] == "target container"
    assert (out / "validation" / "validation.log").stat().st_size > 0  # the container's own log
    before = snapshot(out)
    assert main(args) == 0
    assert snapshot(out) == before


# ---------------------------------------------------------------- TLS trust: a private index behind a throwaway CA

TRUST_VARS = (C.CA_ENV, "PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
PROBE = "edgellm_tls_probe"  # the one package of the local index, a wheel the test builds itself
# After the product Dockerfile's own base stage: pip installs the probe from $PIP_INDEX_URL, trusting the CA
# bundle the way install_validate.sh does (build_image puts it at CA_CONTEXT_PATH and passes CA_BUNDLE).
PROBE_STAGE = """
FROM base
RUN python3 -m venv /opt/probe
ARG CA_BUNDLE=
ARG PIP_INDEX_URL=
COPY Dockerfile containers/.edgellm-ca-bundle.cr[t] /src/containers/
RUN if [ -n "$CA_BUNDLE" ]; then \\
        ca="/src/$CA_BUNDLE"; export PIP_CERT="$ca" SSL_CERT_FILE="$ca" REQUESTS_CA_BUNDLE="$ca"; \\
    fi; \\
    PIP_INDEX_URL="$PIP_INDEX_URL" PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=20 PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/probe/bin/python -m pip install --no-deps edgellm-tls-probe==1.0 \\
    && /opt/probe/bin/python -c 'import edgellm_tls_probe as p; assert p.TRUSTED'
"""


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _throwaway_ca(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it; returns (ca.pem, server.pem, server.key)."""
    if shutil.which("openssl") is None:
        _skip_or_fail("the openssl command is not installed (it makes the test's throwaway CA)")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=edgellm throwaway test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                                  "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                                  "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)
    return d / "ca.pem", d / "server.pem", d / "server.key"


def _probe_wheel(d: Path) -> Path:
    """A pure-python wheel, edgellm-tls-probe 1.0, with a valid RECORD."""
    import base64
    import hashlib
    import zipfile

    info = f"{PROBE}-1.0.dist-info"
    files = {f"{PROBE}/__init__.py": b"TRUSTED = True\n",
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: edgellm-tls-probe\nVersion: 1.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgellm-tests\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n"}

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(data)},{len(data)}\n" for name, data in files.items())
    record += f"{info}/RECORD,,\n"
    path = d / f"{PROBE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in [*files.items(), (f"{info}/RECORD", record.encode())]:
            z.writestr(name, data)
    return path


@pytest.fixture
def tls_index(tmp_path):
    """A PEP 503 "simple" index over HTTPS on 127.0.0.1 (certificate from a throwaway CA) serving the probe
    wheel; yields (index URL, CA file, server) where server.requests / server.tls_failures say what happened."""
    import functools
    import hashlib
    import http.server
    import ssl
    import threading

    ca, cert, key = _throwaway_ca(tmp_path)
    root = tmp_path / "index"
    (root / "packages").mkdir(parents=True)
    wheel = _probe_wheel(root / "packages")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "edgellm-tls-probe").mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<a href="edgellm-tls-probe/">edgellm-tls-probe</a>\n')
    (root / "simple" / "edgellm-tls-probe" / "index.html").write_text(
        f'<a href="../../packages/{wheel.name}#sha256={digest}">{wheel.name}</a>\n')
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            self.server.requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def finish_request(self, request, client_address):  # the handshake in the request's thread
            request.settimeout(30)
            try:
                tls = context.wrap_socket(request, server_side=True)
            except OSError as e:  # the client refused our certificate
                self.tls_failures.append(str(e))
                return
            try:
                super().finish_request(tls, client_address)
            finally:
                tls.close()

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    server.requests, server.tls_failures = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/simple/", ca, server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def probe_context(tmp_path):
    """A build context: the product Dockerfile's base stage + PROBE_STAGE, as build_image builds it."""
    text = (ROOT / "Dockerfile").read_text()
    head, sep, _ = text.partition("\nFROM base AS deps")
    assert sep, "the root Dockerfile no longer has its `FROM base AS deps` stage; update PROBE_STAGE's test"
    ctx = tmp_path / "probe-context"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(head + "\n" + PROBE_STAGE)
    return ctx


def _no_trust_variables(monkeypatch):
    for name in TRUST_VARS:
        monkeypatch.delenv(name, raising=False)


def test_build_trusts_the_ca_given_through_pip_cert(client, base_image, tls_index, probe_context, monkeypatch):
    """Only PIP_CERT names the throwaway CA (as on a host whose pip works behind a TLS-intercepting proxy): the
    build takes it, pip inside verifies the index's certificate and installs the wheel, the result records it."""
    import hashlib

    url, ca, server = tls_index
    _no_trust_variables(monkeypatch)
    monkeypatch.setenv("PIP_CERT", str(ca))
    info = C.build_image("x86-cpu", base_image=base_image, root=probe_context, tag="edgellm-test:tls-probe",
                         client=client, extra_build_args={"PIP_INDEX_URL": url})
    print(f"[containers] TLS probe image (CA from PIP_CERT) built in {info['seconds']} s")
    assert info["ca_bundle"] == {"source": "PIP_CERT", "path": str(ca),
                                 "sha256": hashlib.sha256(ca.read_bytes()).hexdigest()}
    assert f"/packages/{PROBE}-1.0-py3-none-any.whl" in server.requests and not server.tls_failures
    out = client.containers.run(info["tag"], ["/opt/probe/bin/python", "-c", f"import {PROBE}; print({PROBE}.TRUSTED)"],
                                remove=True, network_mode="none")
    assert out.decode().strip() == "True"


def test_build_without_a_ca_bundle_says_tls_trust(client, base_image, tls_index, probe_context, monkeypatch):
    """No --ca-bundle, EDGELLM_CA_BUNDLE, PIP_CERT, SSL_CERT_FILE or REQUESTS_CA_BUNDLE: pip refuses the
    index's certificate and the build fails with one line naming the TLS trust problem and the way out."""
    url, _, server = tls_index
    _no_trust_variables(monkeypatch)
    with pytest.raises(C.TlsTrustError) as e:
        C.build_image("x86-cpu", base_image=base_image, root=probe_context, tag="edgellm-test:tls-probe-untrusted",
                      client=client, extra_build_args={"PIP_INDEX_URL": url})
    text = str(e.value)
    print(f"[containers] untrusted build: {text}")
    assert "\n" not in text and e.value.exit_code == 3
    assert "a TLS trust problem" in text and "had no CA bundle" in text
    assert text.endswith("--ca-bundle FILE or EDGELLM_CA_BUNDLE=FILE")
    assert "CERTIFICATE_VERIFY_FAILED" in e.value.log_tail  # pip's own words, kept for whoever wants them
    assert server.tls_failures and not any(p.endswith(".whl") for p in server.requests)
