"""What a lost trainer or server shard costs an asynchronous grow/prune run on Ray.

Per seed, four runs of the same job on the same actors: uninterrupted twice, a trainer actor killed (its
process, ``ray.kill(no_restart=False)``) and a server shard killed, each kill once the shard has applied
``--kill-at`` pushes. Reported: whole-stream look-ahead CE and its paired difference to the uninterrupted
run of the same seed (t-interval over seeds), wall time, rows trained without a score (the dead
trainer's unreported batches), shard updates lost (pushes applied after the shard's last checkpoint),
restarts, closed-weight violations. Alternate grow/prune (beta 0.5), 2 trainers x 32 rows, 2 shards,
staleness 2, shard checkpoints every ``--shard-checkpoint-pushes`` pushes.

Writes docs/results/ray_faults.{md,json}.

    .venv/bin/python benchmarks/ray_faults.py [--seeds 3 --rows 12000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from torchrec_prune.distributed.ps import PSConfig, ray_session  # before ray: loopback
from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.driver import AsyncRunResult, run_async
from torchrec_prune.models import DLRMConfig
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.job import JobConfig
from torchrec_prune.train.trainer import TrainConfig

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
MODEL = DLRMConfig(num_embeddings=1000, dense_arch=[32, 4], over_arch=[64, 1])
PLAN = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=5)


def total_ce(result: AsyncRunResult) -> float:
    return sum(r.ce * r.n for r in result.records) / sum(r.n for r in result.records)


def run(pool: ActorPool, job: JobConfig, ps: PSConfig, kill: Callable[[], None] | None, at: int) -> dict:
    import ray

    killed_at: list[float] = []

    def killer() -> None:
        restarted = False
        while time.monotonic() < deadline:
            try:
                version = ray.get(pool.servers[0].summary.remote(), timeout=10)["version"]
            except Exception:  # not started yet
                version = 0
            restarted |= version < at
            if restarted and version >= at:
                assert kill is not None
                kill()
                killed_at.append(time.perf_counter())
                return
            time.sleep(0.02)

    deadline = time.monotonic() + 600
    if kill is not None:
        threading.Thread(target=killer, daemon=True).start()
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = run_async(job, ps, PLAN, pool=pool, run_dir=run_dir)
        wall = time.perf_counter() - started
    if kill is not None and not killed_at:
        raise RuntimeError("the run ended before the kill: lower --kill-at")
    return {
        "ce": total_ce(result),
        "wall_seconds": wall,
        "samples": result.samples,
        "scored_samples": sum(r.n for r in result.records),
        "unscored_rows": result.lost["unscored_rows"],
        "lost_updates": result.lost["lost_updates"],
        "trainer_restarts": len(result.lost["trainer_restarts"]),
        "shard_restarts": len(result.lost["shard_restarts"]),
        "violations": result.violations,
        "shard_checkpoints": sum(s["checkpoints"] for s in result.servers),
        "shard_checkpoint_seconds": sum(s["checkpoint_seconds"] for s in result.servers),
    }


def interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    t975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)[min(len(values), 11) - 2]
    half = t975 * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--kill-at", type=int, default=100, help="shard-0 pushes before the kill")
    parser.add_argument("--shard-checkpoint-pushes", type=int, default=50)
    args = parser.parse_args()
    ps = PSConfig(
        trainers=2, servers=2, staleness=2, cache_rows=512, chunk_steps=4,
        shard_checkpoint_pushes=args.shard_checkpoint_pushes,
    )  # fmt: skip
    runs: list[dict] = []
    with ray_session(None, num_cpus=os.cpu_count() or 1):
        import ray

        pool = ActorPool(max_restarts=3)
        kinds: dict[str, Callable[[], None] | None] = {
            "uninterrupted": None,
            "uninterrupted again": None,  # the spread of asynchronous runs alone
            "trainer killed": lambda: ray.kill(pool.trainers[1], no_restart=False),
            "shard killed": lambda: ray.kill(pool.servers[0], no_restart=False),
        }
        for seed in range(args.seeds):
            train = TrainConfig(batch_size=32, window=1000, increment_rows=2000, progress=False)
            job = JobConfig(rows=args.rows, drift=1.0, seed=seed, model=MODEL, train=train, checkpoint=False)
            for kind, kill in kinds.items():
                figures = run(pool, job, ps, kill, args.kill_at)
                runs.append({"seed": seed, "kind": kind} | figures)
                print(seed, kind, {k: round(v, 4) for k, v in figures.items()}, flush=True)
    write(args, runs)


def write(args: argparse.Namespace, runs: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_after": os.getloadavg()[0],
        "command": f"benchmarks/ray_faults.py --seeds {args.seeds} --rows {args.rows} --kill-at "
        f"{args.kill_at} --shard-checkpoint-pushes {args.shard_checkpoint_pushes}",
    }
    (OUT / "ray_faults.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    base = {r["seed"]: r for r in runs if r["kind"] == "uninterrupted"}
    lines = [
        "# A lost trainer or server shard in an asynchronous grow/prune run on Ray",
        "",
        f"`{meta['command']}` on {meta['machine']} ({meta['date']}; 1-min load average after the run "
        f"{meta['load_average_after']:.1f}: other work shared the cores, so wall times are indicative). "
        f"Synthetic drifting stream, {args.rows} rows; DLRM emb dim 4, bottom 32-4, top 64-1, 1000-row "
        "tables; alternate grow/prune (beta 0.5); 2 trainers x 32 rows, 2 shards, staleness 2; embedded "
        f"Ray on loopback. The kill comes when shard 0 has applied {args.kill_at} pushes; shards save "
        f"themselves every {args.shard_checkpoint_pushes} pushes. Seeds 0-{args.seeds - 1}.",
        "",
        "CE: whole-stream look-ahead CE over the scored samples. Difference: paired with the uninterrupted "
        "run of the same seed, mean and 95% t-interval over seeds. A second uninterrupted run of each seed "
        "shows how far two asynchronous runs of the same job differ without any fault (which trainer's "
        "push lands first changes from run to run); a fault's difference means something only beyond it.",
        "",
        "| run | CE (mean over seeds) | CE difference vs uninterrupted [95% CI] | wall s (mean) | "
        "rows trained unscored | shard updates lost | restarts (trainer/shard) | closed-weight violations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("uninterrupted", "uninterrupted again", "trainer killed", "shard killed"):
        mine = [r for r in runs if r["kind"] == kind]
        diff = interval([r["ce"] - base[r["seed"]]["ce"] for r in mine])
        ci = "-" if kind == "uninterrupted" else f"{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]"
        lines.append(
            f"| {kind} | {statistics.fmean(r['ce'] for r in mine):.4f} | {ci} | "
            f"{statistics.fmean(r['wall_seconds'] for r in mine):.1f} | "
            f"{', '.join(str(r['unscored_rows']) for r in mine)} | "
            f"{', '.join(str(r['lost_updates']) for r in mine)} | "
            f"{sum(r['trainer_restarts'] for r in mine)}/{sum(r['shard_restarts'] for r in mine)} | "
            f"{sum(r['violations'] for r in mine)} |"
        )
    saves = [r["shard_checkpoint_seconds"] / max(1, r["shard_checkpoints"]) for r in runs]
    lines += [
        "",
        f"A shard checkpoint (write, fsync, rename) took {1e3 * statistics.median(saves):.1f} ms (median "
        "over runs) for a shard of this model. Every row of the stream was trained exactly once in every "
        "run (the driver refuses a batch twice; shards drop a retried push of a batch they took).",
    ]
    (OUT / "ray_faults.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
