"""``ray-train`` as a job: settings checked up front, one asynchronous run, the run folder.

The run folder holds what ``train`` writes (``config.json``, ``windows.jsonl``/``windows.csv``,
``summary.json``, ``window_ce.png``, a DCP ``checkpoint/`` of the final model with its masks) plus the
asynchronous figures in ``summary.json``: per-trainer throughput, the staleness histogram, mask versions,
closed-weight violations, bytes moved per sample and time per pull/push, and what faults cost
(``lost``: trainer and shard restarts, rows trained but never scored, shard updates lost). Whole-run
checkpoints go to ``checkpoints/`` (a restarted job resumes from the newest), each shard's own
checkpoints to ``ps/shard-<s>/``. A ``d2s`` job writes the dense
and serving lines' windows under ``dense/`` and ``serving/`` and, in ``summary.json``, which model served
each increment and when each job ran.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from torchrec_prune.distributed.checkpoint import save_checkpoint
from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.config import SCHEDULES, PSConfig
from torchrec_prune.distributed.ps.d2s import RayD2SResult, run_d2s_ray
from torchrec_prune.distributed.ps.driver import AsyncRunResult, run_async
from torchrec_prune.masks import wrap
from torchrec_prune.metrics.window import WindowRecord
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.models import build_dlrm
from torchrec_prune.plots import plot_window_metric
from torchrec_prune.pruners.aux import AuxConfig
from torchrec_prune.schedules.d2s import D2SConfig
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for


@dataclass
class RayTrainConfig:
    """One ``ray-train`` job.

    Args:
        job: stream, model, loop and run-folder settings (as for ``train``; ``batch_size`` per trainer).
        ps: trainers, shards, staleness.
        schedule: ``dense`` or a grow/prune scheme (``alternate``, ``prune-only``, ``grow-only``, ``dsd``).
        beta: fraction of neurons pruned per layer in sparse phases.
        window_steps: global batches before a sparse phase over which importance is averaged.
        d2s_r, d2s_p, lam, eps: D2S period, snapshot lag (increments), AUX lambda and latent-score step
            (``d2s`` only; ``eps=None``: derived from AUX's latent budget and the pruning phase's length,
            as everywhere else).

    Example::

        RayTrainConfig(job=JobConfig(rows=20_000), ps=PSConfig(trainers=2), schedule="alternate")
    """

    job: JobConfig
    ps: PSConfig
    schedule: str = "dense"
    beta: float = 0.7
    window_steps: int = 50
    d2s_r: int = 4
    d2s_p: int = 2
    lam: float = 1.75
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {'|'.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.beta, bool) or not (isinstance(self.beta, (int, float)) and 0 < self.beta < 1):
            raise ValueError(f"--beta must be in (0, 1), got {self.beta!r}")
        for flag, value in (
            ("--window-steps", self.window_steps),
            ("--d2s-r", self.d2s_r),
            ("--d2s-p", self.d2s_p),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.d2s_r < self.d2s_p:
            raise ValueError(f"--d2s-r must be >= --d2s-p, got {self.d2s_r} < {self.d2s_p}")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise ValueError(f"--lam must be >= 0, got {self.lam!r}")
        if self.eps is not None and not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"--eps must be > 0, got {self.eps!r}")

    def d2s(self) -> D2SConfig:
        """The fixed-period D2S line of this job."""
        aux = AuxConfig(lam=self.lam, eps=self.eps)
        return D2SConfig(r=self.d2s_r, p=self.d2s_p, aux=aux, lines=("fixed",))

    def grow_prune(self) -> GrowPruneConfig | None:
        plans = {
            "alternate": PhasePlan.every(0.2),
            "prune-only": PhasePlan.prune_only(),
            "grow-only": PhasePlan.grow_only(),
            "dsd": PhasePlan.dsd(),
        }
        if self.schedule in ("dense", "d2s"):
            return None
        return GrowPruneConfig(
            plans[self.schedule],
            beta=self.beta,
            window_steps=self.window_steps,
            regrown_state=self.ps.regrown_state,
        )

    def check(self) -> None:
        """Every check that needs the stream (partitions, phases), before any actor starts."""
        stream = make_stream(self.job)
        train = self.job.train
        if self.schedule == "d2s":  # the d2s jobs are one actor each: no partitions to check
            increments = math.ceil(stream.num_rows / train.increment_rows)
            if increments <= self.d2s_p:
                raise ValueError(
                    f"--schedule d2s warms up for --d2s-p {self.d2s_p} increments but the stream has "
                    f"{increments}: raise --rows or lower --increment-rows"
                )
            return
        self.ps.check_stream(
            rows=stream.num_rows,
            batch_size=train.batch_size,
            increment_rows=train.increment_rows,
            momentum=train.momentum,
        )
        plan = self.grow_prune()
        if plan is not None:
            plan.plan.sample_bounds(
                stream.num_rows, train.increment_rows, train.batch_size * self.ps.trainers
            )


def run_ray_job(config: RayTrainConfig, pool: ActorPool | None = None) -> AsyncRunResult:
    """Run the job on the Ray instance this process is connected to and write the run folder."""
    run_dir = Path(config.job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    with MetricsWriter(run_dir) as writer:
        result = run_async(
            config.job, config.ps, config.grow_prune(), writer=writer, pool=pool, run_dir=run_dir
        )
    if config.job.checkpoint:
        save_checkpoint(final_model(config.job, result), run_dir / "checkpoint")
    (run_dir / "summary.json").write_text(json.dumps(summarize(result), indent=2))
    plot_window_metric({"async": result.records}, run_dir / "window_ce.png", title=config.job.data)
    return result


def run_ray_d2s_job(config: RayTrainConfig) -> RayD2SResult:
    """Run the ``d2s`` job (dense, pruning and serving actors) and write the run folder."""
    run_dir = Path(config.job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    result = run_d2s_ray(config.job, config.d2s())
    for name, records in (("dense", result.dense), ("serving", result.serving)):
        with MetricsWriter(run_dir / name) as writer:
            writer.write_all(records)
    summary = {
        "births": result.births,
        "max_age": result.max_age,
        "history": result.history,
        "pruning_overlaps_dense": result.overlaps("pruning", "dense"),
        "serving_overlaps_dense": result.overlaps("serving", "dense"),
        "spans": result.spans,
        "dense_ce": _mean_ce(result.dense),
        "serving_ce": _mean_ce(result.serving),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_window_metric(
        {"dense": result.dense, "serving (D2S)": result.serving},
        run_dir / "window_ce.png",
        title="D2S on Ray",
    )
    return result


def _mean_ce(records: list[WindowRecord]) -> float | None:
    return sum(r.ce * r.n for r in records) / sum(r.n for r in records) if records else None


def final_model(job: JobConfig, result: AsyncRunResult) -> torch.nn.Module:
    """The wrapped model holding the run's final weights and masks (what the shards hold)."""
    model = wrap(build_dlrm(model_config_for(make_stream(job), job.model)))
    state = model.state_dict()
    state.update(result.weights)
    state.update({name: torch.from_numpy(mask) for name, mask in result.masks.items()})
    model.load_state_dict(state)
    return model


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def summarize(result: AsyncRunResult) -> dict[str, Any]:
    """Headline and asynchronous figures for ``summary.json``."""
    records = result.records
    tail = records[-max(1, len(records) // 4) :] if records else []
    samples = result.samples
    trainers = []
    for t in result.trainers:
        busy = (t["last_step_at"] or 0) - (t["first_step_at"] or 0)
        trainers.append(
            {
                "rank": t["rank"],
                "samples": t["samples"],
                "steps": t["steps"],
                "samples_per_second": t["samples"] / busy if busy > 0 else None,
                "pull_ms": 1e3 * t["pull_seconds"] / max(1, t["pulls"]),
                "push_ms": 1e3 * t["push_seconds"] / max(1, t["steps"]),
                "compute_ms": 1e3 * t["compute_seconds"] / max(1, t["steps"]),
                "table_bytes": t["table_bytes"],
                "evictions": t["evictions"],
                "mask_version": t["mask_version"],
            }
        )
    moved = sum(t["bytes_pulled"] + t["bytes_pushed"] for t in result.trainers)
    return {
        "samples": samples,
        "wall_seconds": result.wall_seconds,
        "samples_per_second": samples / result.wall_seconds if result.wall_seconds else None,
        "windows": len(records),
        "last_quarter_ce": sum(r.ce for r in tail) / len(tail) if tail else None,
        "last_window": {k: _finite(v) for k, v in asdict(records[-1]).items()} if records else None,
        "bytes_per_sample": moved / samples if samples else None,
        "trainers": trainers,
        "servers": [
            {k: v for k, v in s.items() if k not in ("traces", "staleness")} | {"staleness": s["staleness"]}
            for s in result.servers
        ],
        "staleness_histogram": result.staleness(),
        "mask_versions": [s["mask_version"] for s in result.servers],
        "closed_weight_violations": result.violations,
        "phases": [asdict(p) for p in result.phases],
        "max_reorder_batches": result.max_pending,
        "resumed_from": result.resumed_from,
        "lost": result.lost,
        "duplicate_pushes_dropped": sum(s.get("duplicate_pushes", 0) for s in result.servers),
    }


def summarize_line(result: AsyncRunResult | RayD2SResult, run_dir: str | Path) -> str:
    if isinstance(result, RayD2SResult):
        return (
            f"D2S on Ray: serving CE {_mean_ce(result.serving):.4f} vs dense {_mean_ce(result.dense):.4f}; "
            f"sparse models born at increments {result.births}, oldest served age {result.max_age}; "
            f"outputs in {run_dir}"
        )
    last = result.records[-1] if result.records else None
    figures = f"last window CE {last.ce:.4f} NE {last.ne:.4f}" if last else "no window closed"
    lost = result.lost
    faults = (
        f"restarts: {len(lost['trainer_restarts'])} trainer, {len(lost['shard_restarts'])} shard "
        f"({lost['unscored_rows']} rows trained unscored, {lost['lost_updates']} shard updates lost)"
    )
    resumed = "" if result.resumed_from is None else f"resumed at row {result.resumed_from}; "
    return (
        f"trained {result.samples} samples on {len(result.trainers)} async trainers; {resumed}{figures}; "
        f"staleness {result.staleness()}; closed-weight violations {result.violations}; {faults}; "
        f"outputs in {run_dir}"
    )
