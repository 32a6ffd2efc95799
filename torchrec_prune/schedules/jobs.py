"""The training paradigms as jobs with a run folder: what ``torchrec-prune grow-prune`` and ``d2s`` run.

Both run on every torchrun rank under DMP, or in one process as the single rank of a group of its own
(``one_process_group``) with fused tables (``replica_factory``: the same fused table optimizer and
state keys), write a run folder, and
checkpoint and resume through the same ``RunCheckpointer``:

- grow/prune is ``torchrec_prune.train.job.run_job`` with the schedule as a hook; the schedule's state
  (phases entered, importance sums) is part of every run checkpoint, which falls between batches.
- D2S interleaves its dense job, pruning jobs and serving lines per increment, each data-parallel over
  all ranks (so every job sees the whole increment and every decision is the same on every rank, with no
  idle process subgroup); its checkpoints fall between increments and hold every live model (dense,
  the snapshots still needed, each line's serving model) with its optimizer state.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from torchrec_prune.distributed.checkpoint import save_checkpoint
from torchrec_prune.distributed.dmp import one_process_group
from torchrec_prune.distributed.run_checkpoint import CheckpointInfo
from torchrec_prune.metrics.writer import write_text_atomic
from torchrec_prune.numerics import enable_ftz_daz
from torchrec_prune.schedules.d2s import D2SConfig, D2SController, D2SResult
from torchrec_prune.schedules.grow_prune import GrowPruneConfig, GrowPruneSchedule
from torchrec_prune.schedules.report import d2s_rows, format_table, plot_relative_ce
from torchrec_prune.train.job import (
    PreparedJob,
    job_device,
    replica_factory,
    run_job,
    save_run_checkpoint,
    start_or_resume,
    summarize_line,
)
from torchrec_prune.train.replica import Replica
from torchrec_prune.train.rng import rng_state, set_rng_state


def run_grow_prune_job(prepared: PreparedJob, config: GrowPruneConfig) -> str:
    """Train the prepared job under ``config``'s phase plan; rank 0 writes ``phases.json``.

    Returns:
        one line for the console: samples, phases, FLOPs saving vs dense, last window.

    Example::

        prepared = prepare_job(JobConfig(rows=100_000, run_dir="runs/gp"))
        print(run_grow_prune_job(prepared, GrowPruneConfig(scheme("alternate"), beta=0.7)))
    """
    schedules: list[GrowPruneSchedule] = []

    def hooks(replica: Replica) -> list[GrowPruneSchedule]:
        schedule = GrowPruneSchedule(
            replica.model,
            config,
            replica.optimizers,
            num_rows=prepared.stream.num_rows,
            train=prepared.config.train,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
        )
        schedules.append(schedule)
        return [schedule]

    result = run_job(prepared, hooks)
    (schedule,) = schedules
    if not dist.is_initialized() or dist.get_rank() == 0:
        phases = [phase.summary() for phase in schedule.phases]
        out = {"plan": config.plan.name, "beta": config.beta, "phases": phases}
        write_text_atomic(Path(prepared.config.run_dir) / "phases.json", json.dumps(out, indent=2))
    saving = result.flops.saving
    return (
        f"{config.plan.name} (beta {config.beta:g}): {len(schedule.phases)} phases, training FLOPs "
        f"{-saving:+.1%} vs dense; " + summarize_line(result, prepared.config.run_dir)
    )


def d2s_summary(result: D2SResult) -> dict:
    """Headline figures of a D2S run: every line against the dense model on the same samples."""
    rows = {row.name: asdict(row) for row in d2s_rows(result)}
    lines = {
        name: {
            **rows[name],
            "births": line.births,
            "sources": line.sources,
            "sparsity": line.sparsity,
            "max_age": line.max_age,
            "windows": len(line.records),
        }
        for name, line in result.lines.items()
    }
    return {"warmup_rows": result.warmup_rows, "dense_windows": len(result.dense), "lines": lines}


def run_d2s_job(prepared: PreparedJob, config: D2SConfig) -> str:
    """Run D2S on the prepared job; rank 0 writes the run folder.

    The run folder holds ``dense/`` and one folder per line (``windows.jsonl``/``.csv``), ``summary.json``,
    ``relative_ce.png``, the dense model as ``checkpoint/`` and the serving model of the first line as
    ``serving_checkpoint/``, and the run checkpoints, written at the first increment end after every
    ``checkpoint_every`` rows. Prepare with ``prepare_job(..., replica="dense")``.

    Returns:
        the comparison table (every line against dense after the warm-up) and one summary line.

    Example::

        prepared = prepare_job(JobConfig(rows=200_000, run_dir="runs/d2s"), replica="dense")
        print(run_d2s_job(prepared, D2SConfig(r=4, p=2)))
    """
    enable_ftz_daz()
    device = job_device(prepared.config.timeout)  # joins torchrun's group, when there is one
    with one_process_group():
        return _run_d2s(prepared, config, device)


def _run_d2s(prepared: PreparedJob, config: D2SConfig, device: torch.device) -> str:
    job, stream = prepared.config, prepared.stream
    rank = dist.get_rank()
    # every replica built alike: under torchrun sharded with the dense model's plan
    factory = replica_factory(prepared, device)
    torch.manual_seed(job.seed)
    dense = factory.build()
    controller = D2SController(dense, stream, job.train, config, factory=factory, device=device)
    increment_rows, every = job.train.increment_rows, job.checkpoint_every

    def save(position: int) -> None:
        state = {"d2s": controller.state_dict(), "rng": rng_state()}
        save_run_checkpoint(prepared, position, controller.replicas(), state)

    def on_increment_end(k: int) -> None:
        before, after = k * increment_rows, min(stream.num_rows, (k + 1) * increment_rows)
        if every and after < stream.num_rows and after // every > before // every:
            save(after)

    def restore(info: CheckpointInfo) -> None:
        state = prepared.checkpointer.load_state(info)
        controller.prepare_resume(state["d2s"])
        prepared.checkpointer.load_replicas(info, controller.replicas())
        controller.load_state_dict(state["d2s"])
        set_rng_state(state["rng"])

    start_or_resume(prepared, restore)
    result = controller.run(on_increment_end)
    if every:
        save(stream.num_rows)
    run_dir = Path(job.run_dir)
    if job.checkpoint:
        save_checkpoint(controller.dense.replica.model, run_dir / "checkpoint")
        first = controller.lines[config.lines[0]].current
        if first is not None:
            save_checkpoint(first.replica.model, run_dir / "serving_checkpoint")
    table = format_table(d2s_rows(result))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(prepared.settings, indent=2))
        result.write(run_dir)
        summary = d2s_summary(result)
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        runs = {name: line.records for name, line in result.lines.items()}
        plot_relative_ce(runs, result.dense, run_dir / "relative_ce.png", title="D2S serving vs dense")
    main = result.lines[config.lines[0]]
    return (
        f"{table}\nd2s: {len(main.births)} sparse models served on line {main.name!r}, oldest "
        f"{main.max_age} increments; outputs in {run_dir}"
    )
