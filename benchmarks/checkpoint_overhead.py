"""Cost of full-state run checkpoints: the same job with checkpoints at the default interval and without.

Each round runs `torchrec-prune grow-prune` (reference DLRM, synthetic stream, one process, one intra-op
thread) twice, once with `--checkpoint-every` at its default and once with `--checkpoint-every 0`, in
alternating order, and times the whole command from the outside (wall and CPU time of the process).
The per-round ratios are the cost, reported with median, spread and a 95% bootstrap interval over
rounds. Other jobs on a shared machine make the wall-time ratio noisy, so the job's own measurement
is reported too: seconds spent writing run checkpoints over the training wall time of the same run.
Results go to docs/results/checkpoints.md and .json, with the size of one checkpoint and the time to
resume from it.

    .venv/bin/python benchmarks/checkpoint_overhead.py [--rows 300000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"


def command(rows: int, run_dir: Path, every: int | None) -> list[str]:
    cmd = [
        sys.executable, "-m", "torchrec_prune.cli", "grow-prune", "--rows", str(rows), "--batch-size", "128",
        "--no-progress", "--no-checkpoint", "--run-dir", str(run_dir), "--resume", "never",
    ]  # fmt: skip
    return cmd if every is None else [*cmd, "--checkpoint-every", str(every)]


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds (user + system) of the command, and its log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stderr


def summarize(values: list[float], draws: int = 10_000, seed: int = 0) -> dict:
    """Median, range and a 95% bootstrap interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "ci95": [medians[int(0.025 * draws)], medians[int(0.975 * draws)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--note", default="", help="conditions of the measurement, written with the results")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            arms = {"default": None, "off": 0}
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            row: dict = {"round": r, "order": order}
            for arm in order:
                run_dir = Path(tmp) / f"{r}-{arm}"
                row[f"{arm}_wall"], row[f"{arm}_cpu"], _ = timed(command(args.rows, run_dir, arms[arm]))
                summary = json.loads((run_dir / "summary.json").read_text())
                row[f"{arm}_training_seconds"] = summary["wall_seconds"]
                row[f"{arm}_checkpoint_seconds"] = summary["checkpoint_seconds"]
            rounds.append(row)
            print(json.dumps(row), flush=True)
        run_dir = Path(tmp) / "0-default"
        checkpoints = sorted((run_dir / "checkpoints").iterdir())
        size = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file())
        # Resume: keep only the first mid-run checkpoint and run the same command again.
        first = checkpoints[0]
        for other in checkpoints[1:]:
            subprocess.run(["rm", "-rf", str(other)], check=True)
        resume_cmd = [a if a != "never" else "auto" for a in command(args.rows, run_dir, None)]
        _, _, log = timed(resume_cmd)
        summary = json.loads((run_dir / "summary.json").read_text())
    stats = {
        "wall_ratio": [r["default_wall"] / r["off_wall"] for r in rounds],
        "cpu_ratio": [r["default_cpu"] / r["off_cpu"] for r in rounds],
        "checkpoint_share": [r["default_checkpoint_seconds"] / r["default_training_seconds"] for r in rounds],
    }
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'unknown CPU'}",
        "command": " ".join(command(args.rows, Path("RUN"), None)),
        "rows": args.rows,
        "checkpoints_per_run": len(checkpoints),
        "rounds": rounds,
        **{name: summarize(values) for name, values in stats.items()},
        "checkpoint_bytes": size,
        "resumed_from": first.name,
        "resume_seconds": summary["resume_seconds"],
        "resumed_log_line": next((line for line in log.splitlines() if "resumed from" in line), None),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "checkpoints.json").write_text(json.dumps(result, indent=2))
    table = "\n".join(
        f"| {r['round']} | {' then '.join(r['order'])} | {r['default_wall']:.1f} / {r['off_wall']:.1f} | "
        f"{r['default_cpu']:.1f} / {r['off_cpu']:.1f} | {r['default_checkpoint_seconds']:.2f} / "
        f"{r['default_training_seconds']:.1f} |"
        for r in rounds
    )

    def line(name: str, label: str) -> str:
        v = result[name]
        return (
            f"| {label} | **{v['median']:.4f}** | {v['min']:.4f} - {v['max']:.4f} | "
            f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] |"
        )

    share = result["checkpoint_share"]["median"]
    written = -(-args.rows // 100_000)
    (OUT / "checkpoints.md").write_text(
        f"""# Cost of full-state run checkpoints

`benchmarks/checkpoint_overhead.py --rows {args.rows} --rounds {args.rounds}`, {result["date"]},
{result["machine"]}.

`{result["command"]}` with run checkpoints at the default interval (every 100,000 rows:
{written - 1} mid-run and one at the end, the last {len(checkpoints)} kept) against
`--checkpoint-every 0`, arms alternating in order per round. {args.note}

One checkpoint (weights, masks, Adagrad state of all tables and MLPs, trainer, window and schedule
state) is {size / 1e6:.1f} MB.

| round | order | wall s (default / off) | CPU s (default / off) | writing checkpoints / training s |
|---|---|---|---|---|
{table}

| figure (over {args.rounds} rounds) | median | range | 95% bootstrap interval of the median |
|---|---|---|---|
{line("wall_ratio", "wall time, with / without")}
{line("cpu_ratio", "CPU time, with / without")}
{line("checkpoint_share", "time writing checkpoints / training time (same run)")}

Target: checkpoints at the default interval cost <= 5% of training wall time. Measured directly in the
job, writing them took {share:.2%} of its training time (median).

Resume from `{first.name}`: loading the checkpoint (model, optimizer, trainer and schedule state) took
{summary["resume_seconds"]:.3f} s before training went on.
"""
    )
    print(json.dumps({k: result[k] for k in stats}))


if __name__ == "__main__":
    main()
