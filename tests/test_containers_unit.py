"""Validation containers without a docker daemon: Dockerfile args, plugin build commands, and the docker SDK
calls of build_image / smoke / run_validate against a fake client."""

from __future__ import annotations

import gzip
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgellm_core.errors import EnvironmentProblem, ExportError
from edgellm_export.make import containers as C
from edgellm_validate import smoke as S
from edgellm_validate.targets import TargetError, TargetRefusal, get_target, load_platforms

ROOT = Path(__file__).resolve().parents[1]
TRT_TARGETS = ["x86-cuda", "orin-jp6", "orin-jp7", "thor-jp7", "drive-thor"]  # with the plugin library
PLUGIN_FREE_TARGETS = ["x86-cuda-native"]
BASES = {"drive-thor": "example.com/driveos-sdk:7.2"}  # the matrix has no public DriveOS image
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
TRUST_VARS = (C.CA_ENV, "PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


@pytest.fixture(autouse=True)
def no_host_trust(monkeypatch):
    """These tests choose their CA bundle themselves: none of the host's trust variables leaks in."""
    for name in TRUST_VARS:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- a fake docker client


class FakeImage:
    def __init__(self, tag, labels):
        self.id = "sha256:" + "ab" * 32
        self.tags = [tag]
        self.labels = labels


class FakeContainer:
    def __init__(self, client, image, command, kwargs):
        self.client, self.image, self.command, self.kwargs = client, image, command, kwargs
        self.name = kwargs.get("name")
        self.killed = self.removed = self.started = False
        self.code, self.log = 0, b""

    def start(self):
        self.started = True
        self.code, self.log = self.client.behaviour(self)

    def wait(self, timeout=None):
        if self.code == "hang":
            raise TimeoutError("read timed out")  # what requests raises, in spirit
        return {"StatusCode": self.code, "Error": None}

    def logs(self, stdout=True, stderr=True):
        return self.log

    def kill(self):
        self.killed = True

    def remove(self, force=False):
        self.removed = True


class FakeApi:
    def __init__(self, client):
        self.client = client

    def build(self, **kwargs):
        self.client.build_calls.append(kwargs)
        kwargs["fileobj"].seek(0)
        self.client.context = kwargs["fileobj"].read()
        yield from self.client.build_chunks


class FakeImages:
    def __init__(self, client):
        self.client = client

    def get(self, tag):
        return FakeImage(tag, {"io.edgellm.target": self.client.build_calls[-1]["buildargs"]["TARGET"]})


class FakeContainers:
    def __init__(self, client):
        self.client = client

    def create(self, image, command, **kwargs):
        c = FakeContainer(self.client, image, command, kwargs)
        self.client.created.append(c)
        return c


class FakeClient:
    def __init__(self, arch="amd64", behaviour=None, build_chunks=None):
        self.arch = arch
        self.api, self.images, self.containers = FakeApi(self), FakeImages(self), FakeContainers(self)
        self.build_calls, self.created = [], []
        self.context = None
        self.behaviour = behaviour or (lambda c: (0, b""))
        self.build_chunks = build_chunks if build_chunks is not None else [
            {"stream": "Step 1/2 : FROM base\n"}, {"stream": " ---> 123\nSuccessfully built 123\n"}]

    def version(self):
        return {"Arch": self.arch, "ApiVersion": "1.41"}


def context_members(client) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(client.context))) as t:
        return {m.name: (t.extractfile(m).read() if m.isfile() else b"") for m in t.getmembers()}


# ---------------------------------------------------------------- Dockerfiles and their args


def dockerfile_args(path: Path) -> tuple[set[str], set[str]]:
    """(declared ARG names, names referenced as $X / ${X} in the Dockerfile's instructions)."""
    text = path.read_text()
    declared = set(re.findall(r"^ARG\s+([A-Z_][A-Z0-9_]*)", text, re.M))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", body))
    return declared, used


def test_dockerfile_per_target_and_files_exist():
    assert C.dockerfile_for("x86-cpu") == "Dockerfile"
    for name in TRT_TARGETS + PLUGIN_FREE_TARGETS:
        assert C.dockerfile_for(name) == "containers/Dockerfile.tensorrt"
    assert set(load_platforms()) == {"x86-cpu", *TRT_TARGETS, *PLUGIN_FREE_TARGETS}
    assert [n for n, t in load_platforms().items() if t.backend == "trt" and not t.plugin] == PLUGIN_FREE_TARGETS
    for rel in ("Dockerfile", "containers/Dockerfile.tensorrt", "containers/install_validate.sh",
                "containers/build_edgellm_plugin.sh", "containers/requirements-validate.txt", ".dockerignore"):
        assert (ROOT / rel).is_file(), rel


def dockerfile_stages(path: Path, upto: str | None) -> str:
    """The Dockerfile's text up to the end of stage `upto` (None: all of it): what the legacy builder runs for
    `--target upto` (it builds every stage before the target, needed or not)."""
    text = path.read_text()
    if upto is None:
        return text
    start = re.search(rf"^FROM \S+ AS {upto}\s*$", text, re.M)
    assert start, upto
    after = re.search(r"^FROM ", text[start.end():], re.M)
    return text[: start.end() + (after.start() if after else len(text) - start.end())]


@pytest.mark.parametrize("name", ["x86-cpu", *TRT_TARGETS, *PLUGIN_FREE_TARGETS])
def test_build_args_are_declared_by_the_dockerfile(name, tmp_path):
    args = C.build_args(name, base_image=BASES.get(name), ca_context_path=C.CA_CONTEXT_PATH)
    built = tmp_path / "Dockerfile"  # the stages this target's build runs
    built.write_text(dockerfile_stages(ROOT / C.dockerfile_for(name), C.build_stage(name)))
    declared, used = dockerfile_args(built)
    assert set(args) <= declared, set(args) - declared  # docker ignores unknown build args silently
    runtime_env = {"PATH", "LD_LIBRARY_PATH", "extra", "ca", "SRC", "VENV"}
    assert used - declared <= runtime_env, used - declared - runtime_env


def test_cpu_build_args():
    args = C.build_args("x86-cpu")
    assert args == {"BASE_IMAGE": "python:3.11-slim-bookworm", "TARGET": "x86-cpu", "EDGELLM_VERSION": "0.1.0"}
    assert C.build_args("x86-cpu", base_image="edgellm-base:bookworm")["BASE_IMAGE"] == "edgellm-base:bookworm"
    assert "CA_BUNDLE" in C.build_args("x86-cpu", ca_context_path="containers/x.crt")
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text  # platforms.json's default
    assert get_target("x86-cpu").base_image == "python:3.11-slim-bookworm"
    # versions are labels; torch is refused in the CPU image; the CA file stays in the build stage
    for label in ("io.edgellm.version", "io.edgellm.onnxruntime", "io.edgellm.base-image", "io.edgellm.target"):
        assert label in text
    assert "NO_TORCH=1" in text
    final = text.rsplit("\nFROM ", 1)[1]
    assert "CA_BUNDLE" not in final
    assert re.findall(r"^COPY --from=(\S+) (\S+)", final, re.M) == [
        ("deps", "/opt/edgellm/venv"), ("package", "/opt/edgellm/python"), ("package", "/opt/edgellm/share")]


@pytest.mark.parametrize("name,embedded,arch,ctk,cute", [
    ("x86-cuda", None, "80;86;89;100a;120", "12.8", None),
    ("orin-jp6", "jetson-orin", "87", "12.6", None),
    ("orin-jp7", "jetson-orin", "87", "13.2", None),
    ("thor-jp7", "jetson-thor", "110a", "13.0", "ALL"),
    ("drive-thor", "auto-thor", "110a", "13.2", None),
])
def test_trt_build_args(name, embedded, arch, ctk, cute):
    args = C.build_args(name, base_image=BASES.get(name))
    assert args["EDGELLM_TAG"] == "v0.7.1" and args["EDGELLM_REPO"] == C.UPSTREAM_REPO
    assert args.get("EMBEDDED_TARGET") == embedded
    assert args["CMAKE_CUDA_ARCHITECTURES"] == arch and args["CUDA_CTK_VERSION"] == ctk
    assert args.get("ENABLE_CUTE_DSL") == cute
    assert args["BASE_IMAGE"] == (BASES.get(name) or get_target(name).base_image)
    assert "CUDA_VERSION" not in args  # Edge-LLM rejects -DCUDA_VERSION


def test_plugin_free_build_args_and_stage():
    """x86-cuda-native: the `native` stage, none of the plugin's build args, and TensorRT 10.15 up to 11 checked
    against the base image (the plugin images check the plugin's own range)."""
    args = C.build_args("x86-cuda-native")
    assert C.build_stage("x86-cuda-native") == "native" and C.build_stage("x86-cuda") is None
    assert C.build_stage("x86-cpu") is None
    assert not {"EDGELLM_REPO", "EDGELLM_TAG", *C.PLUGIN_BUILD_ARGS} & set(args)
    assert args["TENSORRT_RANGE"] == "10.15,11.0" and C.build_args("x86-cuda")["TENSORRT_RANGE"] == "10.3,11.0"
    assert args["EXPECTED_SM"] == "80,86,89,90,100,103,120"  # SM 90 included: no decode-attention kernels needed
    assert "90" not in C.build_args("x86-cuda")["EXPECTED_SM"].split(",")
    stages = "\n".join(line for line in dockerfile_stages(ROOT / C.TRT_DOCKERFILE, "native").splitlines()
                        if not line.lstrip().startswith("#"))
    assert "AS plugin" not in stages and "--from=plugin" not in stages and "build_edgellm_plugin" not in stages
    assert "EDGELLM_PLUGIN_PATH" not in stages and 'io.edgellm.plugin="none"' in stages
    assert 'TENSORRT_RANGE="$TENSORRT_RANGE"' in stages  # reaches install_validate.sh


@pytest.mark.parametrize("version,ok", [("10.15.1.29", True), ("10.16.0", True), ("10.13.3.9", False),
                                        ("11.0.0.3", False), (None, True)])
def test_install_script_checks_the_base_images_tensorrt(version, ok, tmp_path):
    """install_validate.sh package's TENSORRT_RANGE check, run on its own: a python whose `tensorrt` package
    metadata says `version` (None: no metadata, left to the smoke check)."""
    site = tmp_path / "site"
    site.mkdir()
    if version:
        dist = site / f"tensorrt-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt\nVersion: {version}\n")
    script = (ROOT / "containers/install_validate.sh").read_text()
    check = script[script.index('    if [ -n "${TENSORRT_RANGE:-}" ]; then'):]
    check = check[: check.index("\n    fi\n") + len("\n    fi\n")]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site), "TENSORRT_RANGE": "10.15,11.0",
           "PYTHONNOUSERSITE": "1"}
    r = subprocess.run(["sh", "-c", f"py={sys.executable} ; set -eu\n{check}"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    if version is not None and not ok:
        assert r.returncode != 0 and f"has TensorRT {version}" in r.stderr and "10.15 up to, not including, 11.0" \
            in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert ("within" if version else "no package metadata") in r.stdout


def test_dockerfiles_default_version_is_the_packages():
    from edgellm_export import __version__

    for rel in ("Dockerfile", "containers/Dockerfile.tensorrt"):  # plain `docker build` labels it right too
        assert f"ARG EDGELLM_VERSION={__version__}\n" in (ROOT / rel).read_text(), rel


def test_drive_thor_needs_a_base_image():
    with pytest.raises(TargetError, match="no public base image"):
        C.build_args("drive-thor")


def test_trt_dockerfile_uses_the_base_images_tensorrt():
    text = (ROOT / "containers/Dockerfile.tensorrt").read_text()
    assert re.search(r"^ARG BASE_IMAGE\s*$", text, re.M)  # no default: the base must be chosen
    assert not re.search(r"pip[^\n]*install[^\n]*\btensorrt\b", text)
    assert "SYSTEM_SITE_PACKAGES=1" in text and "REQUIRE_TENSORRT=1" in text
    assert "EDGELLM_PLUGIN_PATH=/opt/edgellm/lib/libNvInfer_edgellm_plugin.so" in text
    # every plugin build arg reaches the build script
    for key in C.PLUGIN_BUILD_ARGS + ("EDGELLM_REPO", "EDGELLM_TAG", "MAX_JOBS"):
        assert f'{key}="${key}"' in text, key
    for label in ("io.edgellm.upstream.tag", "io.edgellm.plugin.cuda-architectures", "io.edgellm.tensorrt",
                  "io.edgellm.base-image", "io.edgellm.version", "io.edgellm.target"):
        assert label in text
    assert "CA_BUNDLE" not in text.rsplit("\nFROM ", 1)[1]


def plugin_commands(env: dict) -> list[str]:
    out = subprocess.run(["bash", str(ROOT / "containers/build_edgellm_plugin.sh")], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "MAX_JOBS": "8", **env}, check=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("name", TRT_TARGETS)
def test_plugin_build_commands(name):
    args = C.build_args(name, base_image=BASES.get(name))
    clone, configure, build = plugin_commands(args)
    assert clone.startswith("git clone --branch v0.7.1 --depth 1 --recurse-submodules")
    assert "https://github.com/NVIDIA/TensorRT-Edge-LLM.git /opt/TensorRT-Edge-LLM" in clone
    t = get_target(name)
    assert "-DTRT_PACKAGE_DIR=/usr" in configure and "-DCMAKE_BUILD_TYPE=Release" in configure
    assert f"-DCUDA_CTK_VERSION={t.plugin_build['CUDA_CTK_VERSION']}" in configure
    assert f"-DCMAKE_CUDA_ARCHITECTURES={t.plugin_build['CMAKE_CUDA_ARCHITECTURES']}".replace(";", "\\;") in configure
    assert "-DCUDA_VERSION" not in configure
    toolchain = "-DCMAKE_TOOLCHAIN_FILE=/opt/TensorRT-Edge-LLM/cmake/aarch64_linux_toolchain.cmake"
    if t.arch == "aarch64":
        assert f"-DEMBEDDED_TARGET={t.plugin_build['EMBEDDED_TARGET']}" in configure and toolchain in configure
    else:
        assert "EMBEDDED_TARGET" not in configure and "TOOLCHAIN" not in configure
    assert ("-DENABLE_CUTE_DSL=ALL" in configure) == (name == "thor-jp7")
    assert build.endswith("--parallel 8 --target NvInfer_edgellm_plugin ")


def test_plugin_build_needs_a_tag():
    r = subprocess.run(["bash", str(ROOT / "containers/build_edgellm_plugin.sh")], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})
    assert r.returncode != 0 and "EDGELLM_TAG" in r.stderr


def test_shell_scripts_parse():
    for script in ("containers/build_edgellm_plugin.sh", ".ci/docker_up.sh"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
    subprocess.run(["sh", "-n", str(ROOT / "containers/install_validate.sh")], check=True)


def test_requirements_match_what_validation_imports():
    reqs = {line.split(">=")[0] for line in (ROOT / "containers/requirements-validate.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    assert reqs == {"numpy", "onnx", "onnxruntime", "ml_dtypes", "pydantic"}
    # The validation path imports without torch, jinja2 or yaml (what the CPU image leaves out).
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'jinja2', 'yaml', 'safetensors'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import edgellm_validate.validate, edgellm_validate.__main__, edgellm_validate.smoke\n"
            "import edgellm_validate.cpu_backend, edgellm_export.cli\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- build_image


def test_build_image_with_fake_client(tmp_path):
    pytest.importorskip("docker")
    ca = tmp_path / "ca.crt"
    ca.write_text(CA_PEM)
    client, lines = FakeClient(), []
    info = C.build_image("x86-cpu", base_image="edgellm-base:bookworm", ca_bundle=ca, tag="t:1", client=client,
                         progress=lines.append)
    (call,) = client.build_calls
    assert call["network_mode"] == "host" and call["dockerfile"] == "Dockerfile" and call["custom_context"]
    assert call["tag"] == "t:1" and call["pull"] is False and call["rm"] and call["forcerm"]
    assert call["buildargs"] == {"BASE_IMAGE": "edgellm-base:bookworm", "TARGET": "x86-cpu",
                                 "EDGELLM_VERSION": "0.1.0", "CA_BUNDLE": C.CA_CONTEXT_PATH}
    members = context_members(client)
    assert members[C.CA_CONTEXT_PATH].decode() == CA_PEM
    for rel in ("Dockerfile", "pyproject.toml", "README.md", "edgellm_validate/validate.py",
                "edgellm_core/errors.py", "edgellm_validate/data/platforms.json", "containers/install_validate.sh"):
        assert rel in members, rel
    assert not any(m.startswith(("tests/", ".git/", "benchmarks/")) or "__pycache__" in m for m in members)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(client.context))) as t:  # cache-stable metadata
        assert {(m.mtime, m.uid, m.gid) for m in t.getmembers()} == {(C._CONTEXT_MTIME, 0, 0)}
    assert info["tag"] == "t:1" and info["id"].startswith("sha256:")
    assert info["labels"]["io.edgellm.target"] == "x86-cpu"
    assert "CA_BUNDLE" not in info["build_args"]
    assert lines == ["Step 1/2 : FROM base", " ---> 123", "Successfully built 123"]


def test_build_image_defaults_and_ca_from_environment(tmp_path, monkeypatch):
    pytest.importorskip("docker")
    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    monkeypatch.setenv(C.CA_ENV, str(ca))
    client = FakeClient(arch="arm64")
    info = C.build_image("thor-jp7", client=client)
    (call,) = client.build_calls
    assert call["dockerfile"] == "containers/Dockerfile.tensorrt" and call["network_mode"] == "host"
    assert call["tag"] == info["tag"] == "edgellm-validate:0.1.0-thor-jp7"
    assert call["buildargs"]["BASE_IMAGE"] == "nvcr.io/nvidia/pytorch:26.04-py3"
    assert call["buildargs"]["CA_BUNDLE"] == C.CA_CONTEXT_PATH and C.CA_CONTEXT_PATH in context_members(client)
    assert "platform" not in call


def test_build_image_refuses_another_architecture():
    client = FakeClient(arch="amd64")
    with pytest.raises(ExportError, match="aarch64, but the docker daemon runs on x86_64"):
        C.build_image("orin-jp7", client=client)
    assert not client.build_calls
    pytest.importorskip("docker")
    C.build_image("orin-jp7", client=client, platform="linux/arm64")  # emulation, asked for explicitly
    assert client.build_calls[0]["platform"] == "linux/arm64"


def test_build_image_errors(tmp_path):
    pytest.importorskip("docker")
    with pytest.raises(TargetError, match="no public base image"):
        C.build_image("drive-thor", client=FakeClient(arch="arm64"))
    bad = tmp_path / "ca.der"
    bad.write_bytes(b"\x30\x82\x01\xff\xfe")
    with pytest.raises(ExportError, match="PEM"):
        C.build_image("x86-cpu", ca_bundle=bad, client=FakeClient())
    with pytest.raises(ExportError, match="does not exist"):
        C.build_image("x86-cpu", ca_bundle=tmp_path / "missing.crt", client=FakeClient())
    failing = FakeClient(build_chunks=[{"stream": f"line {i}\n"} for i in range(100)]
                         + [{"error": "pip failed", "errorDetail": {"message": "The command returned 1"}}])
    with pytest.raises(C.ImageBuildError, match=r"failed: The command returned 1[\s\S]*line 99") as e:
        C.build_image("x86-cpu", client=failing)
    assert "line 59" not in str(e.value) and e.value.exit_code == 3


# ---------------------------------------------------------------- run_validate and smoke


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    from edgellm_export.demo_checkpoint import write_demo_checkpoint
    from edgellm_export.export import export_checkpoint

    d = tmp_path_factory.mktemp("demo")
    export_checkpoint(write_demo_checkpoint(d / "ckpt"), d / "out")
    return d / "out"


def writes_result(result: dict, code: int = 0, log: bytes = b"Validation PASSED\n"):
    """A container behaviour: write `result` where the command's --result points inside the out mount."""
    def behaviour(c):
        out_host = next(h for h, v in c.kwargs["volumes"].items() if v["bind"] == C.OUT_MOUNT)
        name = c.command[c.command.index("--result") + 1].rsplit("/", 1)[1]
        (Path(out_host) / name).write_text(json.dumps(result))
        return code, log
    return behaviour


def test_run_validate_cpu(demo_export, tmp_path):
    result = {"passed": True, "worst_cosine": 0.9999, "steps": [], "failures": []}
    client = FakeClient(behaviour=writes_result(result))
    stale = tmp_path / "res" / "validation.json"
    stale.parent.mkdir()
    stale.write_text('{"passed": true, "stale": 1}')
    r = C.run_validate("x86-cpu", "img:1", demo_export, stale, backend="cpu", client=client)
    (c,) = client.created
    assert c.image == "img:1" and c.started and c.removed
    assert c.command == ["python", "-m", "edgellm_validate", "/edgellm/export", "--backend", "cpu",
                         "--result", "/edgellm/out/validation.json", "--target", "x86-cpu"]
    kw = c.kwargs
    assert kw["volumes"] == {str(demo_export.resolve()): {"bind": "/edgellm/export", "mode": "ro"},
                             str(stale.parent.resolve()): {"bind": "/edgellm/out", "mode": "rw"}}
    assert kw["detach"] and kw["network_mode"] == "host" and "runtime" not in kw and "device_requests" not in kw
    assert kw["user"] == f"{os.getuid()}:{os.getgid()}" and kw["environment"] == {}
    assert kw["labels"]["io.edgellm.role"] == "validate" and kw["name"].startswith("edgellm-validate-x86-cpu-")
    assert r["passed"] and "stale" not in r and r["container"]["exit_code"] == 0
    assert Path(r["container"]["log"]).read_text() == "Validation PASSED\n"


def test_run_validate_gpu_options(demo_export, tmp_path):
    docker = pytest.importorskip("docker")
    client = FakeClient(behaviour=writes_result({"passed": True}))
    C.run_validate("x86-cuda", "img:gpu", demo_export, tmp_path / "v.json", backend="trt", client=client,
                   extra_args=["--rebuild"])
    kw = client.created[0].kwargs
    (req,) = kw["device_requests"]
    assert isinstance(req, docker.types.DeviceRequest)
    assert (req["Driver"], req["Count"], req["Capabilities"]) == ("nvidia", -1, [["gpu"]])
    assert "runtime" not in kw
    assert client.created[0].command[-4:] == ["x86-cuda", "--engine-dir", "/edgellm/out/engine", "--rebuild"]

    client = FakeClient(arch="arm64", behaviour=writes_result({"passed": True}))
    ca = tmp_path / "ca.crt"
    ca.write_text(CA_PEM)
    C.run_validate("thor-jp7", "img:thor", demo_export, tmp_path / "t" / "v.json", backend="trt", client=client,
                   ca_bundle=ca)
    kw = client.created[0].kwargs
    assert kw["runtime"] == "nvidia" and kw["network_mode"] == "host" and "device_requests" not in kw
    assert "user" not in kw  # root on Jetson: its device nodes are group-restricted
    assert kw["volumes"][str(ca.resolve())] == {"bind": C.CA_MOUNT, "mode": "ro"}
    assert kw["environment"] == {"PIP_CERT": C.CA_MOUNT, "SSL_CERT_FILE": C.CA_MOUNT, "REQUESTS_CA_BUNDLE": C.CA_MOUNT}


def test_run_validate_failed_validation_is_a_result(demo_export, tmp_path):
    client = FakeClient(behaviour=writes_result({"passed": False, "failures": ["step 3"]}, code=1))
    r = C.run_validate("x86-cpu", "img", demo_export, tmp_path / "v.json", backend="cpu", client=client)
    assert r["passed"] is False and r["container"]["exit_code"] == 1 and client.created[0].removed


@pytest.mark.parametrize("code,exit_code,what", [(2, 2, "bad input"), (3, 3, "an environment problem"),
                                                 (137, 3, "an unexpected exit")])
def test_run_validate_errors_carry_the_log_tail(demo_export, tmp_path, code, exit_code, what):
    log = "".join(f"log line {i}\n" for i in range(100)).encode()
    client = FakeClient(behaviour=lambda c: (code, log))
    with pytest.raises(C.ContainerFailed, match=f"ended with {what} \\(exit {code}\\)") as e:
        C.run_validate("x86-cpu", "img", demo_export, tmp_path / "v.json", backend="cpu", client=client)
    assert e.value.exit_code == exit_code and isinstance(e.value, EnvironmentProblem)
    tail = "\n".join(f"log line {i}" for i in range(60, 100))
    assert str(e.value).endswith("--- container log (last lines) ---\n" + tail)
    assert client.created[0].removed
    assert (tmp_path / "v.log").read_bytes() == log  # the whole log is kept


def test_run_validate_without_result_file(demo_export, tmp_path):
    client = FakeClient(behaviour=lambda c: (0, b"nothing written\n"))
    with pytest.raises(C.ContainerFailed, match="without writing its result"):
        C.run_validate("x86-cpu", "img", demo_export, tmp_path / "v.json", backend="cpu", client=client)


def test_run_validate_timeout_kills_and_removes(demo_export, tmp_path):
    client = FakeClient(behaviour=lambda c: ("hang", b"still building\n"))
    with pytest.raises(C.ContainerFailed, match=r"did not finish within 5 s[\s\S]*still building"):
        C.run_validate("x86-cpu", "img", demo_export, tmp_path / "v.json", backend="cpu", client=client, timeout=5)
    (c,) = client.created
    assert c.killed and c.removed


def test_run_validate_refuses_before_any_container(demo_export, tmp_path, monkeypatch):
    client = FakeClient()
    with pytest.raises(ExportError, match="validates with the cpu backend, not trt"):
        C.run_validate("x86-cpu", "img", demo_export, tmp_path / "v.json", backend="trt", client=client)
    with pytest.raises(ExportError, match="backend must be cpu or trt"):
        C.run_validate("x86-cpu", "img", demo_export, tmp_path / "v.json", backend="gpu", client=client)
    from edgellm_validate import targets

    def refuse(target, export_dir, **kwargs):
        raise TargetRefusal("target orin-jp6 cannot run this export: fp8 (...) cannot run on orin-jp6")

    monkeypatch.setattr(targets, "check_target_can_run", refuse)
    with pytest.raises(TargetRefusal, match="orin-jp6"):
        C.run_validate("orin-jp6", "img", demo_export, tmp_path / "v.json", backend="trt", client=client)
    assert not client.created


def smoke_log(report: dict, human: str = "smoke check passed\n") -> bytes:
    return (human + S.MARKER + json.dumps(report) + "\n").encode()


def test_smoke_with_fake_client():
    report = {"ok": True, "problems": [], "target": "thor-jp7", "sm": 110}
    client = FakeClient(arch="arm64", behaviour=lambda c: (0, smoke_log(report)))
    r = C.smoke("thor-jp7", "img:thor", client=client)
    (c,) = client.created
    assert c.command == ["python", "-m", "edgellm_validate.smoke", "--target", "thor-jp7", "--json"]
    assert c.kwargs["runtime"] == "nvidia" and c.kwargs["volumes"] == {} and c.removed
    assert r["sm"] == 110 and r["image"] == "img:thor"

    bad = {"ok": False, "problems": ["the GPU is SM 87, but target thor-jp7 is SM 110"]}
    client = FakeClient(behaviour=lambda c: (1, smoke_log(bad, "PROBLEM: ...\n")))
    with pytest.raises(C.ContainerFailed, match="SM 87, but target thor-jp7 is SM 110"):
        C.smoke("thor-jp7", "img:thor", client=client)
    client = FakeClient(behaviour=lambda c: (1, b"python: No module named edgellm_validate.smoke\n"))
    with pytest.raises(C.ContainerFailed, match=r"no report[\s\S]*No module named"):
        C.smoke("x86-cpu", "img", client=client)


def test_docker_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "docker", None)  # the SDK is not installed
    with pytest.raises(C.DockerUnavailable, match="pip install docker") as e:
        C.docker_client()
    assert e.value.exit_code == 3


def test_no_daemon(monkeypatch):
    docker = pytest.importorskip("docker")

    def from_env():
        raise docker.errors.DockerException("Error while fetching server API version: connection refused")

    monkeypatch.setattr(docker, "from_env", from_env)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    with pytest.raises(C.DockerUnavailable, match=r"no docker daemon answers at unix:///nonexistent.sock.*docker_up"):
        C.docker_client()


# ---------------------------------------------------------------- the smoke check's logic (container side)


def test_sm_problems():
    thor, orin, cuda = get_target("thor-jp7"), get_target("orin-jp6"), get_target("x86-cuda")
    assert S.sm_problems(thor, 110) == [] and S.sm_problems(thor, 101) == []  # Thor under CUDA 12
    assert S.sm_problems(orin, 87) == []
    assert "target orin-jp6 is SM 87" in S.sm_problems(orin, 110)[0]
    assert S.sm_problems(cuda, 89) == []
    problems = S.sm_problems(cuda, 90)  # H100/H200
    assert any("built for SM 80, 86, 89, 100, 120" in p for p in problems)
    assert any("decode attention" in p for p in problems)


def test_smoke_on_this_machine():
    r = S.run_smoke("x86-cpu")
    assert r["ok"], r["problems"]
    assert r["versions"]["packages"]["onnxruntime"]["version"] and r["validate_import"]
    r = S.run_smoke("thor-jp7")  # no tensorrt, no GPU here: every problem is named, nothing raises
    assert not r["ok"] and any("no GPU visible" in p for p in r["problems"])
    r = S.run_smoke("no-such-target")
    assert not r["ok"] and "unknown target" in r["problems"][0]


def test_smoke_cli(capsys):
    assert S.main(["--target", "x86-cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "smoke check passed" in out and out[-1].startswith(S.MARKER)
    assert json.loads(out[-1][len(S.MARKER):])["ok"]
    assert S.main(["--versions-only"]) == 0
    assert "numpy" in json.loads(capsys.readouterr().out)["packages"]


# ---------------------------------------------------------------- python -m edgellm_validate


def test_validate_module_entry(demo_export, tmp_path):
    from edgellm_validate.__main__ import main

    res = tmp_path / "r.json"
    assert main([str(demo_export), "--result", str(res), "--target", "x86-cpu", "-q"]) == 0
    assert json.loads(res.read_text())["passed"]
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(demo_export), "--backend", "trt", "--result", str(tmp_path / "t.json")]) == 3  # no TensorRT


def test_custom_matrix_pins_another_tag(tmp_path):
    pytest.importorskip("docker")
    data = json.loads((ROOT / "edgellm_validate/data/platforms.json").read_text())
    data["edgellm_release"] = "0.10.0"
    matrix = tmp_path / "platforms.json"
    matrix.write_text(json.dumps(data))
    thor = get_target("thor-jp7", platforms_path=matrix)
    client = FakeClient(arch="arm64")
    C.build_image(thor, client=client, platforms_path=matrix)
    assert client.build_calls[0]["buildargs"]["EDGELLM_TAG"] == "v0.10.0"
    assert C.upstream_tag("v0.7.1") == "v0.7.1" and C.upstream_tag("0.7.1") == "v0.7.1"


def test_docker_host_without_nvidia_runtime(demo_export, tmp_path):
    docker = pytest.importorskip("docker")

    class NoGpuClient(FakeClient):
        def __init__(self, fail_at, message):
            super().__init__(arch="arm64")
            outer = self

            class Containers(FakeContainers):
                def create(self, image, command, **kwargs):
                    if fail_at == "create":
                        raise docker.errors.APIError(message)
                    c = super().create(image, command, **kwargs)

                    def start():
                        raise docker.errors.APIError(message)
                    c.start = start
                    return c

            self.containers = Containers(outer)

    client = NoGpuClient("create", 'Bad Request ("Unknown runtime specified nvidia")')
    with pytest.raises(C.ContainerFailed, match="--runtime nvidia, which this docker host does not have"):
        C.smoke("thor-jp7", "img", client=client)
    client = NoGpuClient("start", 'could not select device driver "nvidia" with capabilities: [[gpu]]')
    with pytest.raises(C.ContainerFailed, match="cannot start the validate container.*NVIDIA Container Toolkit"):
        C.run_validate("x86-cuda", "img", demo_export, tmp_path / "v.json", backend="trt", client=client)
    assert client.created[0].removed


def test_plugin_free_image_builds_the_native_stage():
    pytest.importorskip("docker")
    import docker

    client = FakeClient()
    info = C.build_image("x86-cuda-native", base_image="b:1", tag="t:native", client=client, ca_bundle=None)
    C.build_image("x86-cuda", base_image="b:1", tag="t:plugin", client=client, ca_bundle=None)
    native, plugin = client.build_calls
    assert native["target"] == "native" and "target" not in plugin and info["stage"] == "native"
    assert native["dockerfile"] == plugin["dockerfile"] == C.TRT_DOCKERFILE
    # every keyword passed is one the real docker SDK's build takes
    real = inspect.signature(docker.APIClient.build).parameters
    for call in (native, plugin):
        assert set(call) <= set(real), set(call) - set(real)


def test_hil_workflow_rows_name_real_targets_suites_and_cases(monkeypatch, tmp_path):
    """Each row of .github/workflows/hil-jetson.yml: a matrix target, a suite that has cases for it (plugin
    exports only where the image has the plugin), a TensorRT test case from that suite, its GPU flags."""
    yaml = pytest.importorskip("yaml")
    from edgellm_export.make.suite import load_suite

    monkeypatch.setenv("EDGELLM_CHECKPOINTS", str(tmp_path))
    workflow = yaml.safe_load((ROOT / ".github/workflows/hil-jetson.yml").read_text())
    rows = workflow["jobs"]["qualify"]["strategy"]["matrix"]["include"]
    assert {r["target"] for r in rows} == {"orin-jp6", "thor-jp7", "x86-cuda-native"}
    for row in rows:
        t = get_target(row["target"])
        cases = [c for c in load_suite(ROOT / row["suite"], check_paths=False).cases if c.target == t.name]
        assert cases, row
        assert f"{row['trt_case']}@{t.name}" in {c.name for c in cases}, row
        if not t.plugin:
            assert all(c.export_options().get("attention") == "native" for c in cases), row
        assert row["gpu_flags"] == ("--runtime nvidia" if t.arch == "aarch64" else "--gpus all")
