"""The converter alone against the floor's plain cast, on every 2-D tensor of a checkpoint.

`edgellm export` turns each `[out, in]` bf16/fp32 linear weight into a contiguous fp16 `[in, out]`
(models/weights.py: to_fp16(transpose=True), fp16 range check included); the floor only casts
(`tensor.to(float16)`, no transpose, no check). Both read the same memory-mapped tensors, on one
thread (as the export runs them), alternating, and drop the mapped pages after each tensor. Prints wall
and CPU seconds of each pass and their ratio.

    python -m benchmarks.convert /data/bench/llama-3.2-1b --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    import torch

    from edgellm_export.checkpoint import open_checkpoint
    from edgellm_export.models.weights import to_fp16

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    with open_checkpoint(args.checkpoint) as ckpt:
        names = [n for n in ckpt.names() if len(ckpt.ref(n).shape) == 2]
        gb = sum(ckpt.ref(n).nbytes for n in names) / 2**30

        def timed(fn) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            for n in names:
                ref = ckpt.ref(n)
                fn(ref)
                ref.release_rows(0, ref.shape[0])
            return time.perf_counter() - t0, time.process_time() - c0

        floor, ours = [], []
        for _ in range(args.rounds):
            floor.append(timed(lambda r: r.view().to(torch.float16)))
            ours.append(timed(lambda r: to_fp16(r, transpose=True)))
    ratio = statistics.median(o[1] / f[1] for o, f in zip(ours, floor))
    print(f"{len(names)} tensors, {gb:.2f} GiB, one thread, median of {args.rounds} alternating rounds:")
    print(f"  floor cast (no transpose, no check): wall {statistics.median(f[0] for f in floor):.2f} s, "
          f"CPU {statistics.median(f[1] for f in floor):.2f} s")
    print(f"  to_fp16(transpose=True):             wall {statistics.median(o[0] for o in ours):.2f} s, "
          f"CPU {statistics.median(o[1] for o in ours):.2f} s")
    print(f"  converter / floor cast (CPU, per-round median): {ratio:.2f}x")


if __name__ == "__main__":
    main()
