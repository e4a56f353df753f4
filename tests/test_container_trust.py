"""Containers trust what the host trusts: which CA bundle image builds and validation containers use
(--ca-bundle, EDGELLM_CA_BUNDLE, PIP_CERT, SSL_CERT_FILE, REQUESTS_CA_BUNDLE), how a bad one is refused,
and the one-line TLS-trust error; against the fake docker client of test_containers_unit (the real
engine and a local HTTPS index are in test_containers_docker)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_containers_unit import (  # noqa: F401  (demo_export, no_host_trust: fixtures used here)
    CA_PEM,
    FakeClient,
    context_members,
    demo_export,
    no_host_trust,
    writes_result,
)

from edgellm_core.errors import ExportError
from edgellm_export.make import containers as C
from edgellm_export.make import trust as T


def pem(path: Path, body: str = "MIIBfake") -> Path:
    path.write_text(f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize("chosen", T.CA_SOURCES)
def test_ca_bundle_precedence(tmp_path, chosen):
    """--ca-bundle, then EDGELLM_CA_BUNDLE, PIP_CERT, SSL_CERT_FILE, REQUESTS_CA_BUNDLE: the first one set wins;
    the ones after it are not even read (here: all of them name missing files)."""
    import hashlib

    at = T.CA_SOURCES.index(chosen)
    files = {src: tmp_path / f"{i}.pem" for i, src in enumerate(T.CA_SOURCES)}
    pem(files[chosen], chosen.strip("-"))
    env = {src: "" for src in T.CA_SOURCES[1:at]}  # set but empty: as good as unset
    env |= {src: str(files[src]) for src in T.CA_SOURCES[at:] if src != T.CA_OPTION}
    explicit = files[chosen] if chosen == T.CA_OPTION else None
    ca = T.resolve_ca_bundle(explicit, environ=env)
    assert ca.source == chosen and ca.path == files[chosen]
    assert ca.record() == {"source": chosen, "path": str(files[chosen]),
                           "sha256": hashlib.sha256(files[chosen].read_bytes()).hexdigest()}
    assert os.fspath(ca) == str(files[chosen]) and T.resolve_ca_bundle(ca, environ={}) is ca


def test_ca_bundle_none_set():
    assert T.resolve_ca_bundle(None, environ={}) is None
    assert T.resolve_ca_bundle(None, environ={"SSL_CERT_DIR": "/etc/ssl/certs", "PIP_CERT": "  "}) is None


@pytest.mark.parametrize("what,match", [("missing", "does not exist"), ("dir", "is a directory"),
                                        ("der", "not PEM text"), ("text", "holds no PEM certificate")])
@pytest.mark.parametrize("source", ["PIP_CERT", "SSL_CERT_FILE", T.CA_OPTION])
def test_ca_bundle_that_is_not_one(tmp_path, what, match, source):
    path = {"missing": tmp_path / "gone.pem", "dir": tmp_path}.get(what, tmp_path / "x.pem")
    if what == "der":
        path.write_bytes(b"\x30\x82\x01\xff\xfe")
    elif what == "text":
        path.write_text("not a certificate\n")
    env = {} if source == T.CA_OPTION else {source: str(path), "REQUESTS_CA_BUNDLE": str(pem(tmp_path / "ok.pem"))}
    with pytest.raises(ExportError, match=match) as e:
        T.resolve_ca_bundle(path if source == T.CA_OPTION else None, environ=env)
    text = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in text
    assert (f"--ca-bundle {path}," if source == T.CA_OPTION else f"{source}={path},") in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_ca_bundle_unreadable(tmp_path):
    ca = pem(tmp_path / "ca.pem")
    ca.chmod(0)
    with pytest.raises(ExportError, match=r"PIP_CERT=\S+ca.pem, cannot be read \(permission denied\)"):
        T.resolve_ca_bundle(None, environ={"PIP_CERT": str(ca)})


def test_build_image_takes_the_hosts_ca_variable(tmp_path, monkeypatch):
    pytest.importorskip("docker")
    ca = pem(tmp_path / "proxy-ca.pem")
    monkeypatch.setenv("PIP_CERT", str(ca))
    client = FakeClient()
    info = C.build_image("x86-cpu", base_image="edgellm-base:bookworm", client=client)
    assert client.build_calls[0]["buildargs"]["CA_BUNDLE"] == C.CA_CONTEXT_PATH
    assert context_members(client)[C.CA_CONTEXT_PATH] == ca.read_bytes()
    assert info["ca_bundle"]["source"] == "PIP_CERT" and info["ca_bundle"]["path"] == str(ca)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))  # after PIP_CERT: never read
    assert C.build_image("x86-cpu", client=FakeClient())["ca_bundle"]["source"] == "PIP_CERT"
    monkeypatch.delenv("PIP_CERT")
    client = FakeClient()
    with pytest.raises(ExportError, match=r"SSL_CERT_FILE=\S+missing.pem, does not exist") as e:
        C.build_image("x86-cpu", client=client)
    assert e.value.exit_code == 2 and not client.build_calls
    monkeypatch.delenv("SSL_CERT_FILE")
    info = C.build_image("x86-cpu", client=(client := FakeClient()))
    assert info["ca_bundle"] is None and "CA_BUNDLE" not in client.build_calls[0]["buildargs"]
    assert C.CA_CONTEXT_PATH not in context_members(client)


PIP_TLS_LOG = [
    "Step 9/20 : RUN sh /src/containers/install_validate.sh deps",
    "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection "
    "broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
    "failed: unable to get local issuer certificate (_ssl.c:992)'))': /simple/numpy/",
    "ERROR: Could not find a version that satisfies the requirement numpy==2.4.6 (from versions: none)",
]


@pytest.mark.parametrize("line", [
    PIP_TLS_LOG[1],
    "fatal: unable to access 'https://git.example/x.git/': SSL certificate problem: self-signed certificate in "
    "certificate chain",
    "fatal: unable to access 'https://git.example/x.git/': server certificate verification failed. CAfile: none "
    "CRLfile: none",
    "curl: (60) SSL certificate problem: unable to get local issuer certificate",
])
def test_tls_failure_lines(line):
    assert T.tls_failure_line(f"Step 1/2 : RUN x\n{line}\nmore") == line
    assert T.tls_failure_line("ERROR: No matching distribution found for numpy") is None
    # a protocol error is not a trust problem: no CA bundle cures it
    assert T.tls_failure_line("SSLError(1, '[SSL: WRONG_VERSION_NUMBER] wrong version number')") is None


@pytest.mark.parametrize("with_ca", [False, True])
def test_tls_failure_is_one_line_exit_3(tmp_path, monkeypatch, with_ca):
    pytest.importorskip("docker")
    if with_ca:
        monkeypatch.setenv("PIP_CERT", str(pem(tmp_path / "ca.pem")))
    chunks = [{"stream": line + "\n"} for line in PIP_TLS_LOG]
    chunks.append({"error": "The command '/bin/sh -c sh /src/containers/install_validate.sh deps' returned a "
                            "non-zero code: 1", "errorDetail": {"message": "returned a non-zero code: 1"}})
    with pytest.raises(C.TlsTrustError) as e:
        C.build_image("x86-cpu", base_image="b", tag="t:1", client=FakeClient(build_chunks=chunks))
    text = e.value.paragraph()
    assert "\n" not in text and str(e.value) == text and e.value.exit_code == 3
    assert isinstance(e.value, C.ImageBuildError) and "CERTIFICATE_VERIFY_FAILED" in e.value.log_tail
    assert text.startswith("building t:1 from Dockerfile failed: a TLS trust problem")
    assert text.endswith("with --ca-bundle FILE or EDGELLM_CA_BUNDLE=FILE")
    assert (f"trusted PIP_CERT={tmp_path / 'ca.pem'}" in text) if with_ca else ("had no CA bundle" in text)
    # any other failure keeps its detail and the log tail
    chunks = [{"stream": "ERROR: No matching distribution found for numpy\n"}, chunks[-1]]
    with pytest.raises(C.ImageBuildError) as e:
        C.build_image("x86-cpu", base_image="b", client=FakeClient(build_chunks=chunks))
    assert not isinstance(e.value, C.TlsTrustError) and "No matching distribution" in str(e.value)


def test_cli_tls_trust_and_bad_variable(tmp_path, monkeypatch, capsys):
    pytest.importorskip("docker")
    from edgellm_export.cli import main

    chunks = [{"stream": line + "\n"} for line in PIP_TLS_LOG] + [{"error": "returned a non-zero code: 1"}]
    monkeypatch.setattr(C, "docker_client", lambda client=None: FakeClient(build_chunks=chunks))
    assert main(["-q", "container", "build", "x86-cpu", "--base-image", "b"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TLS trust problem" in err and "--ca-bundle FILE or EDGELLM_CA_BUNDLE" in err
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "nope.pem"))
    assert main(["-q", "container", "build", "x86-cpu", "--base-image", "b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"REQUESTS_CA_BUNDLE={tmp_path / 'nope.pem'}, does not exist" in err
    ca = pem(tmp_path / "ok.pem")  # --ca-bundle comes first: the broken variable is not consulted
    monkeypatch.setattr(C, "smoke", lambda target, tag: {})
    monkeypatch.setattr(C, "docker_client", lambda client=None: FakeClient())
    assert main(["-q", "container", "build", "x86-cpu", "--base-image", "b", "--ca-bundle", str(ca)]) == 0


def test_run_validate_mounts_the_hosts_ca(demo_export, tmp_path, monkeypatch):  # noqa: F811 (the fixture)
    ca = pem(tmp_path / "ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    client = FakeClient(behaviour=writes_result({"passed": True}))
    C.run_validate("x86-cpu", "img", demo_export, tmp_path / "r" / "v.json", backend="cpu", client=client)
    kw = client.created[0].kwargs
    assert kw["volumes"][str(ca)] == {"bind": C.CA_MOUNT, "mode": "ro"} and kw["environment"]["PIP_CERT"] == C.CA_MOUNT


def test_make_records_the_ca_source(demo_export, tmp_path, monkeypatch):  # noqa: F811 (the fixture)
    """`edgellm make`: the image record names the bundle's source, path and sha256; validation gets the same
    bundle; a variable naming a missing file stops make before any work (exit 2)."""
    from fake_containers import install

    from edgellm_export.cli import main

    fake = install(monkeypatch, tmp_path)
    seen = []
    real_run_validate = fake.run_validate

    def run_validate(*args, ca_bundle=None, **kwargs):
        seen.append(ca_bundle)
        return real_run_validate(*args, **kwargs)

    monkeypatch.setattr(fake, "run_validate", run_validate)
    ckpt = demo_export.parent / "ckpt"
    ca = pem(tmp_path / "proxy.pem")
    monkeypatch.setenv("PIP_CERT", str(ca))
    out = tmp_path / "DIR"
    assert main(["-q", "make", str(ckpt), "--target", "x86-cpu", "--out", str(out)]) == 0
    record = json.loads((out / "images" / "x86-cpu.json").read_text())
    assert record["ca_bundle"] == T.load_ca_bundle(ca, "PIP_CERT").record()
    assert record["ca_bundle"]["source"] == "PIP_CERT" and seen[0].source == "PIP_CERT"
    monkeypatch.setenv(C.CA_ENV, str(tmp_path / "missing.pem"))
    builds = fake.builds
    assert main(["-q", "make", str(ckpt), "--target", "x86-cpu", "--out", str(tmp_path / "DIR2")]) == 2
    assert fake.builds == builds and not (tmp_path / "DIR2" / "export").exists()
