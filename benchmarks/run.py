"""Time `edgellm export` against the read-convert-write floor (and peers, where installed).

Every tool runs in its own process on the same checkpoint. Runs alternate (floor, export, floor,
export, ...) so machine noise and page-cache write-back hit all of them alike, and every run starts
after a `sync`, so no run pays for the previous one's dirty pages. Wall time from the parent; CPU time
(user + system, all threads) and peak RSS from the OS (wait4's rusage of the child); output size from the
files written. The figure of merit is the median over rounds of each round's export/floor ratio, with
its spread; each result records the machine it ran on (CPU model, cores, BLAS/oneDNN, torch threads,
load average before and after) so figures from different machines are never mixed up.

    python -m benchmarks.run --shape llama-3.2-1b --work /data/bench --runs 3 --json results.json
    python -m benchmarks.run --shape llama-3.2-1b --busy 1   # one `yes > /dev/null` on another core

`--busy N` keeps N busy-looping processes running for the whole measurement, the way a shared CI box or
a HIL runner's other jobs would.
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

FLOOR = "floor (read, fp16, write one file)"
EXPORT = "edgellm export"
NO_GOLDEN = "edgellm export --no-golden"


def tools(ckpt: Path, out: Path, nvidia_python: str, genai_python: str) -> dict[str, list[str] | None]:
    py = sys.executable
    peers: dict[str, list[str] | None] = {
        FLOOR: [py, "-m", "benchmarks.floor", str(ckpt), str(out / "floor.bin")],
        EXPORT: [py, "-m", "edgellm_export", "-q", "export", str(ckpt), str(out / "edgellm")],
        NO_GOLDEN: [py, "-m", "edgellm_export", "-q", "export", "--no-golden", str(ckpt), str(out / "edgellm")],
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


def machine() -> dict:
    """What a figure depends on: CPU, cores, BLAS/oneDNN, torch's thread count, the load around the run."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    config = torch.__config__.show()
    blas = [line.strip(" -") for line in config.splitlines()
            if any(k in line for k in ("Math Kernel Library", "MKL-DNN", "OpenBLAS", "oneDNN"))
            and "Build settings" not in line]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(),
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads_default": torch.get_num_threads(), "blas": blas,
        "edgellm_export_torch_threads": 1,  # export._one_torch_thread
    }


def output_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "genai-cache" not in f.parts)


def measure(cmd: list[str], cwd: Path) -> dict:
    os.sync()  # start clean: no run pays for the previous run's dirty pages
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} failed with {code}: {err[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 2**20, "load_before": load}


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(n)]


def run(ckpt: Path, work: Path, runs: int, commands: dict[str, list[str] | None]) -> dict:
    out = work / "outputs"
    root = Path(__file__).resolve().parents[1]
    results: dict[str, dict] = {}
    for r in range(runs):
        for name, cmd in commands.items():  # floor first in every round, then the others: alternated
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
            print(f"run {r + 1}/{runs} {name}: {m['wall_s']:.1f} s, CPU {m['cpu_s']:.1f} s, "
                  f"{m['peak_rss_gb']:.2f} GB", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    for res in results.values():
        if res.get("runs"):
            for key in ("wall_s", "cpu_s", "user_s", "sys_s", "peak_rss_gb", "output_gb"):
                vals = [x[key] for x in res["runs"]]
                res[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return results


def ratios(results: dict, name: str, key: str = "wall_s") -> dict | None:
    """Per-round ratio of `name` over the floor (same round, adjacent runs), summarised."""
    mine, floor = results.get(name, {}).get("runs"), results.get(FLOOR, {}).get("runs")
    if not mine or not floor:
        return None
    per_round = [a[key] / b[key] for a, b in zip(mine, floor)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "rounds": per_round}


def largest_tensor_gb(ckpt: Path) -> float:
    from edgellm_export.checkpoint import open_checkpoint

    with open_checkpoint(ckpt) as c:
        return max(c.ref(n).nbytes for n in c.names()) / 2**30


def table(results: dict) -> str:
    lines = ["| tool (median of runs) | wall s (min to max) | CPU s (user + sys) | peak RSS GB | output GB "
             "| wall / floor | CPU / floor |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        if not res.get("available"):
            lines.append(f"| {name} | not installed | | | | | |")
            continue
        if not res.get("runs"):
            lines.append(f"| {name} | failed (see JSON) | | | | | |")
            continue
        wall, cpu = res["wall_s"], res["cpu_s"]
        rw, rc = ratios(results, name), ratios(results, name, "cpu_s")
        rel = (f"{rw['median']:.2f} ({rw['min']:.2f} to {rw['max']:.2f}) | {rc['median']:.2f}"
               if rw and name != FLOOR else "| ")
        lines.append(f"| {name} | {wall['median']:.1f} ({wall['min']:.1f} to {wall['max']:.1f}) "
                     f"| {cpu['median']:.1f} ({res['user_s']['median']:.1f} + {res['sys_s']['median']:.1f}) "
                     f"| {res['peak_rss_gb']['median']:.2f} | {res['output_gb']['median']:.2f} | {rel} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="an existing checkpoint directory")
    src.add_argument("--shape", help="generate a random checkpoint of this shape (see make_checkpoint.SHAPES)")
    p.add_argument("--work", type=Path, default=Path("bench-work"), help="scratch directory")
    p.add_argument("--runs", type=int, default=3, help="rounds (each runs every tool once); at least 3")
    p.add_argument("--busy", type=int, default=0, metavar="N", help="keep N `yes` processes busy meanwhile")
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--nvidia-python", default=sys.executable,
                   help="python of a virtualenv with tensorrt-edgellm[export] installed")
    p.add_argument("--genai-python", default=sys.executable,
                   help="python of a virtualenv with onnxruntime-genai installed")
    p.add_argument("--no-peers", action="store_true", help="only the floor and edgellm export")
    p.add_argument("--no-golden-run", action="store_true", help="skip `edgellm export --no-golden`")
    args = p.parse_args()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = args.work / args.shape
        if not (ckpt / "config.json").exists():
            print(f"generating {args.shape} checkpoint in {ckpt}", file=sys.stderr)
            write_checkpoint(args.shape, ckpt)
    peers = "/nonexistent/python" if args.no_peers else None
    commands = tools(ckpt, args.work / "outputs", peers or args.nvidia_python, peers or args.genai_python)
    if args.no_golden_run:
        commands.pop(NO_GOLDEN)
    busy = start_busy(args.busy)
    load_before = os.getloadavg()
    try:
        results = run(ckpt, args.work, args.runs, commands)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    summary = {
        "checkpoint": str(ckpt),
        "checkpoint_gb": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30,
        "largest_tensor_gb": largest_tensor_gb(ckpt),
        "machine": machine(),
        "busy_processes": args.busy,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "export_over_floor": ratios(results, EXPORT),
        "export_cpu_over_floor_cpu": ratios(results, EXPORT, "cpu_s"),
        "no_golden_over_floor": ratios(results, NO_GOLDEN),
        "tools": results,
    }
    print(table(results))
    m, ours = summary["machine"], results[EXPORT]
    print(f"\nedgellm export / floor = {summary['export_over_floor']['median']:.2f}x wall (median of per-round "
          f"ratios), {summary['export_cpu_over_floor_cpu']['median']:.2f}x CPU; peak RSS "
          f"{ours['peak_rss_gb']['median']:.2f} GB (largest tensor {summary['largest_tensor_gb']:.2f} GB); "
          f"checkpoint {summary['checkpoint_gb']:.2f} GB; {m['cpu']}, {m['cores']} cores, {m['blas']}, "
          f"busy {args.busy}, load {load_before[0]:.2f} -> {summary['load_average_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
