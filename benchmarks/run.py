"""Time `edgellm export` against the read-convert-write floor (and peers, where installed).

Every tool runs in its own process on the same checkpoint, interleaved run by
run so machine noise hits all of them alike. Wall time from the parent, CPU
time and peak RSS from the OS (wait4's rusage of the child), output size from
the files written. Prints a markdown table; `--json` writes the raw figures.

    python -m benchmarks.run --shape llama-3.2-1b --work /data/bench --runs 3 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .make_checkpoint import write_checkpoint


def tools(ckpt: Path, out: Path, nvidia_python: str, genai_python: str) -> dict[str, list[str] | None]:
    py = sys.executable
    peers: dict[str, list[str] | None] = {
        "floor (read, fp16, write one file)": [py, "-m", "benchmarks.floor", str(ckpt), str(out / "floor.bin")],
        "edgellm export": [py, "-m", "edgellm_export", "-q", "export", str(ckpt), str(out / "edgellm")],
        "edgellm export --no-golden": [py, "-m", "edgellm_export", "-q", "export", "--no-golden", str(ckpt),
                                       str(out / "edgellm")],
    }
    # Peers usually live in their own virtualenvs (their pins clash with ours).
    nv_script = Path(nvidia_python).parent / "tensorrt-edgellm-export"
    peers["NVIDIA tensorrt-edgellm exporter"] = (
        [str(nv_script), str(ckpt), str(out / "nvidia")] if nv_script.exists() else None)
    peers["onnxruntime-genai model builder"] = (
        [genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out / "genai"),
         "-p", "fp16", "-e", "cpu", "-c", str(out / "genai-cache")]
        if _importable(genai_python, "import onnxruntime_genai.models.builder") else None)
    return peers


def _importable(python: str, statement: str) -> bool:
    try:
        return subprocess.run([python, "-c", statement], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def output_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "genai-cache" not in f.parts)


def measure(cmd: list[str], cwd: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} failed with {code}: {err[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 2**20}


def run(ckpt: Path, work: Path, runs: int, nvidia_python: str, genai_python: str) -> dict:
    out = work / "outputs"
    root = Path(__file__).resolve().parents[1]
    results: dict[str, dict] = {}
    commands = tools(ckpt, out, nvidia_python, genai_python)
    for r in range(runs):
        for name, cmd in commands.items():
            if cmd is None:
                results.setdefault(name, {"available": False})
                continue
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            try:
                m = measure(cmd, root)
            except RuntimeError as e:  # a peer that cannot export this checkpoint is reported, not fatal
                results.setdefault(name, {"available": True, "runs": []}).setdefault("failed", str(e)[-400:])
                print(f"run {r + 1}/{runs} {name}: FAILED", file=sys.stderr)
                continue
            m["output_gb"] = output_bytes(out) / 2**30
            results.setdefault(name, {"available": True, "runs": []})["runs"].append(m)
            print(f"run {r + 1}/{runs} {name}: {m['wall_s']:.1f} s, {m['peak_rss_gb']:.2f} GB", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    for res in results.values():
        if res.get("runs"):
            for key in ("wall_s", "cpu_s", "peak_rss_gb", "output_gb"):
                vals = [x[key] for x in res["runs"]]
                res[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return results


def largest_tensor_gb(ckpt: Path) -> float:
    from edgellm_export.checkpoint import open_checkpoint

    with open_checkpoint(ckpt) as c:
        return max(c.ref(n).nbytes for n in c.names()) / 2**30


def table(results: dict) -> str:
    lines = ["| tool (median of runs) | wall s | CPU s | peak RSS GB | output GB |", "|---|---|---|---|---|"]
    for name, res in results.items():
        if not res.get("available"):
            lines.append(f"| {name} | not installed | | | |")
            continue
        if not res.get("runs"):
            lines.append(f"| {name} | failed (see JSON) | | | |")
            continue
        m = {k: res[k] for k in ("wall_s", "cpu_s", "peak_rss_gb", "output_gb")}
        wall = m["wall_s"]
        lines.append(f"| {name} | {wall['median']:.1f} ({wall['min']:.1f} to {wall['max']:.1f}) "
                     f"| {m['cpu_s']['median']:.1f} | {m['peak_rss_gb']['median']:.2f} "
                     f"| {m['output_gb']['median']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="an existing checkpoint directory")
    src.add_argument("--shape", help="generate a random checkpoint of this shape (see make_checkpoint.SHAPES)")
    p.add_argument("--work", type=Path, default=Path("bench-work"), help="scratch directory")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--nvidia-python", default=sys.executable,
                   help="python of a virtualenv with tensorrt-edgellm[export] installed")
    p.add_argument("--genai-python", default=sys.executable,
                   help="python of a virtualenv with onnxruntime-genai installed")
    p.add_argument("--no-peers", action="store_true", help="only the floor and edgellm export")
    args = p.parse_args()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = args.work / args.shape
        if not (ckpt / "config.json").exists():
            print(f"generating {args.shape} checkpoint in {ckpt}", file=sys.stderr)
            write_checkpoint(args.shape, ckpt)
    peers = "/nonexistent/python" if args.no_peers else None
    results = run(ckpt, args.work, args.runs, peers or args.nvidia_python, peers or args.genai_python)
    floor = results["floor (read, fp16, write one file)"]["wall_s"]["median"]
    ours = results["edgellm export"]
    summary = {
        "checkpoint": str(ckpt),
        "checkpoint_gb": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30,
        "largest_tensor_gb": largest_tensor_gb(ckpt),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB RAM, "
                   f"Python {platform.python_version()}",
        "export_over_floor": ours["wall_s"]["median"] / floor,
        "tools": results,
    }
    print(table(results))
    print(f"\nedgellm export / floor = {summary['export_over_floor']:.2f}x; peak RSS "
          f"{ours['peak_rss_gb']['median']:.2f} GB (largest tensor {summary['largest_tensor_gb']:.2f} GB); "
          f"checkpoint {summary['checkpoint_gb']:.2f} GB; {summary['machine']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
