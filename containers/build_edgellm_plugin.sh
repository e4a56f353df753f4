#!/usr/bin/env bash
# Clones TensorRT-Edge-LLM at a pinned tag and builds its plugin library (libNvInfer_edgellm_plugin.so)
# against the TensorRT and CUDA of the image it runs in. Used by containers/Dockerfile.tensorrt; the
# per-platform values come from edgellm_validate/data/platforms.json (`plugin_build`) through build args.
#
# Environment:
#   EDGELLM_REPO             upstream repository (default https://github.com/NVIDIA/TensorRT-Edge-LLM.git)
#   EDGELLM_TAG              release tag, e.g. v0.7.1 (required)
#   EDGELLM_COMMIT           optional: the commit the tag must resolve to (a moved tag fails the build)
#   EDGELLM_SRC              checkout directory (default /opt/TensorRT-Edge-LLM)
#   TRT_PACKAGE_DIR          where TensorRT's headers/libs are (default /usr)
#   CUDA_CTK_VERSION         e.g. 12.6, 13.0 (Edge-LLM rejects -DCUDA_VERSION; this is its name)
#   CMAKE_CUDA_ARCHITECTURES e.g. 87, 110a, "80;86;89;100a;120"
#   EMBEDDED_TARGET          jetson-orin | jetson-thor | auto-thor | gb10; empty on x86 (adds the
#                            aarch64 toolchain file, which names /usr/bin/aarch64-linux-gnu-g++)
#   ENABLE_CUTE_DSL, CUTE_DSL_ARTIFACT_TAG   CuTe DSL kernels (empty: upstream default)
#   BUILD_TARGETS            cmake targets (default NvInfer_edgellm_plugin)
#   MAX_JOBS                 parallel jobs (default: nproc)
#   DRY_RUN=1                print the commands instead of running them (unit tests)
set -euo pipefail

EDGELLM_REPO=${EDGELLM_REPO:-https://github.com/NVIDIA/TensorRT-Edge-LLM.git}
: "${EDGELLM_TAG:?EDGELLM_TAG (the pinned upstream release tag) is required}"
EDGELLM_SRC=${EDGELLM_SRC:-/opt/TensorRT-Edge-LLM}
TRT_PACKAGE_DIR=${TRT_PACKAGE_DIR:-/usr}
BUILD_TARGETS=${BUILD_TARGETS:-NvInfer_edgellm_plugin}
MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
LIB=libNvInfer_edgellm_plugin.so

run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

flags=(-G Ninja -DCMAKE_BUILD_TYPE=Release "-DTRT_PACKAGE_DIR=${TRT_PACKAGE_DIR}")
[ -z "${CUDA_CTK_VERSION:-}" ] || flags+=("-DCUDA_CTK_VERSION=${CUDA_CTK_VERSION}")
[ -z "${CMAKE_CUDA_ARCHITECTURES:-}" ] || flags+=("-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}")
if [ -n "${EMBEDDED_TARGET:-}" ]; then
    flags+=("-DEMBEDDED_TARGET=${EMBEDDED_TARGET}"
            "-DCMAKE_TOOLCHAIN_FILE=${EDGELLM_SRC}/cmake/aarch64_linux_toolchain.cmake")
fi
[ -z "${ENABLE_CUTE_DSL:-}" ] || flags+=("-DENABLE_CUTE_DSL=${ENABLE_CUTE_DSL}")
[ -z "${CUTE_DSL_ARTIFACT_TAG:-}" ] || flags+=("-DCUTE_DSL_ARTIFACT_TAG=${CUTE_DSL_ARTIFACT_TAG}")

run git clone --branch "$EDGELLM_TAG" --depth 1 --recurse-submodules --shallow-submodules \
    "$EDGELLM_REPO" "$EDGELLM_SRC"
if [ "${DRY_RUN:-0}" != 1 ]; then
    head=$(git -C "$EDGELLM_SRC" rev-parse HEAD)
    if [ -n "${EDGELLM_COMMIT:-}" ] && [ "$head" != "$EDGELLM_COMMIT" ]; then
        echo "build_edgellm_plugin.sh: tag $EDGELLM_TAG is at $head, expected $EDGELLM_COMMIT" >&2
        exit 1
    fi
    # prebuilt kernel archives are stored with git-lfs in later releases
    if grep -qs 'filter=lfs' "$EDGELLM_SRC/.gitattributes"; then
        git -C "$EDGELLM_SRC" lfs install --local && git -C "$EDGELLM_SRC" lfs pull
    fi
    echo "$head" >"$EDGELLM_SRC/.edgellm-commit"
fi
run cmake -S "$EDGELLM_SRC" -B "$EDGELLM_SRC/build" "${flags[@]}"
# shellcheck disable=SC2086
run cmake --build "$EDGELLM_SRC/build" --parallel "$MAX_JOBS" --target $BUILD_TARGETS
if [ "${DRY_RUN:-0}" != 1 ]; then
    test -f "$EDGELLM_SRC/build/$LIB" || { echo "build_edgellm_plugin.sh: $LIB was not produced" >&2; exit 1; }
    ls -l "$EDGELLM_SRC/build/$LIB"
fi
