# The default image: edgellm validation on onnxruntime (CPU), target `x86-cpu` of edgellm_validate/data/platforms.json.
# It holds the validation side only (numpy, onnx, onnxruntime, ml_dtypes; no torch) and runs the runtime twin
# on an export directory. The GPU images are built from containers/Dockerfile.tensorrt.
#
#   docker build --network host -t edgellm-validate:cpu .
#   docker run --rm edgellm-validate:cpu                       # smoke check: versions and imports
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/OUT:/edgellm/export:ro" -v "$PWD/res:/edgellm/out" \
#       edgellm-validate:cpu python -m edgellm_validate /edgellm/export --result /edgellm/out/validation.json
#
# Build args: BASE_IMAGE (default per platforms.json; any Debian/Ubuntu image works, python3 + venv are
# installed with apt when it has none, e.g. a debootstrap-made image), CA_BUNDLE=containers/.edgellm-ca-bundle.crt
# (copy a PEM CA file there first, for pip behind a TLS-intercepting proxy; used in the dependency stage only,
# never in the final image),
# NUMPY_VERSION / ONNX_VERSION / ONNXRUNTIME_VERSION / ML_DTYPES_VERSION (exact pins, recorded as labels),
# EDGELLM_VERSION, TARGET. edgellm_export.make.containers.build_image passes all of them.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Dependencies (the only step that needs PyPI; its layer survives source edits), then our package, offline.
FROM base AS deps
ARG CA_BUNDLE=
ARG NUMPY_VERSION=2.4.6
ARG ONNX_VERSION=1.23.2
ARG ONNXRUNTIME_VERSION=1.32.0
ARG ML_DTYPES_VERSION=0.6.0
# (.edgellm-ca-bundle.cr[t]: copied when present; it is where build_image puts the CA bundle)
COPY containers/install_validate.sh containers/requirements-validate.txt containers/.edgellm-ca-bundle.cr[t] \
     /src/containers/
RUN CA_BUNDLE="$CA_BUNDLE" NUMPY_VERSION="$NUMPY_VERSION" ONNX_VERSION="$ONNX_VERSION" \
    ONNXRUNTIME_VERSION="$ONNXRUNTIME_VERSION" ML_DTYPES_VERSION="$ML_DTYPES_VERSION" \
    sh /src/containers/install_validate.sh deps

FROM deps AS package
COPY pyproject.toml README.md /src/
COPY edgellm_core/ /src/edgellm_core/
COPY edgellm_export/ /src/edgellm_export/
COPY edgellm_validate/ /src/edgellm_validate/
RUN NO_TORCH=1 sh /src/containers/install_validate.sh package

FROM base
ARG BASE_IMAGE
ARG TARGET=x86-cpu
ARG EDGELLM_VERSION=0.1.0
ARG NUMPY_VERSION=2.4.6
ARG ONNX_VERSION=1.23.2
ARG ONNXRUNTIME_VERSION=1.32.0
ARG ML_DTYPES_VERSION=0.6.0
COPY --from=deps /opt/edgellm/venv /opt/edgellm/venv
COPY --from=package /opt/edgellm/python /opt/edgellm/python
COPY --from=package /opt/edgellm/share /opt/edgellm/share
ENV PATH=/opt/edgellm/python/bin:/opt/edgellm/venv/bin:$PATH \
    EDGELLM_PLATFORMS=/opt/edgellm/share/platforms.json \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGELLM_TARGET="${TARGET}"
LABEL org.opencontainers.image.title="edgellm-validate" \
      org.opencontainers.image.version="${EDGELLM_VERSION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.edgellm.target="${TARGET}" \
      io.edgellm.backend="cpu" \
      io.edgellm.version="${EDGELLM_VERSION}" \
      io.edgellm.base-image="${BASE_IMAGE}" \
      io.edgellm.numpy="${NUMPY_VERSION}" \
      io.edgellm.onnx="${ONNX_VERSION}" \
      io.edgellm.onnxruntime="${ONNXRUNTIME_VERSION}" \
      io.edgellm.ml-dtypes="${ML_DTYPES_VERSION}" \
      io.edgellm.versions-file="/opt/edgellm/share/versions.json"
WORKDIR /edgellm
CMD ["python", "-m", "edgellm_validate.smoke"]
