"""The golden bundle's logits are pinned bit for bit: speeding up the golden pass (issue 13) must not move
a single bit of what `validate` compares against, or the twin-vs-golden figures would move with it.

The digest is of golden/logits.safetensors for the built-in demo checkpoint. fp32 GEMM results depend on
the BLAS kernels a CPU gets, so a digest holds for one (torch version, CPU capability); on a combination
without a recorded digest the test says how to record one instead of passing.
"""

from __future__ import annotations

import pytest
import torch

from edgellm_core.digests import sha256_file
from edgellm_export.cli import main
from edgellm_export.demo_checkpoint import write_demo_checkpoint

# (torch version, torch.backends.cpu.get_cpu_capability()) -> sha256 of the demo's golden logits,
# recorded before the golden pass was restructured (HEAD c8932e4, 2026-12-02).
PINNED = {
    ("2.13.0+cpu", "AVX512"): "86955910a8bdd32d249512d72f11520bdcbe8f87d64709485c1bbd904562c5b1",
}


def test_demo_golden_logits_are_bit_identical(tmp_path):
    key = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    out = tmp_path / "out"
    assert main(["-q", "export", str(write_demo_checkpoint(tmp_path / "ckpt")), str(out)]) == 0
    digest = sha256_file(out / "llm" / "golden" / "logits.safetensors")
    if key not in PINNED:
        pytest.skip(f"no pinned golden digest for {key}; record {digest} from a checkout whose golden pass "
                    "is known good (the commit before a golden change)")
    assert digest == PINNED[key]
