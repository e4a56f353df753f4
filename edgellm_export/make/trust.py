"""Which CA bundle image builds and validation containers trust, and telling a build that failed for want of one.

Behind a TLS-intercepting proxy, pip on the host works because PIP_CERT, SSL_CERT_FILE or REQUESTS_CA_BUNDLE
names a bundle that holds the proxy's CA; the images are built (and validation containers run) with the same
bundle. It is the first of

    --ca-bundle FILE, $EDGELLM_CA_BUNDLE, $PIP_CERT, $SSL_CERT_FILE, $REQUESTS_CA_BUNDLE

that is set to a non-empty value; with none set, no bundle (pip in the build trusts its own certifi store).
The chosen file must be readable PEM text: a variable naming a missing, unreadable or non-PEM file is an
error naming the variable and the path (exit 2), never silently passed over for the next one.

    ca = resolve_ca_bundle(args.ca_bundle)    # CaBundle(source="PIP_CERT", path=..., sha256=...) or None
    ca.record()                               # what the image record keeps: source, path, sha256
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgellm_core.errors import ExportError

CA_OPTION = "--ca-bundle"
CA_ENV = "EDGELLM_CA_BUNDLE"
HOST_TRUST_ENV = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")  # what pip / requests / OpenSSL honour
CA_SOURCES = (CA_OPTION, CA_ENV, *HOST_TRUST_ENV)  # in order of precedence

# Build log phrases of a failed certificate verification: Python's ssl (pip), OpenSSL, curl and git
# (OpenSSL and GnuTLS builds). Bare "SSL: " is not one: "[SSL: WRONG_VERSION_NUMBER]" and its kind are
# protocol problems that no CA bundle cures.
TLS_FAILURE_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "SSLCertVerificationError",
                       "SSL certificate problem", "server certificate verification failed",
                       "unable to get local issuer certificate", "self-signed certificate in certificate chain",
                       "self signed certificate in certificate chain")


@dataclass(frozen=True)
class CaBundle:
    """A resolved CA bundle: where it came from (an option or variable name), its absolute path, the sha256
    and text of what was read (the build context gets exactly these bytes). Usable as a path (os.PathLike)."""

    source: str
    path: Path
    sha256: str
    text: str = field(repr=False, compare=False)

    def __fspath__(self) -> str:
        return str(self.path)

    def record(self) -> dict:
        return {"source": self.source, "path": str(self.path), "sha256": self.sha256}


def _named(source: str, raw) -> str:
    return f"{source} {raw}" if source.startswith("-") else f"{source}={raw}"


def load_ca_bundle(path: str | os.PathLike, source: str = CA_OPTION) -> CaBundle:
    """Read a PEM CA bundle; an ExportError (exit 2) naming `source` and the path when it is not one."""
    p = Path(path).expanduser().absolute()
    problem = None
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        problem = "does not exist"
    except IsADirectoryError:
        problem = "is a directory, not a PEM file"
    except PermissionError:
        problem = "cannot be read (permission denied)"
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            problem = ("is not PEM text (BEGIN CERTIFICATE blocks); a DER certificate converts with "
                       "`openssl x509 -inform der -in FILE`")
        else:
            if "BEGIN CERTIFICATE" not in text:
                problem = "holds no PEM certificate (BEGIN CERTIFICATE block)"
    if problem is not None:
        fix = ("pass a PEM file" if source == CA_OPTION
               else f"point {source} at a PEM CA bundle or unset it, or pass {CA_OPTION} FILE")
        raise ExportError(f"the CA bundle for image builds and validation containers, {_named(source, path)}, "
                          f"{problem}; {fix} (the bundle is the first of {', '.join(CA_SOURCES)} that is set)")
    return CaBundle(source, p, hashlib.sha256(data).hexdigest(), text)


def resolve_ca_bundle(explicit: str | os.PathLike | CaBundle | None = None,
                      environ: Mapping[str, str] | None = None) -> CaBundle | None:
    """The CA bundle to build images and run containers with: `explicit` (--ca-bundle) if given, else the
    first of $EDGELLM_CA_BUNDLE, $PIP_CERT, $SSL_CERT_FILE, $REQUESTS_CA_BUNDLE that is set; None if none is."""
    if isinstance(explicit, CaBundle):
        return explicit
    if explicit is not None and str(explicit) != "":
        return load_ca_bundle(explicit, CA_OPTION)
    env = os.environ if environ is None else environ
    for name in (CA_ENV, *HOST_TRUST_ENV):
        value = (env.get(name) or "").strip()
        if value:
            return load_ca_bundle(value, name)
    return None


def tls_failure_line(text: str) -> str | None:
    """The first line of a build log that says a TLS certificate could not be verified, else None."""
    markers = [m.lower() for m in TLS_FAILURE_MARKERS]
    for line in text.splitlines():
        low = line.lower()
        if any(m in low for m in markers):
            return line.strip()
    return None


def tls_trust_message(what: str, ca: CaBundle | None) -> str:
    """One line: `what` failed on certificate verification, which bundle it had, how to pass one."""
    had = (f"the build trusted {_named(ca.source, ca.path)}, which does not hold that CA" if ca is not None
           else f"the build had no CA bundle: none of {', '.join(CA_SOURCES)} is set")
    return (f"{what} failed: a TLS trust problem, a server's certificate could not be verified (a TLS-intercepting "
            f"proxy or a private index whose CA the build does not trust; {had}); pass that CA as a PEM bundle "
            f"with {CA_OPTION} FILE or {CA_ENV}=FILE")


__all__ = ["CaBundle", "resolve_ca_bundle", "load_ca_bundle", "tls_failure_line", "tls_trust_message",
           "CA_SOURCES", "CA_ENV", "CA_OPTION", "HOST_TRUST_ENV"]
