"""Validation containers through the docker Python SDK: build a target's image, smoke-test it, validate in it.

    info = build_image("x86-cpu", base_image="edgellm-base:bookworm")  # CA bundle: --ca-bundle or the host's (trust.py)
    smoke("x86-cpu", info["tag"])                        # versions, imports; plugin + SM on GPU targets
    result = run_validate("x86-cpu", info["tag"], "OUT", "results/validation.json", backend="cpu")

Images: the root `Dockerfile` for the CPU target (onnxruntime twin, no torch), `containers/Dockerfile.tensorrt`
for the NVIDIA targets (plugin library built from the pinned upstream tag at image build time, TensorRT from
the base image; a plugin-free target, platforms.json `plugin: false`, stops at its `native` stage: no plugin
build, and the base image's TensorRT must be NATIVE_MIN_TENSORRT or later). Build args come from
edgellm_validate/data/platforms.json through `edgellm_validate.targets`.
Builds use the host network (package indexes are reached the way the host reaches them) and trust what the host
trusts: the CA bundle is `ca_bundle`, else the first of $EDGELLM_CA_BUNDLE, $PIP_CERT, $SSL_CERT_FILE,
$REQUESTS_CA_BUNDLE that is set (trust.py; recorded as `ca_bundle` in build_image's result). It is put into the
build context sent to the daemon (never onto disk in the checkout) and used only in the build stages, so the final
image does not contain it. A build that fails on certificate verification is a TlsTrustError: one line saying so
and how to pass a bundle (exit code 3).

Containers run with the target's GPU options from the matrix (`runtime=nvidia` on Jetson / DRIVE, GPU
device requests on x86-cuda), the export directory mounted read-only and the result directory read-write;
they are always removed afterwards, and their log is kept beside the result (`<result>.log`).

`docker` is imported only when one of these functions needs a client, so the rest of the package works
without it; a missing SDK or daemon is an EnvironmentProblem (exit code 3) that says what to do.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from edgellm_core.errors import EnvironmentProblem, ExportError

from .. import __version__
from .trust import CA_ENV, CaBundle, load_ca_bundle, resolve_ca_bundle, tls_failure_line, tls_trust_message

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_DOCKERFILE = "Dockerfile"
TRT_DOCKERFILE = "containers/Dockerfile.tensorrt"
CA_CONTEXT_PATH = "containers/.edgellm-ca-bundle.crt"  # where build_image puts the CA file in the context
CA_MOUNT = "/edgellm/ca-bundle.crt"  # where run_validate mounts the CA bundle in the container
UPSTREAM_REPO = "https://github.com/NVIDIA/TensorRT-Edge-LLM.git"
EXPORT_MOUNT = "/edgellm/export"
OUT_MOUNT = "/edgellm/out"
LOG_TAIL_LINES = 40
# platforms.json `plugin_build` keys that are Dockerfile.tensorrt build args
PLUGIN_BUILD_ARGS = ("EMBEDDED_TARGET", "CUDA_CTK_VERSION", "CMAKE_CUDA_ARCHITECTURES", "CUTE_DSL_ARTIFACT_TAG",
                     "ENABLE_CUTE_DSL", "TRT_PACKAGE_DIR", "EDGELLM_COMMIT")
NATIVE_STAGE = "native"  # Dockerfile.tensorrt's final stage without the plugin library
_CONTEXT_MTIME = 315_619_200  # 1980-01-02 UTC
_ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


class DockerUnavailable(EnvironmentProblem):
    """The docker SDK is not installed or no daemon answers."""


class _WithLog(EnvironmentProblem):
    """One paragraph, then the last lines of a log kept as lines (`log_tail`)."""

    log_title = "log"

    def __init__(self, message: str, path=None, *, log: str = ""):
        self.log_tail = _tail(log) if log else ""
        super().__init__(message, path)

    def paragraph(self) -> str:
        text = super().paragraph()
        if self.log_tail:
            text += f"\n--- {self.log_title} (last lines) ---\n{self.log_tail}"
        return text


class ImageBuildError(_WithLog):
    """`docker build` failed; the message ends with the build log's tail."""

    log_title = "build log"


class TlsTrustError(ImageBuildError):
    """The build failed on TLS certificate verification: one line, what to do (the log tail stays in
    `log_tail`; the build log has been shown line by line through `progress`)."""

    def paragraph(self) -> str:
        return ExportError.paragraph(self)


class ContainerFailed(_WithLog):
    """A container exited in a way that is not a validation verdict; the message ends with its log tail.

    `exit_code` follows the process inside when it is one of ours (2 bad input, 3 environment)."""

    log_title = "container log"


# ---------------------------------------------------------------- docker SDK and client


def _docker_module():
    try:
        import docker
    except ImportError:
        raise DockerUnavailable("the container commands need the docker Python SDK, which is not installed; "
                                "`pip install docker`") from None
    return docker


def docker_client(client=None):
    """`client` if given, else a client for $DOCKER_HOST / the local socket that has answered a ping."""
    if client is not None:
        return client
    docker = _docker_module()
    where = os.environ.get("DOCKER_HOST") or "the local docker socket"
    try:
        c = docker.from_env()
        c.ping()
    except docker.errors.DockerException as e:
        raise DockerUnavailable(f"no docker daemon answers at {where} ({e}); start one (on a CI or dev machine: "
                                "`.ci/docker_up.sh`) or set DOCKER_HOST") from None
    return c


def _docker_types():
    """docker.types when the SDK is installed (device requests need it), else None (fake clients in tests)."""
    try:
        import docker
    except ImportError:
        return None
    return docker


def _target(target):
    from edgellm_validate.targets import Target, get_target

    return target if isinstance(target, Target) else get_target(target)


# ---------------------------------------------------------------- image build


def dockerfile_for(target) -> str:
    """The Dockerfile (relative to the repository root) that builds `target`'s image."""
    return CPU_DOCKERFILE if _target(target).backend == "cpu" else TRT_DOCKERFILE


def build_stage(target) -> str | None:
    """The Dockerfile stage to build (None: its last): a plugin-free target's image has no plugin build."""
    t = _target(target)
    return NATIVE_STAGE if t.backend == "trt" and not t.plugin else None


def default_tag(target) -> str:
    return f"edgellm-validate:{__version__}-{_target(target).name}"


def upstream_tag(release: str | None) -> str:
    """The TensorRT-Edge-LLM git tag of a release (`0.7.1` -> `v0.7.1`)."""
    if not release:
        raise ExportError("the platform matrix names no edgellm_release to build the plugin library from")
    return release if release.startswith("v") else f"v{release}"


def build_args(target, *, base_image: str | None = None, ca_context_path: str | None = None,
               platforms_path: str | os.PathLike | None = None) -> dict[str, str]:
    """The build args for `target`'s Dockerfile (all strings; docker passes them as such)."""
    from edgellm_validate.targets import edgellm_release

    t = _target(target)
    args = {"BASE_IMAGE": t.image(base_image), "TARGET": t.name, "EDGELLM_VERSION": __version__}
    if ca_context_path:
        args["CA_BUNDLE"] = ca_context_path
    if t.backend == "trt":
        from edgellm_validate.trt.trt_api import supported_tensorrt

        low, high = supported_tensorrt(edgellm_release(platforms_path), native=not t.plugin)
        args["TENSORRT_RANGE"] = f"{low[0]}.{low[1]},{high[0]}.{high[1]}"  # checked against the base image's
        args["EXPECTED_SM"] = str(t.sm) if t.sm is not None else ",".join(map(str, t.sm_choices))
    if t.backend == "trt" and not t.plugin:  # no plugin library: nothing of the upstream's is built
        args["TENSORRT_EXPECTED"] = t.tensorrt or f"{low[0]}.{low[1]} or later, from the base image"
    elif t.backend == "trt":
        args["EDGELLM_REPO"] = UPSTREAM_REPO
        args["EDGELLM_TAG"] = upstream_tag(edgellm_release(platforms_path))
        for key in PLUGIN_BUILD_ARGS:
            value = t.plugin_build.get(key)
            if value not in (None, ""):
                args[key] = str(value)
        args["TENSORRT_EXPECTED"] = t.tensorrt or "from the base image"
    return args


def _dockerignore(root: Path) -> list[str]:
    try:
        lines = (root / ".dockerignore").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def _archive(root: Path, files: Iterable[str], extra: Iterable[tuple[str, str]]):
    """A gzipped tar of `files` (relative to root) plus `extra` (name, text) entries, with owner and mtime
    normalised: docker's layer cache keys COPY on file metadata too, and a fresh clone's mtimes would
    otherwise invalidate the dependency layer on every CI run. (1980-01-02: zip, used by wheel builds,
    cannot store earlier times.)"""
    fileobj = tempfile.TemporaryFile()
    extra = list(extra)
    extra_names = {name for name, _ in extra}

    def norm(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = _CONTEXT_MTIME, 0, 0, "", ""
        return info

    with tarfile.open(mode="w:gz", fileobj=fileobj) as tar:
        for rel in files:
            if rel in extra_names:
                continue
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            if info is None:  # sockets and the like
                continue
            norm(info)
            if info.isfile():
                with open(root / rel, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
        for name, text in extra:
            data = text.encode("utf-8")
            info = norm(tarfile.TarInfo(name))
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    fileobj.seek(0)
    return fileobj


def build_context(root: Path, dockerfile: str, ca_bundle: str | os.PathLike | CaBundle | None = None):
    """A tar of the build context (root filtered by .dockerignore, as `docker build` does) plus the CA
    bundle at CA_CONTEXT_PATH; returns (file object, CA path inside the context or None)."""
    from docker.utils.build import exclude_paths

    extra = []
    ca_path = None
    if ca_bundle:
        ca = ca_bundle if isinstance(ca_bundle, CaBundle) else load_ca_bundle(ca_bundle)
        extra.append((CA_CONTEXT_PATH, ca.text))
        ca_path = CA_CONTEXT_PATH
    files = sorted(exclude_paths(str(root), _dockerignore(root), dockerfile=dockerfile))
    return _archive(root, files, extra), ca_path


def _daemon_arch(client) -> str | None:
    try:
        return _ARCH.get(str(client.version().get("Arch", "")).lower())
    except Exception:  # an old or fake client: no check
        return None


def _tail(text: str, n: int = LOG_TAIL_LINES) -> str:
    lines = text.rstrip().splitlines()
    return "\n".join(lines[-n:])


def build_image(target, *, base_image: str | None = None, ca_bundle: str | os.PathLike | CaBundle | None = None,
                tag: str | None = None, client=None, progress: Callable[[str], None] | None = None,
                root: str | os.PathLike | None = None, extra_build_args: Mapping[str, str] | None = None,
                platform: str | None = None, nocache: bool = False,
                platforms_path: str | os.PathLike | None = None) -> dict:
    """Build the validation image of `target` (a platforms.json name or Target); returns {tag, id, labels,
    dockerfile, build_args, ca_bundle (source, path, sha256; None without one), seconds}.

    base_image: overrides the matrix's base (required for drive-thor). ca_bundle: a PEM file for pip/git
    behind a TLS-intercepting proxy (default: the first of $EDGELLM_CA_BUNDLE, $PIP_CERT, $SSL_CERT_FILE,
    $REQUESTS_CA_BUNDLE that is set; see trust.py); a build that then fails on certificate verification raises
    TlsTrustError. progress: called with each build log line. platform: e.g. linux/arm64, to build for another
    architecture through emulation; without it a daemon of another architecture than the target's is refused
    (engines and plugins are built where they run). platforms_path: the matrix whose edgellm_release pins the
    plugin tag (default: $EDGELLM_PLATFORMS or the shipped matrix); pass a Target from it as `target` too.
    """
    t = _target(target)
    if not root:
        from .context import build_root

        root = build_root()  # the checkout, or an installed wheel's copy of the context
    root = Path(root)
    dockerfile = dockerfile_for(t)
    build_args(t, base_image=base_image)  # refuses a missing base image before any work
    ca = resolve_ca_bundle(ca_bundle)  # a variable naming a missing file: before any work too
    client = docker_client(client)
    arch = _daemon_arch(client)
    if platform is None and arch and t.arch and arch != t.arch:
        raise ExportError(f"target {t.name} is {t.arch}, but the docker daemon runs on {arch}; build the image on "
                          "the target (or pass platform= to build under emulation)")
    context, ca_path = build_context(root, dockerfile, ca)
    args = build_args(t, base_image=base_image, ca_context_path=ca_path, platforms_path=platforms_path)
    args.update({k: str(v) for k, v in (extra_build_args or {}).items()})
    tag = tag or default_tag(t)
    log: list[str] = []
    t0 = time.monotonic()
    kwargs = dict(fileobj=context, custom_context=True, encoding="gzip", dockerfile=dockerfile, tag=tag,
                  buildargs=args, network_mode="host", rm=True, forcerm=True, pull=False, decode=True,
                  nocache=nocache)
    if platform:
        kwargs["platform"] = platform
    if build_stage(t):
        kwargs["target"] = build_stage(t)
    try:
        for chunk in client.api.build(**kwargs):
            if "stream" in chunk:
                for line in chunk["stream"].splitlines():
                    log.append(line)
                    if progress and line.strip():
                        progress(line)
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise _build_failed(tag, dockerfile, detail.strip(), log, ca)
    except ImageBuildError:
        raise
    except Exception as e:
        docker = _docker_types()
        if docker is not None and isinstance(e, docker.errors.DockerException):
            raise _build_failed(tag, dockerfile, str(e), log, ca) from None
        raise
    finally:
        context.close()
    image = client.images.get(tag)
    return {"tag": tag, "id": image.id, "labels": dict(image.labels or {}), "dockerfile": dockerfile,
            "stage": build_stage(t),
            "build_args": {k: v for k, v in args.items() if k != "CA_BUNDLE"},
            "ca_bundle": ca.record() if ca else None, "seconds": round(time.monotonic() - t0, 1)}


def _build_failed(tag: str, dockerfile: str, detail: str, log: list[str], ca: CaBundle | None) -> ImageBuildError:
    """The error for a failed build: TlsTrustError when the log shows a failed certificate verification."""
    text = "\n".join(log)
    if tls_failure_line(text + "\n" + detail):
        return TlsTrustError(tls_trust_message(f"building {tag} from {dockerfile}", ca), log=text)
    return ImageBuildError(f"building {tag} from {dockerfile} failed: {detail}", log=text)


# ---------------------------------------------------------------- running containers


def run_options(target) -> dict:
    """docker `containers.create` keyword arguments for the target's GPU access (from platforms.json)."""
    return _target(target).docker_run_kwargs(_docker_types())


def _ca_mount(ca_bundle) -> tuple[dict, dict]:
    """The CA bundle (`ca_bundle`, else the host's: trust.py) mounted read-only at CA_MOUNT, and the variables
    that make pip, requests and OpenSSL in the container use it."""
    ca = resolve_ca_bundle(ca_bundle)
    if ca is None:
        return {}, {}
    env = {"PIP_CERT": CA_MOUNT, "SSL_CERT_FILE": CA_MOUNT, "REQUESTS_CA_BUNDLE": CA_MOUNT}
    return {str(ca.path.resolve()): {"bind": CA_MOUNT, "mode": "ro"}}, env


def _run(client, image: str, command: list[str], *, target, volumes: dict, environment: dict,
         user: str | None, timeout: float | None, purpose: str) -> tuple[int, str, float]:
    """Create, start, wait for and remove one container; returns (exit status, log, seconds)."""
    docker = _docker_types()
    kwargs = run_options(target)
    kwargs.setdefault("network_mode", "host")  # nothing inside needs a network; host avoids bridge setup
    kwargs.update(volumes=volumes, environment=environment, detach=True,
                  name=f"edgellm-{purpose}-{_target(target).name}-{uuid.uuid4().hex[:8]}",
                  labels={"io.edgellm.role": purpose, "io.edgellm.target": _target(target).name})
    if user:
        kwargs["user"] = user
    try:
        container = client.containers.create(image, command, **kwargs)
    except Exception as e:
        if docker is not None and isinstance(e, docker.errors.ImageNotFound):
            raise ContainerFailed(f"image {image} is not on this docker host; build it first (build_image)") from None
        if docker is not None and isinstance(e, docker.errors.DockerException):
            raise ContainerFailed(f"cannot create the {purpose} container from {image}: {e}{_gpu_hint(target, e)}") \
                from None
        raise
    t0 = time.monotonic()
    try:
        try:
            container.start()
        except Exception as e:
            if docker is not None and isinstance(e, docker.errors.DockerException):
                raise ContainerFailed(f"cannot start the {purpose} container from {image}: {e}"
                                      f"{_gpu_hint(target, e)}") from None
            raise
        try:
            status = container.wait(timeout=timeout) if timeout else container.wait()
        except Exception as e:  # requests' ReadTimeout / ConnectionError when the timeout passes
            if timeout is None or (docker is not None and isinstance(e, docker.errors.DockerException)):
                raise
            try:
                container.kill()
            except Exception:
                pass
            log = _logs(container)
            raise ContainerFailed(f"the {purpose} container ({image}) did not finish within {timeout:g} s and was "
                                  "killed", log=log) from None
        log = _logs(container)
        code = int(status.get("StatusCode", -1)) if isinstance(status, dict) else int(status)
        return code, log, time.monotonic() - t0
    finally:
        try:
            container.remove(force=True)
        except Exception:
            pass


def _gpu_hint(target, error) -> str:
    """What to do when docker cannot give the container the target's GPU access."""
    t = _target(target)
    text = str(error).lower()
    if t.docker_run.get("runtime") and "runtime" in text:
        return (f"; target {t.name} runs containers with --runtime {t.docker_run['runtime']}, which this docker host "
                "does not have: install the NVIDIA Container Toolkit (JetPack ships it) and restart dockerd")
    if t.docker_run.get("device_requests") and ("device driver" in text or "gpu" in text):
        return (f"; target {t.name} asks docker for the GPUs (--gpus all), and this docker host cannot provide them: "
                "install the NVIDIA driver and the NVIDIA Container Toolkit")
    return ""


def _logs(container) -> str:
    try:
        raw = container.logs(stdout=True, stderr=True)
    except Exception as e:
        return f"(logs unavailable: {e})"
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


def _default_user(target) -> str | None:
    """Files the container writes belong to the caller; Jetson/DRIVE containers stay root, whose device
    nodes (nvhost, nvmap) are group-restricted."""
    t = _target(target)
    if t.docker_run.get("runtime") == "nvidia" or not hasattr(os, "getuid"):
        return None
    return f"{os.getuid()}:{os.getgid()}"


def smoke_command(target) -> list[str]:
    return ["python", "-m", "edgellm_validate.smoke", "--target", _target(target).name, "--json"]


def smoke(target, image: str, *, client=None, timeout: float | None = 300) -> dict:
    """Run the smoke check in `image` for `target`: versions (python, onnxruntime, tensorrt), the validation
    imports, and on GPU targets the plugin library and the GPU's SM. Returns its report; raises ContainerFailed
    (with every problem and the log tail) when the image cannot serve the target."""
    from edgellm_validate.smoke import MARKER

    t = _target(target)
    client = docker_client(client)
    code, log, seconds = _run(client, image, smoke_command(t), target=t, volumes={}, environment={},
                              user=None, timeout=timeout, purpose="smoke")
    report = None
    for line in reversed(log.splitlines()):
        if line.startswith(MARKER):
            try:
                report = json.loads(line[len(MARKER):])
            except ValueError:
                pass
            break
    if report is None or code != 0:
        problems = "; ".join(report["problems"]) if report else "no report (the image lacks edgellm_validate?)"
        raise ContainerFailed(f"smoke check of {image} for {t.name} failed (exit {code}): {problems}", log=log)
    report["image"] = image
    report["seconds"] = round(seconds, 2)
    return report


def container_validate_argv(target, backend: str, result_name: str, extra_args: Iterable[str] = ()) -> list[str]:
    cmd = ["python", "-m", "edgellm_validate", EXPORT_MOUNT, "--backend", backend,
           "--result", f"{OUT_MOUNT}/{result_name}", "--target", _target(target).name]
    if backend == "trt":
        cmd += ["--engine-dir", f"{OUT_MOUNT}/engine"]
    return cmd + [str(a) for a in extra_args]


def run_validate(target, image: str, export_dir: str | os.PathLike, result_path: str | os.PathLike, *,
                 backend: str, ca_bundle: str | os.PathLike | None = None, client=None,
                 timeout: float | None = None, extra_args: Iterable[str] = (), user: str | None = "auto",
                 check_target: bool = True, platforms_path: str | os.PathLike | None = None) -> dict:
    """Validate `export_dir` inside `image`; returns the parsed validation result (the container's
    validation.json, written to `result_path`) with a `container` entry (image, exit status, seconds, log file).

    A failed validation (exit 1) is a result, not an error: check `result["passed"]`. Anything else that is
    not a pass (bad input 2, environment 3, a crash, a timeout, no result file) raises ContainerFailed with
    the log tail. The export is first checked against the target's capabilities on the host (TargetRefusal
    before any container starts), then mounted read-only; `result_path`'s directory is mounted read-write
    (TensorRT engines go to its `engine/`). ca_bundle: mounted for pip/requests inside (default: the host's,
    as build_image). user: "auto" runs as the caller on x86 and as root on Jetson / DRIVE; None keeps the
    image's user.
    """
    from edgellm_validate.targets import check_target_can_run

    t = _target(target)
    if backend not in ("cpu", "trt"):
        raise ExportError(f"backend must be cpu or trt, not {backend!r}")
    if backend != t.backend:
        raise ExportError(f"target {t.name} validates with the {t.backend} backend, not {backend}")
    export_dir = Path(export_dir).resolve()
    if check_target:
        check_target_can_run(t, export_dir, platforms_path=platforms_path)
    result_path = Path(result_path).resolve()
    out_dir = result_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if result_path.exists():
        result_path.unlink()  # never report a previous run's result
    volumes = {str(export_dir): {"bind": EXPORT_MOUNT, "mode": "ro"}, str(out_dir): {"bind": OUT_MOUNT, "mode": "rw"}}
    ca_volumes, environment = _ca_mount(ca_bundle)
    volumes.update(ca_volumes)
    client = docker_client(client)
    command = container_validate_argv(t, backend, result_path.name, extra_args)
    code, log, seconds = _run(client, image, command, target=t, volumes=volumes, environment=environment,
                              user=_default_user(t) if user == "auto" else user, timeout=timeout,
                              purpose="validate")
    log_path = result_path.with_name(result_path.stem + ".log")
    log_path.write_text(log)
    if code in (0, 1) and result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except ValueError as e:
            raise ContainerFailed(f"the container wrote an unreadable result ({e})", result_path) from None
        result["container"] = {"image": image, "target": t.name, "exit_code": code, "seconds": round(seconds, 2),
                               "log": str(log_path), "command": command}
        return result
    what = {2: "bad input", 3: "an environment problem"}.get(code, "an unexpected exit")
    err = ContainerFailed(f"validation in {image} for {t.name} ended with {what} (exit {code})"
                          + ("" if code not in (0, 1) else ", without writing its result")
                          + f"; full log: {log_path}", log=log)
    if code in (2, 3):
        err.exit_code = code
    raise err


__all__ = ["build_image", "smoke", "run_validate", "build_args", "dockerfile_for", "run_options",
           "DockerUnavailable", "ImageBuildError", "TlsTrustError", "ContainerFailed", "docker_client",
           "resolve_ca_bundle", "CA_ENV"]
