"""Export time and peak RSS against depth: a shape cut to a few layer counts (the 1B shape at 4, 8 and 16
layers by default; `--shape qwen3-30b-a3b --layers 2 4 8` for the MoE one).

Time should grow at most linearly with the layer count and peak RSS stay flat
(the largest tensors, the embedding / lm_head or one layer's expert stack, are the same at every depth).
Each checkpoint and output is deleted after its runs (`--keep` keeps them), so the MoE shape fits on disk.

    python -m benchmarks.layer_scaling --work /data/bench --runs 2
    python -m benchmarks.layer_scaling --shape qwen3-30b-a3b --layers 2 4 8 --runs 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from .make_checkpoint import write_checkpoint
from .run import measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("bench-work"))
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    rows = []
    for n in args.layers:
        ckpt = args.work / f"{args.shape}-{n}l"
        if not (ckpt / "config.json").exists():
            write_checkpoint(args.shape, ckpt, layers=n)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
        runs = []
        for _ in range(args.runs):
            shutil.rmtree(args.work / f"out-{n}l", ignore_errors=True)
            runs.append(measure([sys.executable, "-m", "edgellm_export", "-q", "export", str(ckpt),
                                 str(args.work / f"out-{n}l")], root))
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(args.work / f"out-{n}l", ignore_errors=True)
        rows.append({"shape": args.shape, "layers": n, "checkpoint_gb": size,
                     "wall_s": statistics.median(r["wall_s"] for r in runs),
                     "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs)})
        print(f"{n} layers: {rows[-1]}", file=sys.stderr)
    print("| layers | checkpoint GB | wall s | s per GB | peak RSS GB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_gb']:.2f} | {r['wall_s']:.1f} | "
              f"{r['wall_s'] / r['checkpoint_gb']:.1f} | {r['peak_rss_gb']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
