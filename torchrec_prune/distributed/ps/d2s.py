"""Dense-to-Sparse on Ray (D2S paper section 4, Fig. 4): the dense, pruning and serving jobs as separate
actors running at the same time.

Each actor is a thin shell around the library's job (``DenseJob``, ``PruningJob``, ``ServingJob`` of
``torchrec_prune.schedules.d2s``), so the algorithm is the one ``D2SController`` runs in one process; only
the timing differs. The driver submits, per increment ``k``: the dense job's training on ``k``; when a
sparse model is due ``p`` increments later (birth ``b = k + p``), a snapshot of the dense model taken
before ``k`` (handed through the object store) and the pruning job on increments ``k .. b - 1``, which then
runs while the dense job trains on the next increments; and the serving job on ``k``, which installs the
model born at ``k`` first (Ray resolves the pruning job's result before the call runs). The fixed-period
line (``fixed``) is supported; the adaptive one is not (its early trigger needs the serving CE of an
increment before the next pruning job starts, which serialises the jobs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from torchrec_prune.data.stream import Increment, iter_increments
from torchrec_prune.distributed.ps.actors import _numerics
from torchrec_prune.masks import wrap
from torchrec_prune.metrics.window import WindowRecord
from torchrec_prune.models import build_dlrm
from torchrec_prune.schedules.d2s import (
    D2SConfig,
    DenseJob,
    IncrementScores,
    PruningJob,
    ServingJob,
    Snapshot,
    SparseModel,
)
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for
from torchrec_prune.train.replica import LocalReplicaFactory
from torchrec_prune.train.trainer import make_optimizer

Span = tuple[str, int, float, float]  # (what, increment, started, finished) in time.time() seconds


def _increments(job: JobConfig) -> list[Increment]:
    return list(iter_increments(make_stream(job), job.train.increment_rows, job.train.batch_size))


def _model(job: JobConfig) -> torch.nn.Module:
    """The dense model exactly as ``run_job`` and the one-process D2S build it (same seed, same init)."""
    stream = make_stream(job)
    torch.manual_seed(job.seed)
    return wrap(build_dlrm(model_config_for(stream, job.model)))


class DenseActor:
    """The dense job: trains on every increment and serves snapshots of the last ``p`` increments."""

    def __init__(self, job: JobConfig, d2s: D2SConfig, threads: int = 1) -> None:
        _numerics(threads)
        self.increments = _increments(job)
        self.job = DenseJob(_model(job), replace(job.train, progress=False), keep=d2s.p)
        self.spans: list[Span] = []

    def train(self, k: int) -> IncrementScores:
        started = time.time()
        scores = self.job.train(self.increments[k])
        self.spans.append(("dense", k, started, time.time()))
        return scores

    def snapshot(self, k: int) -> Snapshot:
        return self.job.snapshot(k)

    def finish(self) -> tuple[list[WindowRecord], list[Span]]:
        self.job.finish()
        return self.job.records, self.spans


class PruningActor:
    """The pruning job: AUX-prunes a dense snapshot on the increments after it, then fine-tunes."""

    def __init__(self, job: JobConfig, d2s: D2SConfig, threads: int = 1) -> None:
        _numerics(threads)
        self.increments = _increments(job)
        train = replace(job.train, progress=False)
        factory = LocalReplicaFactory(_model(job), lambda m: [make_optimizer(m.parameters(), train)])
        self.job = PruningJob(factory, train, d2s.aux, d2s.prune_fraction)
        self.spans: list[Span] = []

    def run(self, snapshot: Snapshot, birth: int, p: int) -> SparseModel:
        started = time.time()
        sparse = self.job.run(snapshot, self.increments[birth - p : birth], birth)
        self.spans.append(("pruning", birth, started, time.time()))
        return sparse

    def spans_(self) -> list[Span]:
        return self.spans


class ServingActor:
    """The serving line: scores each increment with the serving model before training on it."""

    def __init__(self, job: JobConfig, threads: int = 1) -> None:
        _numerics(threads)
        self.increments = _increments(job)
        self.line = ServingJob("fixed", replace(job.train, progress=False))
        self.spans: list[Span] = []

    def serve(self, k: int, sparse: SparseModel | None, dense: IncrementScores | None) -> float:
        """Serve increment ``k`` (installing ``sparse`` first when given); the dense scores stand in
        before the first sparse model exists. Returns the line's CE on ``k``."""
        started = time.time()
        if sparse is not None:
            self.line.install(sparse)
        if self.line.current is None:
            if dense is None:
                raise ValueError(f"increment {k}: no sparse model serves yet and no dense scores stand in")
            self.line.stand_in(dense)
            ce = dense.ce()
        else:
            ce = self.line.serve(self.increments[k]).ce()
        self.spans.append(("serving", k, started, time.time()))
        return ce

    def finish(self) -> tuple[list[WindowRecord], list[tuple[int, int]], list[Span]]:
        self.line.finish()
        return self.line.records, self.line.history, self.spans


@dataclass
class RayD2SResult:
    """The dense and serving lines' windows, which model served which increment, and every job's spans."""

    dense: list[WindowRecord]
    serving: list[WindowRecord]
    history: list[tuple[int, int]]
    births: list[int]
    spans: list[Span]

    @property
    def max_age(self) -> int:
        """Oldest age, in increments, of a served model."""
        return max((k - birth for k, birth in self.history), default=0)

    def overlaps(self, a: str, b: str) -> bool:
        """Whether some span of job ``a`` ran at the same time as some span of job ``b``."""
        return any(
            x[2] < y[3] and y[2] < x[3] for x in self.spans if x[0] == a for y in self.spans if y[0] == b
        )


def births(d2s: D2SConfig, increments: int) -> list[int]:
    """Increments at which a new sparse model starts serving on the fixed line."""
    return list(range(d2s.first_serving, increments, d2s.r))


def run_d2s_ray(job: JobConfig, d2s: D2SConfig, threads: int = 1) -> RayD2SResult:
    """Run the fixed D2S line with the three jobs as concurrent Ray actors (Ray must be initialised).

    Raises:
        ValueError: an adaptive or baseline line in ``d2s.lines``, or a stream too short for the warm-up.

    Example::

        with ray_session(None, num_cpus=2):
            result = run_d2s_ray(job, D2SConfig(r=2, p=1, warmup=2))
        result.max_age < 2, result.overlaps("pruning", "dense")
    """
    import ray

    if d2s.lines != ("fixed",):
        raise ValueError(f"D2S on Ray runs the 'fixed' line only, got lines={d2s.lines}")
    count = len(_increments(job))
    if count <= d2s.first_serving:
        raise ValueError(f"the stream has {count} increments but D2S warms up for {d2s.first_serving}")
    dense = ray.remote(DenseActor).options(num_cpus=0).remote(job, d2s, threads)
    pruning = ray.remote(PruningActor).options(num_cpus=0).remote(job, d2s, threads)
    serving = ray.remote(ServingActor).options(num_cpus=0).remote(job, threads)
    due = births(d2s, count)
    try:
        made: dict[int, Any] = {}
        served = []
        for k in range(count):
            dense_scores = dense.train.remote(k)
            if k + d2s.p in due:  # snapshot before k; the pruning job runs while the dense job goes on
                made[k + d2s.p] = pruning.run.remote(dense.snapshot.remote(k), k + d2s.p, d2s.p)
            warm = dense_scores if k < d2s.first_serving else None  # else serving does not wait for dense
            served.append(serving.serve.remote(k, made.pop(k, None), warm))
        ray.get(served)
        dense_records, dense_spans = ray.get(dense.finish.remote())
        records, history, serving_spans = ray.get(serving.finish.remote())
        spans = dense_spans + ray.get(pruning.spans_.remote()) + serving_spans
    finally:
        for actor in (dense, pruning, serving):
            ray.kill(actor)
    return RayD2SResult(dense_records, records, history, due, sorted(spans, key=lambda s: s[2]))
