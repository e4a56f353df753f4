"""pytest option `--require-gpu`: GPU tests that cannot run (no tensorrt, no pycuda, no plugin
library, no GPU or an unsupported one) fail instead of skipping, so a device CI job cannot go
green by skipping everything. `EDGELLM_REQUIRE_GPU=1` in the environment does the same.

Enable the option by importing the hook in tests/conftest.py:

    from gpu_option import pytest_addoption  # noqa: F401  (--require-gpu)
"""

from __future__ import annotations

import os

import pytest

REQUIRE_GPU_ENV = "EDGELLM_REQUIRE_GPU"


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true", default=False,
                     help="fail (instead of skip) GPU/TensorRT tests whose prerequisites are missing "
                          f"(also: {REQUIRE_GPU_ENV}=1)")


def gpu_required(config) -> bool:
    flag = config.getoption("--require-gpu", default=False)
    return bool(flag) or os.environ.get(REQUIRE_GPU_ENV, "") not in ("", "0")


def skip_or_fail(config, reason: str):
    """Skip with `reason`, or fail with it when the GPU is required."""
    if gpu_required(config):
        raise pytest.fail.Exception(f"--require-gpu: {reason}", pytrace=False) from None
    raise pytest.skip.Exception(reason) from None
