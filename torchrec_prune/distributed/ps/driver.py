"""The driver of an asynchronous run: starts shards and trainers, keeps every trainer busy, puts scores
back in stream order, closes look-ahead windows and runs the schedule by global samples consumed.

The loop is the same for the two backends (``backends.py``): Ray actors, and plain objects in this
process, which test the driver's logic without Ray. It also keeps the run going through faults: a
trainer that dies is started again after the last batch the shards took from it (batches it trained but
never reported count as consumed without a score, so no batch is trained twice), shards restore
themselves from their checkpoints, and what was lost is recorded. Whole-run checkpoints
(``run_state.py``) let a restarted driver resume.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.backends import (
    Backend,
    LocalBackend,
    MaskUpdate,
    RayBackend,
    RunSetup,
    TrainerLost,
)
from torchrec_prune.distributed.ps.collector import ScoreCollector, partition_ranges
from torchrec_prune.distributed.ps.config import PSConfig
from torchrec_prune.distributed.ps.layout import ParamLayout, mask_buffers
from torchrec_prune.distributed.ps.messages import as_tensor
from torchrec_prune.distributed.ps.run_state import AsyncCheckpoints
from torchrec_prune.distributed.ps.schedule import AsyncGrowPrune, AsyncPhase
from torchrec_prune.distributed.ps.trainer import BatchScore, ChunkReport
from torchrec_prune.masks import wrap
from torchrec_prune.metrics.functional import bce_sum
from torchrec_prune.metrics.window import WindowRecord
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.models import build_dlrm
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for

logger = logging.getLogger(__name__)
IN_FLIGHT = 2  # calls queued per trainer: one runs while the driver handles the other's report


@dataclass
class BatchTrace:
    """One trainer batch as the driver consumed it: for per-batch loss curves and timelines."""

    start: int
    n: int
    ce: float
    finished_at: float
    mask_version: int


@dataclass
class AsyncRunResult:
    """A finished asynchronous run.

    Args:
        records: look-ahead windows over the stream, as ``LookAheadWindow`` closes them.
        batches: every scored batch in stream order (CE, finish time, driver mask version when consumed).
        phases: the schedule's phases as entered (empty for a dense run).
        trainers: per-trainer counters (steps, samples, time in compute/pull/push, bytes, cache).
        servers: per-shard counters (versions, staleness histogram, closed-weight violations, traces).
        weights: the final parameters (full model, merged from the shards).
        masks: the final mask buffers.
        wall_seconds: from the first call to the last report (summed over resumed segments).
        samples: stream rows trained (scored or not).
        lost: what faults cost (``AsyncDriver.lost``); empty lists when nothing failed.
        resumed_from: stream position of the run checkpoint this run resumed from, or ``None``.
        max_pending: most batches the reorder buffer held at once.
        driver_cpu_seconds: CPU time the driver spent consuming reports (its load per batch bounds
            scaling).
    """

    records: list[WindowRecord]
    batches: list[BatchTrace]
    phases: list[AsyncPhase]
    trainers: list[dict[str, Any]]
    servers: list[dict[str, Any]]
    weights: dict[str, torch.Tensor]
    masks: dict[str, np.ndarray]
    wall_seconds: float
    samples: int
    lost: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    max_pending: int = 0
    driver_cpu_seconds: float = 0.0

    @property
    def violations(self) -> int:
        """Nonzero updates of closed weights over the whole run, summed over shards (must be 0)."""
        return sum(s["violations"] for s in self.servers)

    def staleness(self) -> dict[int, int]:
        """Histogram over all pushes: server versions between the pulled copy and the push."""
        total: Counter[int] = Counter()
        for s in self.servers:
            total.update({int(k): v for k, v in s["staleness"].items()})
        return dict(sorted(total.items()))


def setup_run(job: JobConfig, ps: PSConfig, schedule: GrowPruneConfig | None) -> RunSetup:
    """Build the initial model exactly as ``run_job`` does (same seed, same init) and split it."""
    stream = make_stream(job)
    config = model_config_for(stream, job.model)
    torch.manual_seed(job.seed)
    model = wrap(build_dlrm(config))
    layout = ParamLayout.from_model(model, ps.servers)
    state = dict(model.named_parameters())
    replica = wrap(build_dlrm(replace(config, num_embeddings=2)))
    layers: tuple[str, ...] = ()
    if schedule is not None:
        layers = tuple(AsyncGrowPrune.prunable(replica, schedule))
    return RunSetup(
        job=job,
        ps=ps,
        layout=layout,
        init=[layout.split_state(state, s) for s in range(ps.servers)],
        masks={name: buf.numpy().copy() for name, buf in mask_buffers(replica).items()},
        replica=replica,
        taylor_layers=layers,
    )


class AsyncDriver:
    """Consume trainer reports in any order: windows in stream order, schedule by samples consumed.

    Args:
        setup: the run's initial state.
        schedule: grow/prune settings, or ``None`` for a dense run.
        writer: where closed windows go, or ``None``.

    Example::

        driver = AsyncDriver(setup_run(job, ps, None), None)
        driver.consume(trainer.run_steps(8), backend.broadcast)
        records = driver.finish()
    """

    def __init__(
        self, setup: RunSetup, schedule: GrowPruneConfig | None, writer: MetricsWriter | None = None
    ) -> None:
        job, ps = setup.job, setup.ps
        self.job, self.ps = job, ps
        stream = make_stream(job)
        self.partitions = [
            partition_ranges(stream, job.train.increment_rows, job.train.batch_size, rank, ps.trainers)
            for rank in range(ps.trainers)
        ]  # each trainer's batch ranges, by batch number
        self.collector = ScoreCollector(sorted(r for part in self.partitions for r in part), job.train.window)
        self.schedule = (
            None
            if schedule is None
            else AsyncGrowPrune(
                setup.replica, schedule, num_rows=stream.num_rows, train=job.train, world=ps.trainers
            )
        )
        self.writer = writer
        self.batches: list[BatchTrace] = []
        self.consumed = [0] * ps.trainers  # batches of each trainer's partition consumed
        self.samples = 0
        self.max_pending = 0
        self.cpu_seconds = 0.0  # CPU time consuming reports (reorder, windows, schedule, mask broadcast)
        self.wall_seconds = 0.0
        self.trainer_restarts: list[dict[str, int]] = []
        self.shard_restarts: dict[tuple[int, int], int] = {}  # (shard, incarnation) -> updates lost

    @property
    def mask_version(self) -> int:
        return 0 if self.schedule is None else self.schedule.mask_version

    @property
    def lost(self) -> dict[str, Any]:
        """What faults cost: trainer restarts (batches trained but never scored), shard restarts (pushes
        applied after the shard's last checkpoint, lost with it)."""
        shards = [
            {"shard": s, "incarnation": i, "lost_updates": n}
            for (s, i), n in sorted(self.shard_restarts.items())
        ]
        return {
            "trainer_restarts": self.trainer_restarts,
            "shard_restarts": shards,
            "unscored_rows": sum(r["unscored_rows"] for r in self.trainer_restarts),
            "lost_updates": sum(s["lost_updates"] for s in shards),
        }

    def consume(self, report: ChunkReport, broadcast: Callable[[MaskUpdate, int], None]) -> None:
        started = time.thread_time()
        for restart in report.restarts:
            key = (restart.shard, restart.incarnation)
            self.shard_restarts[key] = max(self.shard_restarts.get(key, 0), restart.lost)
        for score in report.scores:
            self.consumed[report.rank] += 1
            self.samples += len(score.labels)
            self._accept(self.collector.add(score), broadcast)
        self.cpu_seconds += time.thread_time() - started

    def _accept(self, ready_batches, broadcast: Callable[[MaskUpdate, int], None]) -> None:
        closed = len(self.collector.records)
        for ready in ready_batches:
            if len(ready.labels):
                self._trace(ready)
            if self.schedule is not None:
                self.schedule.observe(ready.start, ready.taylor)
                masks = self.schedule.advance(self.collector.position)
                if masks is not None:
                    broadcast(masks, self.schedule.mask_version)
        if self.writer is not None:
            for record in self.collector.records[closed:]:
                self.writer.write(record)
        self.max_pending = max(self.max_pending, self.collector.pending)

    def restart(self, rank: int, backend: Backend) -> None:
        """Start trainer ``rank`` again after the last batch any shard took from it; the batches between
        the last one it reported and that one were trained but never scored: consumed without a score."""
        resume = max(backend.committed(rank) + 1, self.consumed[rank])
        unscored = self.partitions[rank][self.consumed[rank] : resume]
        for start, end in unscored:
            self._accept(self.collector.skip(start, end), backend.broadcast)
            self.samples += end - start
        record = {
            "rank": rank,
            "position": self.collector.position,
            "resumed_at_batch": resume,
            "unscored_batches": len(unscored),
            "unscored_rows": sum(end - start for start, end in unscored),
        }
        self.trainer_restarts.append(record)
        logger.warning(
            "trainer %d restarted at batch %d (%d rows trained, never scored)",
            rank,
            resume,
            record["unscored_rows"],
        )
        self.consumed[rank] = resume
        backend.restart_trainer(rank, resume)

    def lead(self, rank: int, queued: int) -> int:
        """Rows between the consumed position and the first batch trainer ``rank`` would get with
        ``queued`` calls already queued (0 when its partition has no batch left)."""
        index = self.consumed[rank] + queued * self.ps.chunk_steps
        part = self.partitions[rank]
        return 0 if index >= len(part) else part[index][0] - self.collector.position

    def _trace(self, score: BatchScore) -> None:
        n = len(score.labels)
        ce = float(bce_sum(as_tensor(score.logits), as_tensor(score.labels))) / n
        self.batches.append(BatchTrace(score.start, n, ce, score.finished_at, self.mask_version))

    def state_dict(self) -> dict[str, Any]:
        return {
            "collector": self.collector.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "batches": list(self.batches),
            "consumed": list(self.consumed),
            "samples": self.samples,
            "max_pending": self.max_pending,
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "trainer_restarts": list(self.trainer_restarts),
            "shard_restarts": dict(self.shard_restarts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collector.load_state_dict(state["collector"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.batches = list(state["batches"])
        self.consumed = list(state["consumed"])
        self.samples = int(state["samples"])
        self.max_pending = int(state["max_pending"])
        self.cpu_seconds = float(state["cpu_seconds"])
        self.wall_seconds = float(state["wall_seconds"])
        self.trainer_restarts = list(state["trainer_restarts"])
        self.shard_restarts = dict(state["shard_restarts"])

    def finish(self) -> list[WindowRecord]:
        last = self.collector.finish()
        if self.writer is not None:
            for record in last:
                self.writer.write(record)
        return self.collector.records


def drive(
    backend: Backend,
    driver: AsyncDriver,
    ps: PSConfig,
    *,
    checkpoint_every: int = 0,
    save: Callable[[int], None] | None = None,
    max_restarts: int = 0,
) -> None:
    """Keep ``IN_FLIGHT`` calls queued per trainer until every partition is done.

    Each time the consumed position passes a multiple of ``checkpoint_every`` rows, no new call is
    handed out until every queued one has reported; then ``save(position)`` runs and work resumes. A
    trainer that dies is restarted (at most ``max_restarts`` times per trainer). A trainer is not handed
    batches more than ``ps.max_lead_chunks`` global chunks past the consumed position (the oldest batch
    still missing), so a stalled or restarting trainer does not let the others run ahead in the stream.
    """
    started = time.perf_counter()
    done = [False] * ps.trainers
    restarts = [0] * ps.trainers
    due = _next_mark(driver.collector.position, checkpoint_every)
    bound = ps.max_lead_chunks * ps.chunk_steps * ps.trainers * driver.job.train.batch_size

    def fill(rank: int) -> None:
        while (
            backend.outstanding_for(rank) < IN_FLIGHT
            and not done[rank]
            and (not bound or driver.lead(rank, backend.outstanding_for(rank)) <= bound)
        ):
            backend.submit(rank, ps.chunk_steps)

    for rank in range(ps.trainers):
        fill(rank)
    while backend.outstanding():
        try:
            report = backend.next_report()
        except TrainerLost as lost:
            restarts[lost.rank] += 1
            if restarts[lost.rank] > max_restarts:
                raise RuntimeError(
                    f"{lost} ({restarts[lost.rank]} times; --max-restarts {max_restarts})"
                ) from lost
            driver.restart(lost.rank, backend)
        else:
            driver.consume(report, backend.broadcast)
            done[report.rank] |= report.done
        if due is None or driver.collector.position < due:
            for rank in range(ps.trainers):  # the position moved: a trainer held back may go on
                fill(rank)
        elif backend.outstanding() == 0:  # a quiet point: every pushed batch has been consumed
            if save is not None and not driver.collector.complete:
                backend.invalidate_copies()
                driver.wall_seconds += time.perf_counter() - started
                save(driver.collector.position)
                started = time.perf_counter()
            due = _next_mark(driver.collector.position, checkpoint_every)
            for rank in range(ps.trainers):
                fill(rank)
    driver.wall_seconds += time.perf_counter() - started


def _next_mark(position: int, every: int) -> int | None:
    return None if not every else (position // every + 1) * every


def run_async(
    job: JobConfig,
    ps: PSConfig,
    schedule: GrowPruneConfig | None = None,
    *,
    backend: str = "ray",
    writer: MetricsWriter | None = None,
    pool: ActorPool | None = None,
    run_dir: str | Path | None = None,
    max_restarts: int | None = None,
) -> AsyncRunResult:
    """One asynchronous pass over the job's stream; Ray must be initialised for ``backend="ray"``.

    Actors come from ``pool`` (a new pool when ``None``); the wall time of the result counts from the
    first call to the last report, after the actors have started. With ``run_dir``, shards checkpoint
    themselves under ``run_dir/ps/`` and whole-run checkpoints go to ``run_dir/checkpoints/`` every
    ``job.checkpoint_every`` rows; with ``job.resume == "auto"`` the run continues from the newest one.
    Trainers that die are restarted up to ``max_restarts`` times each (default: the pool's setting on
    Ray, 0 for the local backend).

    Example::

        with ray_session(None, num_cpus=2):
            result = run_async(job, PSConfig(trainers=2, staleness=2), GrowPruneConfig(PhasePlan.every(0.2)))
        result.records[-1].ce, result.violations, result.staleness(), result.lost
    """
    stream = make_stream(job)
    ps.check_stream(
        rows=stream.num_rows,
        batch_size=job.train.batch_size,
        increment_rows=job.train.increment_rows,
        momentum=job.train.momentum,
    )
    setup = setup_run(job, ps, schedule)
    checkpoints = None
    resumed: dict[str, Any] | None = None
    resumed_from = None
    if run_dir is not None:
        setup.store_dir = Path(run_dir) / "ps"
        checkpoints = AsyncCheckpoints(
            run_dir, keep=job.keep_checkpoints, identity=run_identity(job, ps, schedule)
        )
        latest = checkpoints.latest() if job.resume == "auto" else None
        if latest is None:
            checkpoints.clear()
        else:
            checkpoints.check(latest)
            resumed, resumed_from = checkpoints.load(latest), latest.position
            setup.shard_states, setup.trainer_states = resumed["shards"], resumed["trainers"]
            logger.info("resuming from %s", latest.path)
    driver = AsyncDriver(setup, schedule, writer)
    if resumed is not None:
        driver.load_state_dict(resumed["driver"])
        if writer is not None:
            writer.write_all(driver.collector.records)
    if backend == "ray":
        runner: Backend = RayBackend(setup, pool := pool or ActorPool())
        restarts = pool.max_restarts if max_restarts is None else max_restarts
    elif backend == "local":
        runner, restarts = LocalBackend(setup), max_restarts or 0
    else:
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")

    def save(position: int) -> None:
        assert checkpoints is not None
        checkpoints.save(
            position,
            shards=runner.shard_states(),
            trainers=runner.trainer_states(),
            driver=driver.state_dict(),
        )

    drive(
        runner,
        driver,
        ps,
        checkpoint_every=job.checkpoint_every if checkpoints is not None else 0,
        save=save if checkpoints is not None else None,
        max_restarts=restarts,
    )
    records = driver.finish()
    trainers, servers, parts = runner.finish()
    return AsyncRunResult(
        records=records,
        batches=driver.batches,
        phases=[] if driver.schedule is None else driver.schedule.phases,
        trainers=trainers,
        servers=servers,
        weights=setup.layout.merge_states(parts),
        masks={name: buf.numpy().copy() for name, buf in mask_buffers(setup.replica).items()},
        wall_seconds=driver.wall_seconds,
        samples=driver.samples,
        lost=driver.lost,
        resumed_from=resumed_from,
        max_pending=driver.max_pending,
        driver_cpu_seconds=driver.cpu_seconds,
    )


def run_identity(job: JobConfig, ps: PSConfig, schedule: GrowPruneConfig | None) -> dict[str, Any]:
    """Settings a resumed run must share with the run that wrote its checkpoint."""
    return {
        "data": job.data,
        "rows": job.rows,
        "seed": job.seed,
        "drift": job.drift,
        "batch_size": job.train.batch_size,
        "increment_rows": job.train.increment_rows,
        "window": job.train.window,
        "trainers": ps.trainers,
        "servers": ps.servers,
        "schedule": None if schedule is None else repr(schedule),
    }
