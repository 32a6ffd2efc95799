"""Trainer throughput on the synthetic stream: one process vs two torchrun ranks (DMP, gloo), side by side.

Both runs go through the real CLI (`torchrec-prune train`) on the same stream and model, one after the
other in this script, and read `samples_per_second` from each run's summary.json. Results go to
docs/results/throughput.md and .json.

    .venv/bin/python benchmarks/trainer_throughput.py [--rows 40000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"


def run(nproc: int, rows: int, batch_size: int, run_dir: Path, threads: int) -> dict:
    cmd = [
        sys.executable, "-m", "torchrec_prune.cli", "train", "--data", "synthetic", "--rows", str(rows),
        "--batch-size", str(batch_size), "--window", "5000", "--increment-rows", "10000",
        "--nproc", str(nproc), "--run-dir", str(run_dir), "--no-checkpoint", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}; its last output:\n{done.stderr[-4000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    setups = [
        ("1 process, 1 thread", 1, args.global_batch, 1),
        (f"1 process, {cores} threads", 1, args.global_batch, cores),
        ("2 ranks (torchrun + DMP, gloo), 1 thread each", 2, args.global_batch // 2, 1),
    ]
    results = []
    started = _now()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for label, nproc, batch, threads in setups:
                summary = run(nproc, args.rows, batch, Path(tmp) / f"{repeat}-{nproc}-{threads}", threads)
                results.append(
                    {
                        "setup": label,
                        "repeat": repeat,
                        "samples_per_second": summary["samples_per_second"],
                        "last_quarter_ce": summary["last_quarter_ce"],
                    }
                )
                print(label, f"{summary['samples_per_second']:.0f} samples/s")
    table = []
    base = statistics.median(r["samples_per_second"] for r in results if r["setup"] == setups[0][0])
    for label, *_ in setups:
        rates = [r["samples_per_second"] for r in results if r["setup"] == label]
        ces = [r["last_quarter_ce"] for r in results if r["setup"] == label]
        table.append(
            (
                label,
                statistics.median(rates),
                min(rates),
                max(rates),
                statistics.median(rates) / base,
                statistics.median(ces),
            )
        )
    ended = _now()
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "started": started, "ended": ended, "runs": results}
    (OUT / "throughput.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Trainer throughput: one process vs two torchrun ranks",
        "",
        f"Synthetic stream, {args.rows} rows, global batch {args.global_batch}, reference DLRM (emb dim 4, "
        f"bottom 256-128-64-4, top 256-128-1, 10k-row tables), Adagrad; {args.repeats} repeats, run side by "
        f"side by `benchmarks/trainer_throughput.py` on {platform.machine()} with {cores} cores, "
        f"{started} to {ended}.",
        "",
        "| setup | samples/s (median) | min | max | vs 1 process, 1 thread | last-quarter CE |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {med:.0f} | {lo:.0f} | {hi:.0f} | {ratio:.2f}x | {ce:.4f} |"
        for label, med, lo, hi, ratio, ce in table
    ]
    lines += [
        "",
        "Wall time covers the training loop only (model build, sharding and process start excluded).",
    ]
    (OUT / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
