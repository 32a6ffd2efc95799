"""Dense-to-Sparse (D2S, SPEC 6, D2S paper section 4): a dense job, pruning jobs and serving lines.

- ``DenseJob`` trains the full model on every increment, forever, and keeps snapshots (replicas of the
  model with its optimizer state) taken before each of the last ``p`` increments.
- ``PruningJob`` turns the snapshot from ``p`` increments back into a sparse model: AUX pruning on the
  data of those ``p`` increments, then fine-tuning with the fixed mask on the rest of them.
- ``ServingJob`` is one serving line: the sparse model that serves now, scored look-ahead on each
  increment *before* it trains on that increment (with its fixed mask).

``D2SController`` interleaves them increment by increment. Several serving lines can share one dense
job, so they are compared on the same samples against the same dense model:

- ``fixed``: D2S, a new sparse model replaces the serving one every ``r`` increments.
- ``adaptive``: D2S, also early when the serving model's look-ahead CE on an increment exceeds the dense
  model's on the same increment by more than ``threshold`` (relative).
- ``fixed_mask``: the single AUX sparse model, fine-tuned with its fixed mask forever (baseline).
- ``adaptation``: the single AUX model whose mask keeps learning during serving (AUX never frozen).

The first sparse model is produced after ``warmup`` increments; until then the dense model serves every
line (its scores stand in), so every line's windows cover the whole stream and relative CE is always
taken on the same samples.

Under torchrun + DMP every job is data-parallel over all ranks: each rank runs the same sequence of jobs
on its own partition of each increment, models are DMP replicas sharded with one plan (see
``torchrec_prune.train.replica``), and every decision is taken from all-reduced figures (AUX statistics,
per-increment CE), so masks and swaps are identical on every rank. Interleaving on all ranks, rather
than jobs on process subgroups, keeps one sharding plan and one process group for every model, and no
rank idles while another job runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_prune.data.stream import Increment, Stream, check_int, iter_increments
from torchrec_prune.metrics.functional import bce_sum
from torchrec_prune.metrics.window import LookAheadWindow, WindowRecord
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.pruners.aux import AuxConfig, AuxPruner
from torchrec_prune.pruners.base import overall_sparsity
from torchrec_prune.train.flops import FlopsTotals
from torchrec_prune.train.hooks import TrainHook
from torchrec_prune.train.replica import LocalReplicaFactory, Replica, ReplicaFactory
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, default_forward, make_optimizer

LINES = ("fixed", "adaptive", "fixed_mask", "adaptation")
ForwardFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class D2SConfig:
    """D2S settings, in increments of the stream.

    Args:
        r: a new sparse model serves every ``r`` increments (>= 1, and >= ``p``: with ``r < p`` more than
            ``p + 1`` jobs would run at once, which the paradigm rules out).
        p: the sparse model is pruned from the dense snapshot ``p`` increments back, on those ``p``
            increments' data (>= 1).
        threshold: adaptive mode: relative look-ahead CE gap (serving vs dense, same increment) above which
            a new sparse model is produced early (> 0). Set it above the gap of a freshly pruned model.
        min_age: adaptive mode: increments a sparse model serves before a large gap may replace it early,
            in [1, ``r``] (default ``p``: at most one early pruning job per ``p`` increments, as in fixed
            mode, so a gap that stays large does not re-prune at every increment).
        warmup: increments the dense model trains before the first sparse model serves (>= ``p``; default
            ``p``).
        prune_fraction: share of the ``p`` increments' batches spent in AUX's pruning phase, in (0, 1];
            the rest fine-tunes with the fixed mask.
        aux: AUX settings (``phase_steps`` is set from ``prune_fraction``).
        lines: serving lines to run on the shared dense job, a non-empty subset of ``LINES``.

    Example::

        D2SConfig(r=4, p=2, lines=("fixed", "adaptive", "fixed_mask", "adaptation"))
    """

    r: int = 4
    p: int = 2
    threshold: float = 0.01
    min_age: int | None = None
    warmup: int | None = None
    prune_fraction: float = 0.5
    aux: AuxConfig = field(default_factory=AuxConfig)
    lines: tuple[str, ...] = ("fixed",)

    def __post_init__(self) -> None:
        check_int("D2SConfig.r", self.r, 1)
        check_int("D2SConfig.p", self.p, 1)
        if self.r < self.p:
            raise ValueError(
                f"D2SConfig.r must be >= p (got r={self.r}, p={self.p}): with r < p more than p + 1 jobs "
                "would run in parallel"
            )
        if isinstance(self.threshold, bool) or not (
            isinstance(self.threshold, (int, float)) and self.threshold > 0
        ):
            raise ValueError(f"D2SConfig.threshold must be > 0, got {self.threshold!r}")
        if self.min_age is not None:
            check_int("D2SConfig.min_age", self.min_age, 1)
            if self.min_age > self.r:
                raise ValueError(f"D2SConfig.min_age must be <= r={self.r}, got {self.min_age}")
        if self.warmup is not None:
            check_int("D2SConfig.warmup", self.warmup, self.p)
        if not (isinstance(self.prune_fraction, (int, float)) and 0 < self.prune_fraction <= 1):
            raise ValueError(f"D2SConfig.prune_fraction must be in (0, 1], got {self.prune_fraction!r}")
        if not isinstance(self.aux, AuxConfig):
            raise ValueError(f"D2SConfig.aux must be an AuxConfig, got {type(self.aux).__name__}")
        self.lines = tuple(self.lines)
        unknown = [name for name in self.lines if name not in LINES]
        if not self.lines or unknown or len(set(self.lines)) != len(self.lines):
            raise ValueError(f"D2SConfig.lines must be distinct names from {LINES}, got {self.lines!r}")

    @property
    def minimum_age(self) -> int:
        """Increments a sparse model serves before an early replacement (``min_age``, or ``p``)."""
        return self.p if self.min_age is None else self.min_age

    @property
    def first_serving(self) -> int:
        """Increment from which the first sparse model serves (``warmup``, or ``p`` when unset)."""
        return self.p if self.warmup is None else self.warmup


# ------------------------------------------------------------------------------------------------------
@dataclass
class IncrementScores:
    """Look-ahead logits and labels of one model on one increment (this rank's share)."""

    logits: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    def ce(self) -> float:
        """Mean BCE over the increment on every rank (NaN when empty).

        Collective under a process group (sums of BCE and counts are all-reduced): call it on every rank,
        which then all get the same value, so decisions taken from it agree.
        """
        n = sum(t.numel() for t in self.labels)
        if self.logits:  # on the logits' device, where the collective runs (CUDA under NCCL)
            bce = bce_sum(torch.cat(self.logits), torch.cat(self.labels))
        else:
            bce = torch.zeros((), dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = torch.stack([bce, torch.tensor(float(n), dtype=torch.float64, device=bce.device)])
            dist.all_reduce(sums)
            bce, n = sums[0], int(sums[1])
        return float(bce) / n if n else float("nan")


class _Capture:
    """A ``forward_fn`` that also keeps each batch's look-ahead logits and labels."""

    def __init__(self, base: ForwardFn = default_forward) -> None:
        self.base = base
        self.scores = IncrementScores()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.base(model, batch)
        self.scores.logits.append(logits.detach().reshape(-1))
        self.scores.labels.append(batch.labels.detach().reshape(-1))
        return loss, logits

    def take(self) -> IncrementScores:
        scores, self.scores = self.scores, IncrementScores()
        return scores


def _quiet(train: TrainConfig) -> TrainConfig:
    return replace(train, progress=False)


def _resolve(
    model: nn.Module | Replica, factory: ReplicaFactory | None, train: TrainConfig
) -> tuple[Replica, ReplicaFactory]:
    """A plain model trains in place with an optimizer from ``train``; replicas default to copies of it."""

    def optimizers(m: nn.Module) -> list[torch.optim.Optimizer]:
        return [make_optimizer(m.parameters(), train)]

    dense = model if isinstance(model, Replica) else Replica(model, optimizers(model))
    return dense, factory or LocalReplicaFactory(dense.model, optimizers)


def _records(state: list[dict[str, Any]]) -> list[WindowRecord]:
    return [WindowRecord(**r) for r in state]


@dataclass
class Snapshot:
    """The dense job's replica (model and optimizer state) from before it trained on ``increment``."""

    increment: int
    replica: Replica


class DenseJob:
    """Train the dense model on every increment and keep snapshots of the last ``keep`` increments.

    A snapshot is a replica filled by ``factory.copy_``; the oldest one's replica is reused for the next,
    so at most ``keep`` snapshot replicas ever exist.

    Args:
        dense: the wrapped dense model (trained in place, with an optimizer from ``train``) or a replica.
        train: loop settings.
        keep: snapshots to keep (the ``p`` of D2S, >= 1).
        device: where batches go.
        factory: builds and fills snapshot replicas (default: deep copies of ``dense``, one process).
        forward_fn: ``(model, batch) -> (loss, logits)``.

    Example::

        job = DenseJob(wrap(build_dlrm()), TrainConfig(), keep=2)
        for increment in iter_increments(stream, 20_000, 128):
            job.train(increment)
    """

    def __init__(
        self,
        dense: nn.Module | Replica,
        train: TrainConfig,
        keep: int,
        device: torch.device | str = "cpu",
        *,
        factory: ReplicaFactory | None = None,
        forward_fn: ForwardFn = default_forward,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"DenseJob.keep must be an integer >= 1, got {keep!r}")
        self.replica, self.factory = _resolve(dense, factory, train)
        self.capture = _Capture(forward_fn)
        self.trainer = IncrementalTrainer(
            self.replica.model,
            _quiet(train),
            optimizers=self.replica.optimizers,
            device=device,
            forward_fn=self.capture,
        )
        self.keep = keep
        self.snapshots: dict[int, Snapshot] = {}
        self.records: list[WindowRecord] = []
        self.seconds = 0.0

    @property
    def model(self) -> nn.Module:
        return self.replica.model

    def train(self, increment: Increment) -> IncrementScores:
        """Snapshot, then train on ``increment``; returns its look-ahead scores."""
        stale = sorted(k for k in self.snapshots if k <= increment.index - self.keep)
        replica = self.snapshots.pop(stale[0]).replica if stale else self.factory.build()
        for old in stale[1:]:
            del self.snapshots[old]
        self.factory.copy_(replica, self.replica)
        self.snapshots[increment.index] = Snapshot(increment.index, replica)
        started = time.perf_counter()
        self.records += self.trainer.train_increment(increment)
        self.seconds += time.perf_counter() - started
        return self.capture.take()

    def snapshot(self, increment: int) -> Snapshot:
        if increment not in self.snapshots:
            raise KeyError(f"no dense snapshot of increment {increment}; kept: {sorted(self.snapshots)}")
        return self.snapshots[increment]

    def finish(self) -> None:
        last = self.trainer.window.flush()
        if last is not None:
            self.records.append(last)

    @property
    def flops(self) -> FlopsTotals:
        return self.trainer.flops.totals

    def state_dict(self) -> dict[str, Any]:
        """Trainer state, records, time and which snapshots exist (their tensors live in the replicas)."""
        return {
            "trainer": self.trainer.state_dict(),
            "records": [asdict(r) for r in self.records],
            "seconds": self.seconds,
            "snapshots": sorted(self.snapshots),
        }

    def prepare_resume(self, state: dict[str, Any]) -> None:
        """Build the (empty) snapshot replicas that ``state`` refers to, for the caller to load."""
        for k in state["snapshots"]:
            if k not in self.snapshots:
                self.snapshots[k] = Snapshot(k, self.factory.build())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(self.snapshots) != list(state["snapshots"]):
            raise ValueError(
                f"the dense job holds snapshots {sorted(self.snapshots)} but the state has "
                f"{list(state['snapshots'])}: call prepare_resume(state) first"
            )
        self.trainer.load_state_dict(state["trainer"])
        self.records = _records(state["records"])
        self.seconds = state["seconds"]


@dataclass(frozen=True)
class Birth:
    """What a serving line keeps of each sparse model it served (not its weights).

    Args:
        birth: first increment it served.
        source: increment of the dense snapshot it was pruned from.
        sparsity: fraction of pruned weights over the pruned Linears when it was made.
        flops: training FLOPs its pruning job spent.
        seconds: wall time of its pruning job.
    """

    birth: int
    source: int
    sparsity: float
    flops: FlopsTotals
    seconds: float

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Birth:
        """Inverse of ``dataclasses.asdict``."""
        return cls(**{**values, "flops": FlopsTotals(**values["flops"])})


@dataclass
class SparseModel:
    """A model made by a pruning job.

    Args:
        replica: the sparse model and its optimizers (state carried over from the snapshot).
        birth: first increment it serves.
        source: increment of the dense snapshot it was pruned from.
        hooks: hooks that keep running while it serves (the AUX pruner of the adaptation variant).
        sparsity: fraction of pruned weights over the pruned Linears when it was made.
        flops: training FLOPs its pruning job spent.
        seconds: wall time of its pruning job.
    """

    replica: Replica
    birth: int
    source: int
    hooks: list[TrainHook]
    sparsity: float
    flops: FlopsTotals
    seconds: float

    @property
    def model(self) -> nn.Module:
        return self.replica.model

    def summary(self) -> Birth:
        return Birth(self.birth, self.source, self.sparsity, self.flops, self.seconds)

    def copy(self, factory: ReplicaFactory) -> SparseModel:
        """An independent copy (model and optimizer state, no hooks), to serve on another line."""
        replica = factory.build()
        factory.copy_(replica, self.replica)
        return replace(self, replica=replica, hooks=[])


class PruningJob:
    """Prune a dense snapshot with AUX on the data of the increments after it, then fine-tune the fixed mask.

    Args:
        factory: builds the replica the snapshot is copied into.
        train: loop settings.
        aux: AUX settings.
        prune_fraction: share of the data's batches spent in the AUX phase.
        device: where batches go.
        forward_fn: ``(model, batch) -> (loss, logits)``.

    Example::

        sparse = PruningJob(dense_job.factory, TrainConfig(), AuxConfig(), 0.5).run(
            dense_job.snapshot(k - p), increments[k - p : k], birth=k)
    """

    def __init__(
        self,
        factory: ReplicaFactory,
        train: TrainConfig,
        aux: AuxConfig,
        prune_fraction: float,
        device: torch.device | str = "cpu",
        forward_fn: ForwardFn = default_forward,
    ) -> None:
        self.factory = factory
        self.train = _quiet(train)
        self.aux = aux
        self.prune_fraction = prune_fraction
        self.device = device
        self.forward_fn = forward_fn

    def phase_steps(self, increments: Sequence[Increment]) -> int:
        """Steps of AUX's pruning phase on ``increments`` (``prune_fraction`` of their batches)."""
        return max(1, round(self.prune_fraction * sum(inc.num_batches for inc in increments)))

    def adaptation_pruner(self, model: nn.Module, phase_steps: int) -> AuxPruner:
        """The AUX pruner of the adaptation variant: its phase never ends, the mask keeps learning, with
        the latent step of the ``phase_steps``-step phase the fixed-mask models get (same lambda, same
        sparsity)."""
        return AuxPruner(model, replace(self.aux, phase_steps=None, eps=self.aux.step_for(phase_steps)))

    def run(
        self, snapshot: Snapshot, increments: Sequence[Increment], birth: int, *, adapt: bool = False
    ) -> SparseModel:
        """Make the sparse model that serves from ``birth``.

        With ``adapt`` the AUX mask is never frozen: the pruner comes back in ``hooks`` and keeps learning
        the mask while the model serves (the adaptation variant).
        """
        started = time.perf_counter()
        replica = self.factory.build()
        self.factory.copy_(replica, snapshot.replica)
        phase_steps = self.phase_steps(increments)
        if adapt:
            pruner = self.adaptation_pruner(replica.model, phase_steps)
        else:
            pruner = AuxPruner(replica.model, replace(self.aux, phase_steps=phase_steps))
        trainer = IncrementalTrainer(
            replica.model,
            self.train,
            optimizers=replica.optimizers,
            hooks=[pruner],
            device=self.device,
            forward_fn=self.forward_fn,
        )
        for increment in increments:
            trainer.train_increment(increment)
        if not adapt:
            pruner.finalize(trainer.ctx)  # a no-op when the phase already ended
        return SparseModel(
            replica=replica,
            birth=birth,
            source=snapshot.increment,
            hooks=[pruner] if adapt else [],
            sparsity=overall_sparsity(pruner.stats()),
            flops=trainer.flops.totals,
            seconds=time.perf_counter() - started,
        )


class ServingJob:
    """One serving line: the sparse model serving now, trained incrementally with its fixed mask.

    Each batch is scored by the serving model before it trains on it. The look-ahead window belongs to
    the line, not to a model, so it runs on across model swaps (and across the warm-up, when the dense
    model's scores stand in).

    Args:
        name: the line's name.
        train: loop settings.
        device: where batches go.
        forward_fn: ``(model, batch) -> (loss, logits)``.

    Example::

        line = ServingJob("fixed", TrainConfig())
        line.install(pruning_job.run(snapshot, increments[k - p : k], birth=k))
        gap = line.serve(increments[k]).ce() / dense_scores.ce() - 1.0
    """

    def __init__(
        self,
        name: str,
        train: TrainConfig,
        device: torch.device | str = "cpu",
        forward_fn: ForwardFn = default_forward,
    ) -> None:
        self.name = name
        self.train = _quiet(train)
        self.device = device
        self.window = LookAheadWindow(train.window)
        self.capture = _Capture(forward_fn)
        self.records: list[WindowRecord] = []
        self.current: SparseModel | None = None
        self.trainer: IncrementalTrainer | None = None
        self.births: list[Birth] = []
        self.history: list[tuple[int, int]] = []  # (increment served, birth of the model serving it)
        self.gaps: list[tuple[int, float]] = []  # (increment, relative CE vs dense on that increment)
        self.flops = FlopsTotals()
        self.seconds = 0.0

    def install(self, sparse: SparseModel) -> None:
        """Replace the serving model (the old one is released)."""
        if self.trainer is not None:
            self.flops = self.flops + self.trainer.flops.totals
        self.current = sparse
        self.births.append(sparse.summary())
        self.trainer = IncrementalTrainer(
            sparse.model,
            self.train,
            optimizers=sparse.replica.optimizers,
            hooks=sparse.hooks,
            device=self.device,
            forward_fn=self.capture,
        )
        self.trainer.window = self.window  # the line's window, shared by every model it serves

    def serve(self, increment: Increment) -> IncrementScores:
        """Score each batch of ``increment`` look-ahead, then train on it; returns the scores."""
        if self.trainer is None or self.current is None:
            raise RuntimeError(f"serving line {self.name!r} has no model yet")
        started = time.perf_counter()
        self.records += self.trainer.train_increment(increment)
        self.seconds += time.perf_counter() - started
        self.history.append((increment.index, self.current.birth))
        return self.capture.take()

    def stand_in(self, scores: IncrementScores) -> None:
        """Serve the dense model's scores of an increment (before the first sparse model exists)."""
        for logits, labels in zip(scores.logits, scores.labels, strict=True):
            self.records += self.window.update(logits, labels)

    def finish(self) -> None:
        last = self.window.flush()
        if last is not None:
            self.records.append(last)
        if self.trainer is not None:
            self.flops = self.flops + self.trainer.flops.totals
            self.trainer = None

    def state_dict(self) -> dict[str, Any]:
        """Window, records, timeline and the serving model's trainer state (its tensors live in its replica).

        The current model's birth and source are the last of ``births``.
        """
        return {
            "window": self.window.state_dict(),
            "trainer": None if self.trainer is None else self.trainer.state_dict(),
            "records": [asdict(r) for r in self.records],
            "births": [asdict(b) for b in self.births],
            "history": list(self.history),
            "gaps": list(self.gaps),
            "flops": asdict(self.flops),
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.trainer is None) != (state["trainer"] is None):
            raise ValueError(
                f"serving line {self.name!r} {'has no' if self.trainer is None else 'has a'} model but the "
                "state says otherwise: call prepare_resume(state) first"
            )
        self.window.load_state_dict(state["window"])
        if self.trainer is not None:
            self.trainer.load_state_dict(state["trainer"])
        self.records = _records(state["records"])
        self.births = [Birth.from_dict(b) for b in state["births"]]
        self.history = [tuple(h) for h in state["history"]]
        self.gaps = [tuple(g) for g in state["gaps"]]
        self.flops = FlopsTotals(**state["flops"])
        self.seconds = state["seconds"]


# ------------------------------------------------------------------------------------------------------
@dataclass
class LineResult:
    """One serving line over the whole stream.

    Args:
        name: the line.
        records: look-ahead windows of whatever served (dense scores during the warm-up).
        history: ``(increment, birth)`` for every increment a sparse model served.
        births: increment from which each sparse model served.
        sources: increment of the dense snapshot each sparse model was pruned from.
        sparsity: pruned fraction of each sparse model when it was made.
        gaps: ``(increment, relative CE vs dense)`` per served increment.
        serving_flops: training FLOPs of the serving models (``effective`` counts AUX's kept weights).
        pruning_flops: training FLOPs of the pruning jobs this line used.
        serving_seconds, pruning_seconds: wall time of serving-model training and of pruning jobs.
    """

    name: str
    records: list[WindowRecord]
    history: list[tuple[int, int]]
    births: list[int]
    sources: list[int]
    sparsity: list[float]
    gaps: list[tuple[int, float]]
    serving_flops: FlopsTotals
    pruning_flops: FlopsTotals
    serving_seconds: float
    pruning_seconds: float

    @property
    def max_age(self) -> int:
        """Oldest age, in increments, of a served model (0: served in its first increment)."""
        return max((k - birth for k, birth in self.history), default=0)


@dataclass
class D2SResult:
    """Dense reference and serving lines on the same samples.

    Args:
        dense: the dense model's look-ahead windows.
        lines: each serving line's result.
        warmup_rows: stream positions before the first sparse model served.
        dense_flops, dense_seconds: the dense job's training FLOPs and wall time.
    """

    dense: list[WindowRecord]
    lines: dict[str, LineResult]
    warmup_rows: int
    dense_flops: FlopsTotals
    dense_seconds: float

    def write(self, run_dir: str | Path) -> None:
        """``windows.jsonl``/``windows.csv`` under ``run_dir/dense`` and ``run_dir/<line>``."""
        for name, records in [("dense", self.dense), *((n, line.records) for n, line in self.lines.items())]:
            with MetricsWriter(Path(run_dir) / name) as writer:
                writer.write_all(records)


class D2SController:
    """Run the dense job, the pruning jobs and the serving lines of ``config`` over ``stream``.

    Per increment ``k``: lines due a new model get one (made by a pruning job from the dense snapshot of
    increment ``k - p`` on increments ``k - p .. k - 1``; lines due at the same ``k`` serve copies of one
    pruning job's model); the dense job snapshots, then trains on ``k``; each line serves ``k`` (or, in
    the warm-up, takes the dense scores); the adaptive line compares its CE on ``k`` with the dense
    model's. Under a process group every rank does the same on its partition of each increment.

    Resume at an increment boundary: build a controller with the same arguments, call
    ``prepare_resume(state)``, load the tensors of every replica in ``replicas()`` (models, dense and
    fused optimizers), then ``load_state_dict(state)`` and ``run()``. The state is this rank's.

    Args:
        model: the wrapped dense model (trained in place with an optimizer from ``train``) or its replica
            (under DMP: ``factory.build()``).
        stream: the time-ordered stream.
        train: loop settings (``increment_rows`` is the increment Delta, ``batch_size`` is per rank).
        config: D2S settings and lines.
        factory: builds every other model (snapshots, pruning jobs, serving copies); required under DMP
            (``DMPReplicaFactory``); default: deep copies of ``model`` in one process.
        device: where batches go.
        forward_fn: ``(model, batch) -> (loss, logits)`` of every job.
        rank, world_size: this rank's partition of each increment (default: from the process group when
            initialised, else 0 and 1).

    Raises:
        ValueError: a stream with no increment left to serve after the warm-up.

    Example::

        result = D2SController(wrap(build_dlrm()), SyntheticStream(200_000, drift=2.0), TrainConfig(),
                               D2SConfig(r=4, p=2, lines=("fixed", "fixed_mask"))).run()
        pooled_relative(result.lines["fixed"].records, result.dense, since=result.warmup_rows)
    """

    def __init__(
        self,
        model: nn.Module | Replica,
        stream: Stream,
        train: TrainConfig,
        config: D2SConfig,
        *,
        factory: ReplicaFactory | None = None,
        device: torch.device | str = "cpu",
        forward_fn: ForwardFn = default_forward,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
        )
        self.increments = list(
            iter_increments(
                stream, train.increment_rows, train.batch_size, rank=self.rank, world_size=self.world_size
            )
        )
        if len(self.increments) <= config.first_serving:
            raise ValueError(
                f"the stream has {len(self.increments)} increments of {train.increment_rows} rows but D2S "
                f"warms up for {config.first_serving}; use more rows or smaller increments"
            )
        self.config = config
        self.train = train
        dense, self.factory = _resolve(model, factory, train)
        self.dense = DenseJob(dense, train, config.p, device, factory=self.factory, forward_fn=forward_fn)
        self.pruning = PruningJob(self.factory, train, config.aux, config.prune_fraction, device, forward_fn)
        self.lines = {name: ServingJob(name, train, device, forward_fn) for name in config.lines}
        self._early: set[str] = set()
        self._next = 0  # the next increment to run

    def _due(self, name: str, k: int) -> bool:
        line = self.lines[name]
        if line.current is None:
            return k >= self.config.first_serving
        if name in ("fixed_mask", "adaptation"):
            return False
        age = k - line.current.birth
        return age >= self.config.r or (name in self._early and age >= self.config.minimum_age)

    def _install_due(self, k: int) -> None:
        p = self.config.p
        made: SparseModel | None = None
        for name, line in self.lines.items():
            if not self._due(name, k):
                continue
            snapshot, data = self.dense.snapshot(k - p), self.increments[k - p : k]
            if name == "adaptation":
                sparse = self.pruning.run(snapshot, data, birth=k, adapt=True)
            elif made is None:
                sparse = made = self.pruning.run(snapshot, data, birth=k)
            else:  # every line due at k serves the same pruned model; no line has trained on it yet
                sparse = made.copy(self.factory)
            line.install(sparse)
            self._early.discard(name)

    def run(self, on_increment_end: Callable[[int], None] | None = None) -> D2SResult:
        """Train over the rest of the stream; returns every line's windows and the dense model's.

        Args:
            on_increment_end: called with ``k`` after increment ``k`` (every job done with it), where the
                caller may save ``replicas()`` and ``state_dict()`` to resume from ``k + 1``.
        """
        for increment in tqdm(
            self.increments[self._next :],
            initial=self._next,
            total=len(self.increments),
            desc="d2s",
            unit="increment",
            disable=not self.train.progress or self.rank != 0 or not sys.stderr.isatty(),
            dynamic_ncols=True,
        ):
            k = increment.index
            self._install_due(k)
            dense_scores = self.dense.train(increment)
            dense_ce = dense_scores.ce()
            for name, line in self.lines.items():
                if line.current is None:
                    line.stand_in(dense_scores)
                    continue
                gap = line.serve(increment).ce() / dense_ce - 1.0
                line.gaps.append((k, gap))
                if name == "adaptive" and gap > self.config.threshold:
                    self._early.add(name)
            self._next = k + 1
            if on_increment_end is not None:
                on_increment_end(k)
        self.dense.finish()
        for line in self.lines.values():
            line.finish()
        return self._result()

    # ----------------------------------------------------------------------------------------------
    def replicas(self) -> dict[str, Replica]:
        """Every live model with its optimizers, by name: ``dense``, ``snapshot.<k>``, ``line.<name>``."""
        out = {"dense": self.dense.replica}
        out |= {f"snapshot.{k}": s.replica for k, s in sorted(self.dense.snapshots.items())}
        out |= {
            f"line.{n}": line.current.replica for n, line in self.lines.items() if line.current is not None
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything but the replicas' tensors: next increment, timelines, windows, trainer and AUX state.

        Plain Python values and small CPU tensors; valid between increments (e.g. in ``on_increment_end``).
        """
        return {
            "next": self._next,
            "early": sorted(self._early),
            "dense": self.dense.state_dict(),
            "lines": {name: line.state_dict() for name, line in self.lines.items()},
        }

    def prepare_resume(self, state: dict[str, Any]) -> None:
        """Build the replicas ``state`` refers to (snapshots, serving models), so that the caller can load
        their tensors into ``replicas()`` before ``load_state_dict(state)``. Collective under DMP.

        Raises:
            ValueError: the state's lines are not this controller's.
        """
        if list(state["lines"]) != list(self.lines):
            raise ValueError(
                f"the state has lines {list(state['lines'])}, this controller {list(self.lines)}"
            )
        self.dense.prepare_resume(state["dense"])
        for name, line in self.lines.items():
            births = state["lines"][name]["births"]
            if line.current is not None or not births:
                continue
            replica = self.factory.build()
            birth = Birth.from_dict(births[-1])
            hooks: list[TrainHook] = []
            if name == "adaptation":
                steps = self.pruning.phase_steps(self.increments[birth.birth - self.config.p : birth.birth])
                hooks = [self.pruning.adaptation_pruner(replica.model, steps)]
            line.install(SparseModel(replica, hooks=hooks, **vars(birth)))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` after ``prepare_resume`` (and loading the replicas); ``run`` goes on."""
        self.dense.load_state_dict(state["dense"])
        for name, line in self.lines.items():
            line.load_state_dict(state["lines"][name])
        self._early = set(state["early"])
        self._next = state["next"]

    def _result(self) -> D2SResult:
        lines = {}
        for name, line in self.lines.items():
            pruning = FlopsTotals()
            for sparse in line.births:
                pruning = pruning + sparse.flops
            lines[name] = LineResult(
                name=name,
                records=line.records,
                history=line.history,
                births=[s.birth for s in line.births],
                sources=[s.source for s in line.births],
                sparsity=[s.sparsity for s in line.births],
                gaps=line.gaps,
                serving_flops=line.flops,
                pruning_flops=pruning,
                serving_seconds=line.seconds,
                pruning_seconds=sum(s.seconds for s in line.births),
            )
        warmup = self.increments[self.config.first_serving].start_row
        return D2SResult(self.dense.records, lines, warmup, self.dense.flops, self.dense.seconds)
