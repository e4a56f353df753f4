#!/bin/sh
# Installs the validation side of edgellm-export. Used by both Dockerfiles, in two stages whose outputs are
# copied separately into the final image, so that a source change does not re-copy the dependencies:
#
#   install_validate.sh deps      $VENV (default /opt/edgellm/venv): pinned requirements (+ $EXTRA_PIP), and a
#                                 .pth file putting $PKG on its path; the only step that needs PyPI
#   install_validate.sh package   our package into $PKG (default /opt/edgellm/python) with --no-deps (its
#                                 declared torch dependency is for the exporter; validation never imports
#                                 torch), offline; then checks, and $SHARE/platforms.json + versions.json
#
# The build context is copied to $SRC (default /src).
# Environment (all optional): CA_BUNDLE (a CA file inside the build context, for a TLS-intercepting proxy;
# used for this step only, never copied into the final image), SYSTEM_SITE_PACKAGES=1 (see the base image's
# tensorrt / numpy / torch; the TensorRT images), NUMPY_VERSION, ONNX_VERSION, ONNXRUNTIME_VERSION,
# ML_DTYPES_VERSION (exact pins; empty: the requirements' lower bounds), EXTRA_PIP (more requirements,
# e.g. pycuda), REQUIRE_TENSORRT=1 (fail unless `tensorrt` comes from the base image), TENSORRT_RANGE=LOW,HIGH
# (e.g. 10.15,11.0: fail unless the base image's tensorrt package says LOW <= version < HIGH; read from its
# metadata, since nothing can be imported from TensorRT without a GPU; a tensorrt without metadata is left
# to the smoke check), NO_TORCH=1 (fail if torch is importable: the CPU image must stay small).
set -eu
SRC=${SRC:-/src}
VENV=${VENV:-/opt/edgellm/venv}
PKG=${PKG:-/opt/edgellm/python}
SHARE=${SHARE:-/opt/edgellm/share}
step=${1:?usage: install_validate.sh deps|package}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
if [ -n "${CA_BUNDLE:-}" ]; then
    case "$CA_BUNDLE" in /*) ca="$CA_BUNDLE" ;; *) ca="$SRC/$CA_BUNDLE" ;; esac
    [ -f "$ca" ] || { echo "install_validate.sh: CA_BUNDLE $CA_BUNDLE is not a file in the build context (build_image puts it at containers/.edgellm-ca-bundle.crt)" >&2; exit 2; }
    export PIP_CERT="$ca" SSL_CERT_FILE="$ca" REQUESTS_CA_BUNDLE="$ca"
fi
pip="$VENV/bin/python -m pip"

case "$step" in
deps)
    if [ "${SYSTEM_SITE_PACKAGES:-0}" = 1 ]; then
        python3 -m venv --system-site-packages "$VENV"
    else
        python3 -m venv "$VENV"
    fi
    pins=""
    [ -z "${NUMPY_VERSION:-}" ] || pins="$pins numpy==$NUMPY_VERSION"
    [ -z "${ONNX_VERSION:-}" ] || pins="$pins onnx==$ONNX_VERSION"
    [ -z "${ONNXRUNTIME_VERSION:-}" ] || pins="$pins onnxruntime==$ONNXRUNTIME_VERSION"
    [ -z "${ML_DTYPES_VERSION:-}" ] || pins="$pins ml_dtypes==$ML_DTYPES_VERSION"
    # setuptools here so that the package step builds offline (--no-build-isolation)
    # shellcheck disable=SC2086
    $pip install "setuptools>=69" wheel -r "$SRC/containers/requirements-validate.txt" $pins ${EXTRA_PIP:-}
    purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PKG" >"$purelib/edgellm.pth"
    ;;
package)
    $pip install --no-deps --no-build-isolation --target "$PKG" "$SRC"
    rm -rf "$SRC/build" "$SRC"/*.egg-info
    mkdir -p "$SHARE"
    cp "$PKG/edgellm_validate/data/platforms.json" "$SHARE/platforms.json"  # package data: proves it is installed
    export EDGELLM_PLATFORMS="$SHARE/platforms.json"
    py="$VENV/bin/python"
    # the validation path must import (this is what `edgellm validate` runs), without torch
    "$py" -c 'import edgellm_validate.validate, edgellm_validate.smoke, edgellm_validate.__main__'
    if [ "${NO_TORCH:-0}" = 1 ] && "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
        echo "install_validate.sh: torch is installed in the CPU validation image; it must not be" >&2
        exit 1
    fi
    if [ "${REQUIRE_TENSORRT:-0}" = 1 ]; then
        # Locate it without importing (no GPU or driver during an image build).
        "$py" - "$VENV" <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("tensorrt")
if spec is None or not spec.origin:
    sys.exit("install_validate.sh: the base image has no Python `tensorrt`; the TensorRT images use the base "
             "image's TensorRT (JetPack / NGC / DriveOS), never the PyPI package")
if os.path.realpath(spec.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit(f"install_validate.sh: tensorrt was installed into the virtualenv ({spec.origin}); it must come "
             "from the base image, matching the TensorRT the plugin library is built against")
print(f"tensorrt from the base image: {spec.origin}")
PY
    fi
    if [ -n "${TENSORRT_RANGE:-}" ]; then
        "$py" - "$TENSORRT_RANGE" <<'PY'
import importlib.metadata as md, sys
low, high = (tuple(int(x) for x in part.split(".")) for part in sys.argv[1].split(","))
found = None
for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_libs"):
    try:
        found = (dist, md.version(dist))
        break
    except md.PackageNotFoundError:
        continue
if found is None:
    print("install_validate.sh: the base image's tensorrt has no package metadata; the smoke check reads its version")
    sys.exit(0)
have = tuple(int(p) for p in found[1].split(".")[:2] if p.isdigit())
span = f"TensorRT {'.'.join(map(str, low))} up to, not including, {'.'.join(map(str, high))}"
if not low <= have < high:
    sys.exit(f"install_validate.sh: the base image has TensorRT {found[1]} ({found[0]}), but this image needs "
             f"{span} (the Edge-LLM release's plugin library, or, for a plugin-free image, TensorRT's native "
             "RotaryEmbedding / TensorScatter / Attention); choose a base image with a TensorRT in that range")
print(f"TensorRT {found[1]}: within {span}")
PY
    fi
    "$py" -m edgellm_validate.smoke --versions-only >"$SHARE/versions.json"
    cat "$SHARE/versions.json"
    ;;
*)
    echo "install_validate.sh: unknown step $step" >&2
    exit 2
    ;;
esac
