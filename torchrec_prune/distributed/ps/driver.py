"""The driver of an asynchronous run: starts shards and trainers, keeps every trainer busy, puts scores
back in stream order, closes look-ahead windows and runs the schedule by global samples consumed.

The loop is the same for the two backends: ``RayBackend`` (actors, the real thing) and ``LocalBackend``
(the same library objects in this process, calls served round-robin), which tests the driver's logic
without Ray.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.collector import ScoreCollector, global_ranges
from torchrec_prune.distributed.ps.config import PSConfig
from torchrec_prune.distributed.ps.layout import ParamLayout, mask_buffers
from torchrec_prune.distributed.ps.messages import PullReply, PullRequest, PushReply, PushRequest, as_tensor
from torchrec_prune.distributed.ps.schedule import AsyncGrowPrune, AsyncPhase
from torchrec_prune.distributed.ps.server import ShardState
from torchrec_prune.distributed.ps.trainer import BatchScore, ChunkReport, PSTrainer
from torchrec_prune.masks import wrap
from torchrec_prune.metrics.functional import bce_sum
from torchrec_prune.metrics.window import WindowRecord
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.models import build_dlrm
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for

MaskUpdate = dict[str, np.ndarray]
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
        batches: every batch in stream order (CE, finish time, driver mask version when consumed).
        phases: the schedule's phases as entered (empty for a dense run).
        trainers: per-trainer counters (steps, samples, time in compute/pull/push, bytes, cache).
        servers: per-shard counters (versions, staleness histogram, closed-weight violations, traces).
        weights: the final parameters (full model, merged from the shards).
        masks: the final mask buffers.
        wall_seconds: from the first call to the last report.
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
    max_pending: int = 0
    driver_cpu_seconds: float = 0.0

    @property
    def samples(self) -> int:
        return sum(t["samples"] for t in self.trainers)

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


class Backend(Protocol):
    """Where shards and trainers live; the driver only submits calls and reads reports."""

    def submit(self, rank: int, steps: int) -> None: ...

    def next_report(self) -> ChunkReport: ...

    def broadcast(self, masks: MaskUpdate) -> None: ...

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, np.ndarray]]]: ...


class LocalShards:
    """``ShardClients`` over in-process shards (tests and the local backend)."""

    def __init__(self, shards: list[ShardState]) -> None:
        self.shards = shards

    def pull(self, requests: dict[int, PullRequest]) -> dict[int, PullReply]:
        return {s: self.shards[s].pull(r) for s, r in requests.items()}

    def push(self, requests: dict[int, PushRequest]) -> dict[int, PushReply]:
        return {s: self.shards[s].push(r) for s, r in requests.items()}


@dataclass
class RunSetup:
    """What both backends start from: the initial model split over shards, and the mask replica."""

    job: JobConfig
    ps: PSConfig
    layout: ParamLayout
    init: list[dict[str, np.ndarray]]
    masks: MaskUpdate
    replica: nn.Module
    taylor_layers: tuple[str, ...]


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


class LocalBackend:
    """Shards and trainers as plain objects in this process; calls are served in submission order."""

    def __init__(self, setup: RunSetup) -> None:
        ps = setup.ps
        self.shards = [
            ShardState(
                s,
                setup.layout,
                setup.init[s],
                setup.masks,
                setup.job.train,
                regrow_value=ps.regrow_value,
                trace_pushes=ps.trace_pushes,
            )
            for s in range(ps.servers)
        ]
        clients = LocalShards(self.shards)
        self.trainers = [
            PSTrainer(r, setup.job, ps, setup.layout, clients, taylor_layers=setup.taylor_layers)
            for r in range(ps.trainers)
        ]
        self._queue: deque[tuple[int, int]] = deque()

    def submit(self, rank: int, steps: int) -> None:
        self._queue.append((rank, steps))

    def next_report(self) -> ChunkReport:
        rank, steps = self._queue.popleft()
        return self.trainers[rank].run_steps(steps)

    def broadcast(self, masks: MaskUpdate) -> None:
        for shard in self.shards:
            shard.set_masks(masks)

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, np.ndarray]]]:
        return (
            [t.summary() for t in self.trainers],
            [s.summary() for s in self.shards],
            [s.weights() for s in self.shards],
        )


class RayBackend:
    """Shards and trainers as Ray actors taken from ``pool`` and started for this run."""

    def __init__(self, setup: RunSetup, pool: ActorPool) -> None:
        import ray

        ps = setup.ps
        self.servers, self.trainers = pool.take(ps.servers, ps.trainers)
        layout, masks = ray.put(setup.layout), ray.put(setup.masks)
        ray.get(
            [
                server.start.remote(s, layout, ray.put(setup.init[s]), masks, setup.job.train, ps)
                for s, server in enumerate(self.servers)
            ]
        )
        ray.get(
            [
                trainer.start.remote(r, setup.job, ps, layout, self.servers, setup.taylor_layers)
                for r, trainer in enumerate(self.trainers)
            ]
        )
        self._refs: dict[Any, int] = {}

    def submit(self, rank: int, steps: int) -> None:
        self._refs[self.trainers[rank].run_steps.remote(steps)] = rank

    def next_report(self) -> ChunkReport:
        import ray

        ready, _ = ray.wait(list(self._refs), num_returns=1)
        self._refs.pop(ready[0])
        return ray.get(ready[0])

    def broadcast(self, masks: MaskUpdate) -> None:
        import ray

        ref = ray.put(masks)
        ray.get([s.set_masks.remote(ref) for s in self.servers])

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, np.ndarray]]]:
        import ray

        return (
            ray.get([t.summary.remote() for t in self.trainers]),
            ray.get([s.summary.remote() for s in self.servers]),
            ray.get([s.weights.remote() for s in self.servers]),
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
        stream = make_stream(job)
        self.collector = ScoreCollector(
            global_ranges(stream, job.train.increment_rows, job.train.batch_size, ps.trainers),
            job.train.window,
        )
        self.schedule = (
            None
            if schedule is None
            else AsyncGrowPrune(
                setup.replica, schedule, num_rows=stream.num_rows, train=job.train, world=ps.trainers
            )
        )
        self.writer = writer
        self.batches: list[BatchTrace] = []
        self.max_pending = 0
        self.cpu_seconds = 0.0  # CPU time consuming reports (reorder, windows, schedule, mask broadcast)

    @property
    def mask_version(self) -> int:
        return 0 if self.schedule is None else self.schedule.mask_version

    def consume(self, report: ChunkReport, broadcast: Callable[[MaskUpdate], None]) -> None:
        started = time.thread_time()
        for score in report.scores:
            closed = len(self.collector.records)
            for ready in self.collector.add(score):
                self._trace(ready)
                if self.schedule is not None:
                    self.schedule.observe(ready.start, ready.taylor)
                    masks = self.schedule.advance(self.collector.position)
                    if masks is not None:
                        broadcast(masks)
            if self.writer is not None:
                for record in self.collector.records[closed:]:
                    self.writer.write(record)
            self.max_pending = max(self.max_pending, self.collector.pending)
        self.cpu_seconds += time.thread_time() - started

    def _trace(self, score: BatchScore) -> None:
        n = len(score.labels)
        ce = float(bce_sum(as_tensor(score.logits), as_tensor(score.labels))) / n if n else float("nan")
        self.batches.append(BatchTrace(score.start, n, ce, score.finished_at, self.mask_version))

    def finish(self) -> list[WindowRecord]:
        last = self.collector.finish()
        if self.writer is not None:
            for record in last:
                self.writer.write(record)
        return self.collector.records


def drive(backend: Backend, driver: AsyncDriver, ps: PSConfig) -> float:
    """Keep ``IN_FLIGHT`` calls queued per trainer until every partition is done; returns wall seconds."""
    started = time.perf_counter()
    outstanding = 0
    for rank in range(ps.trainers):
        for _ in range(IN_FLIGHT):
            backend.submit(rank, ps.chunk_steps)
            outstanding += 1
    done = [False] * ps.trainers
    while outstanding:
        report = backend.next_report()
        outstanding -= 1
        driver.consume(report, backend.broadcast)
        done[report.rank] |= report.done
        if not done[report.rank]:
            backend.submit(report.rank, ps.chunk_steps)
            outstanding += 1
    return time.perf_counter() - started


def run_async(
    job: JobConfig,
    ps: PSConfig,
    schedule: GrowPruneConfig | None = None,
    *,
    backend: str = "ray",
    writer: MetricsWriter | None = None,
    pool: ActorPool | None = None,
) -> AsyncRunResult:
    """One asynchronous pass over the job's stream; Ray must be initialised for ``backend="ray"``.

    Actors come from ``pool`` (a new pool when ``None``); the wall time of the result counts from the
    first call to the last report, after the actors have started.

    Example::

        with ray_session(None, num_cpus=2):
            result = run_async(job, PSConfig(trainers=2, staleness=2), GrowPruneConfig(PhasePlan.every(0.2)))
        result.records[-1].ce, result.violations, result.staleness()
    """
    stream = make_stream(job)
    ps.check_stream(
        rows=stream.num_rows,
        batch_size=job.train.batch_size,
        increment_rows=job.train.increment_rows,
        momentum=job.train.momentum,
    )
    setup = setup_run(job, ps, schedule)
    if backend == "ray":
        runner: Backend = RayBackend(setup, pool or ActorPool())
    elif backend == "local":
        runner = LocalBackend(setup)
    else:
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")
    driver = AsyncDriver(setup, schedule, writer)
    wall = drive(runner, driver, ps)
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
        wall_seconds=wall,
        max_pending=driver.max_pending,
        driver_cpu_seconds=driver.cpu_seconds,
    )
