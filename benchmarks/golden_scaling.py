"""The golden pass alone, at 1x, 2x and 4x the scenario steps: its cost should follow the weight bytes
(each weight widened once per layer, for all steps together), not weight bytes x steps.

Runs the export's own plan and weight stream on a checkpoint, times only the golden pass's calls
(`GoldenRun.consume` and `finish`), one torch thread as in the export, with the decode steps of both
scenarios scaled. Prints a table: steps, token rows, golden seconds (wall and CPU), and seconds per
step.

    python -m benchmarks.golden_scaling /data/bench/llama-3.2-1b
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    import torch

    from edgellm_export import golden
    from edgellm_export.checkpoint import open_checkpoint
    from edgellm_export.contract import get_contract
    from edgellm_export.export import ExportOptions, plan_export

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    torch.set_num_threads(1)
    base = golden.DECODE_STEPS
    rows = ["| scenario steps | token rows | golden wall s | golden CPU s | CPU s per step |", "|---|---|---|---|---|"]
    with open_checkpoint(args.checkpoint) as ckpt:
        planned = plan_export(ckpt, get_contract("0.7"), ExportOptions())
        for mult in args.multiples:
            golden.DECODE_STEPS = base * mult
            scenarios = golden.make_scenarios(planned.cfg.vocab_size)
            steps = sum(len(sc.steps) for sc in scenarios)
            tokens = sum(int(st.token_ids.size) for sc in scenarios for st in sc.steps)
            run = golden.GoldenRun(planned.cfg, planned.family, planned.embed_ref, scenarios, planned.quant)
            wall = cpu = 0.0
            for w in planned.graph.weights:
                t = w.produce()
                t0, c0 = time.perf_counter(), time.process_time()
                run.consume(w.name, t)
                wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            run.finish()
            wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
            rows.append(f"| {steps} ({mult}x) | {tokens} | {wall:.2f} | {cpu:.2f} | {cpu / steps:.3f} |")
            print(rows[-1], flush=True)
    golden.DECODE_STEPS = base
    print("\n".join(rows))


if __name__ == "__main__":
    main()
