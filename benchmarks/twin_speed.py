"""CPU twin on a real-size export: a 128-token prefill plus 8 decode steps, time and peak RSS.

The weights should be resident once (onnxruntime maps or reads model.onnx.data;
no second, pre-packed copy). Prints the figures and the weights' size.

    python -m benchmarks.twin_speed OUT_DIR
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np


def main(out: Path, prompt: int = 128, decode: int = 8) -> None:
    from edgellm_validate.cpu_backend import CpuBackend
    from edgellm_validate.export_dir import find_llm_dir
    from edgellm_validate.twin import drive

    llm = find_llm_dir(out)
    rng = np.random.default_rng(0)
    vocab = 1000
    steps = [{"phase": "prefill", "token_ids": [rng.integers(0, vocab, prompt).tolist()],
              "context_lengths": [prompt], "kvcache_start_index": [], "last_token_ids": [[prompt - 1]]}]
    for k in range(decode):
        steps.append({"phase": "decode", "token_ids": [[int(rng.integers(0, vocab))]],
                      "context_lengths": [prompt + k + 1], "kvcache_start_index": [prompt + k],
                      "last_token_ids": [[0]]})
    t0 = time.perf_counter()
    backend = CpuBackend(llm)
    t_load = time.perf_counter() - t0
    times = []
    for _, _, _, logits in drive(llm, backend, [{"name": "speed", "steps": steps}], capacity=prompt + decode + 8):
        times.append(time.perf_counter() - t0 - t_load - sum(times))
        assert np.isfinite(logits).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weights = (llm / "model.onnx.data").stat().st_size / 2**30
    print(f"session load {t_load:.1f} s, prefill {prompt} tokens {times[0]:.1f} s, "
          f"{decode} decode steps {sum(times[1:]):.1f} s; peak RSS {peak:.2f} GB; weights {weights:.2f} GB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
