"""Cost of full-state run checkpoints: the same job with checkpoints at the default interval and without.

Each round runs `torchrec-prune grow-prune` (reference DLRM, synthetic stream, one process, one intra-op
thread) twice, once with `--checkpoint-every` at its default and once with `--checkpoint-every 0`, in
alternating order, and times the whole command from the outside. The per-round ratio of the two wall
times is the cost; its median, spread and a 95% bootstrap interval over rounds go to
docs/results/checkpoints.md and .json, with the size of one checkpoint and the time to resume from it.

    .venv/bin/python benchmarks/checkpoint_overhead.py [--rows 300000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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


def timed(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, proc.stderr


def bootstrap_ci(values: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            arms = {"default": None, "off": 0}
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            seconds = {}
            for arm in order:
                seconds[arm], _ = timed(command(args.rows, Path(tmp) / f"{r}-{arm}", arms[arm]))
            rounds.append({"round": r, "order": order, **{f"{a}_seconds": s for a, s in seconds.items()}})
            print(json.dumps(rounds[-1]), flush=True)
        run_dir = Path(tmp) / "0-default"
        checkpoints = sorted((run_dir / "checkpoints").iterdir())
        size = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file())
        # Resume: keep only the first mid-run checkpoint and run the same command again.
        first = checkpoints[0]
        for other in checkpoints[1:]:
            subprocess.run(["rm", "-rf", str(other)], check=True)
        resume_cmd = [a if a != "never" else "auto" for a in command(args.rows, run_dir, None)]
        _, log = timed(resume_cmd)
        summary = json.loads((run_dir / "summary.json").read_text())
    ratios = [r["default_seconds"] / r["off_seconds"] for r in rounds]
    low, high = bootstrap_ci(ratios)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'unknown CPU'}",
        "command": " ".join(command(args.rows, Path("RUN"), None)),
        "rows": args.rows,
        "checkpoints_per_run": len(checkpoints),
        "rounds": rounds,
        "ratio_default_over_off": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "ci95": [low, high],
        },
        "checkpoint_bytes": size,
        "resumed_from": first.name,
        "resume_seconds": summary["resume_seconds"],
        "resumed_log_line": next((line for line in log.splitlines() if "resumed from" in line), None),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "checkpoints.json").write_text(json.dumps(result, indent=2))
    ratio = result["ratio_default_over_off"]
    table = "\n".join(
        f"| {r['round']} | {' then '.join(r['order'])} | {r['default_seconds']:.2f} | "
        f"{r['off_seconds']:.2f} | {r['default_seconds'] / r['off_seconds']:.4f} |"
        for r in rounds
    )
    (OUT / "checkpoints.md").write_text(
        f"""# Cost of full-state run checkpoints

`benchmarks/checkpoint_overhead.py --rows {args.rows} --rounds {args.rounds}`, {result["date"]},
{result["machine"]}.

Whole-command wall time of `{result["command"]}` with run checkpoints at the default interval (every
100,000 rows: {len(checkpoints) - 1} mid-run and one at the end) against `--checkpoint-every 0`, arms
alternating in order per round. One checkpoint (weights, masks, Adagrad state of all tables and MLPs,
trainer, window and schedule state) is {size / 1e6:.1f} MB.

| round | order | default (s) | off (s) | ratio |
|---|---|---|---|---|
{table}

Ratio with checkpoints / without: median **{ratio["median"]:.4f}** (min {ratio["min"]:.4f}, max
{ratio["max"]:.4f}, 95% bootstrap interval of the median [{low:.4f}, {high:.4f}] over {args.rounds} rounds).
Target: <= 1.05.

Resume from `{first.name}`: loading the checkpoint (models, optimizer, trainer state) took
{summary["resume_seconds"]:.3f} s before training went on.
"""
    )
    print(json.dumps(result["ratio_default_over_off"]))


if __name__ == "__main__":
    main()
