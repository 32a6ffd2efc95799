"""Prune a trained model on a stretch of the stream, then train on with the fixed mask (D2S paper 6.1).

The procedure is the same for every method: from ``start_row`` the model trains with a pruner attached
for ``prune_rows`` rows (AUX learns its mask, MP/TP/MoP ramp their sparsity, structured Taylor gathers
neuron importance and prunes once), the mask is then frozen (``finalize``), and incremental training
goes on with it to ``stop_row``. Every batch is scored before it is learned, from the first pruning
batch on, so the look-ahead windows of a pruned run and of the dense model trained on the same rows
(``prune=None``) cover the same samples and compare window by window (``relative_ce``).

``PruneJobConfig``/``prepare_prune_job``/``run_prune_job`` wrap it as a job with a run folder, as the
``torchrec-prune prune`` command runs it: the model is loaded from a checkpoint before anything trains.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_prune.data.stream import Increment, Stream
from torchrec_prune.distributed.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from torchrec_prune.distributed.dmp import dense_optimizer
from torchrec_prune.distributed.fused_tables import fuse_tables
from torchrec_prune.distributed.run_checkpoint import (
    CheckpointInfo,
    find_run_checkpoint,
    load_into_one_process,
)
from torchrec_prune.importance.weight import check_weights
from torchrec_prune.masks import wrap
from torchrec_prune.masks.report import LayerSparsity, format_report, sparsity_report
from torchrec_prune.metrics.window import WindowRecord
from torchrec_prune.metrics.writer import MetricsWriter, write_text_atomic
from torchrec_prune.models import build_dlrm
from torchrec_prune.numerics import enable_ftz_daz
from torchrec_prune.plots import plot_window_metric
from torchrec_prune.pruners.aux import AuxConfig, AuxPruner
from torchrec_prune.pruners.base import LayerStats, PrunerBase, overall_sparsity
from torchrec_prune.pruners.gradual import GradualConfig, magnitude_pruner, momentum_pruner, taylor_pruner
from torchrec_prune.pruners.rules import check_sparsity
from torchrec_prune.pruners.schedules import check_steps
from torchrec_prune.pruners.structured import NeuronPruner, StructuredConfig, check_beta
from torchrec_prune.pruners.targets import Targets
from torchrec_prune.train.flops import FlopsTotals
from torchrec_prune.train.job import RUN_MARKERS, JobConfig, make_stream, model_config_for, sharding_config
from torchrec_prune.train.replica import Replica
from torchrec_prune.train.trainer import (
    IncrementalTrainer,
    TrainConfig,
    default_forward,
    make_optimizer,
)

logger = logging.getLogger(__name__)
METHODS = ("aux", "mp", "tp", "mop", "taylor-neuron")


@dataclass
class PruneConfig:
    """One pruning phase.

    Args:
        method: ``aux`` (learned per-layer sparsity, set by ``lam``), ``mp``/``tp``/``mop`` (gradual
            magnitude / Taylor / momentum pruning to ``sparsity`` in every layer) or ``taylor-neuron``
            (structured: prune the fraction ``beta`` of neurons of every prunable layer).
        lam: AUX sparsity penalty lambda (>= 0).
        sparsity: MP/TP/MoP target fraction of pruned weights per layer, in [0, 1).
        beta: fraction of neurons pruned by ``taylor-neuron``, in (0, 1).
        prune_rows: rows of the pruning phase (>= 1); its batches set the phase length in steps.
        eps: AUX step of the latent scores (> 0); ``None`` (default) derives it from AUX's latent
            budget as ``budget / phase steps``, so lambda's sparsity does not depend on the phase length.
        w1: weight of the Taylor term (AUX) or of the magnitude term (MoP), >= 0.
        w2: weight of the magnitude term (AUX) or of the momentum term (MoP), >= 0.
        update_every: steps between mask updates of the MP/TP/MoP ramp (>= 1).
        targets: which Linears are pruned (default: all but the output layer).
    """

    method: str
    lam: float = 1.75
    sparsity: float = 0.8
    beta: float = 0.5
    prune_rows: int = 20_000
    eps: float | None = None
    w1: float = 0.5
    w2: float = 0.5
    update_every: int = 1
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"PruneConfig.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise ValueError(f"PruneConfig.lam (lambda) must be >= 0, got {self.lam!r}")
        check_sparsity("PruneConfig", "sparsity", self.sparsity)
        check_beta("PruneConfig", self.beta)
        check_steps("PruneConfig", "prune_rows", self.prune_rows)
        check_steps("PruneConfig", "update_every", self.update_every)
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"PruneConfig.eps must be > 0, got {self.eps!r}")
        check_weights("PruneConfig", self.w1, self.w2)

    @property
    def label(self) -> str:
        """Method and its sparsity knob, e.g. ``aux(lam=1.75)`` or ``mp(0.8)``."""
        if self.method == "aux":
            return f"aux(lam={self.lam:g})"
        if self.method == "taylor-neuron":
            return f"taylor-neuron(beta={self.beta:g})"
        return f"{self.method}({self.sparsity:g})"


def make_pruner(model: nn.Module, config: PruneConfig, phase_steps: int) -> PrunerBase:
    """The pruner of ``config.method`` whose phase (ramp, mask learning or importance window) lasts
    ``phase_steps`` training steps."""
    check_steps("make_pruner", "phase_steps", phase_steps)
    if config.method == "aux":
        aux = AuxConfig(
            lam=config.lam,
            w1=config.w1,
            w2=config.w2,
            eps=config.eps,
            phase_steps=phase_steps,
            targets=config.targets,
        )
        return AuxPruner(model, aux)
    if config.method == "taylor-neuron":
        return NeuronPruner(model, StructuredConfig(config.beta, phase_steps, config.targets))
    gradual = GradualConfig(
        sparsity=config.sparsity,
        phase_steps=phase_steps,
        update_every=config.update_every,
        targets=config.targets,
    )
    if config.method == "mp":
        return magnitude_pruner(model, gradual)
    if config.method == "tp":
        return taylor_pruner(model, gradual)
    return momentum_pruner(model, gradual, w1=config.w1, w2=config.w2)


@dataclass
class TrainedState:
    """A trained model's weights and masks with its optimizer's state, captured once so that several runs
    (the dense reference and each pruning method) continue from exactly the same point.

    Example::

        state = TrainedState.capture(model, optimizer)
        copy = wrap(build_dlrm(config))
        optimizer = state.restore(copy, TrainConfig())
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainedState:
        return cls(copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))

    def restore(self, model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        """Load the weights into ``model`` (same architecture) and return its optimizer, built from
        ``train``, holding the captured state."""
        model.load_state_dict(self.model_state)
        optimizer = make_optimizer(model.parameters(), train)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        return optimizer


def stretch_increments(
    stream: Stream, start_row: int, stop_row: int, increment_rows: int, batch_size: int, first_index: int = 0
) -> Iterator[Increment]:
    """Increments of ``increment_rows`` positions covering ``[start_row, stop_row)`` (the last may be
    shorter), read by a single process."""
    for i, start in enumerate(range(start_row, stop_row, increment_rows)):
        yield Increment(
            index=first_index + i,
            start_row=start,
            num_rows=min(increment_rows, stop_row - start),
            stream=stream,
            batch_size=batch_size,
            rank=0,
            world_size=1,
        )


@dataclass
class PruneResult:
    """What a pruned (or dense reference) run over a stretch produced.

    Args:
        records: look-ahead windows from ``start_row`` to ``stop_row`` (the pruning phase included).
        prune_samples: samples of the pruning phase (0 for the dense reference); windows whose
            ``samples_end`` is at most this lie inside it.
        stats: per-layer mask counts of the pruned layers after the phase (empty for dense).
        sparsity: overall sparsity of the pruned Linear weights after the phase (0 for dense).
        phase_steps: training steps of the pruning phase.
        flops: FC-layer training FLOPs integrated over the run.
        wall_seconds: time spent training and scoring.
    """

    records: list[WindowRecord]
    prune_samples: int
    stats: dict[str, LayerStats]
    sparsity: float
    phase_steps: int
    flops: FlopsTotals
    wall_seconds: float


def prune_and_train(
    model: nn.Module,
    stream: Stream,
    train: TrainConfig,
    prune: PruneConfig | None,
    *,
    start_row: int = 0,
    stop_row: int | None = None,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    writer: MetricsWriter | None = None,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    forward_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]] = default_forward,
) -> PruneResult:
    """Prune ``model`` on rows ``[start_row, start_row + prune.prune_rows)``, freeze the mask, and train on
    with it to ``stop_row`` (default: the end of the stream). ``prune=None`` trains the dense model on the
    same rows: the reference that relative CE is measured against. Single process.

    Args:
        model: a wrapped model, already trained (e.g. loaded from a checkpoint).
        stream: the time-ordered stream.
        train: loop settings (batch size, optimizer, window, increment size).
        prune: the pruning phase, or ``None`` for the dense reference.
        start_row: first row of the pruning phase.
        stop_row: end of the run (exclusive); ``start_row + prune_rows`` gives a pruning phase only.
        optimizers: optimizers to continue with (e.g. carrying a pre-trained optimizer state); by default
            a fresh one from ``train``.
        writer: receives every closed window.
        device: where batches go.
        desc: label of the progress bar (shown when ``train.progress``).
        forward_fn: ``(model, batch) -> (loss, logits)`` for models that are not ``DLRMTrain``-style.

    Raises:
        ValueError: the rows do not fit in the stream.

    Example::

        result = prune_and_train(model, stream, TrainConfig(), PruneConfig("aux", lam=1.75),
                                 start_row=100_000)
        print(result.sparsity, result.records[-1].ce)
    """
    stop = stream.num_rows if stop_row is None else stop_row
    prune_stop = start_row + (prune.prune_rows if prune is not None else 0)
    if not 0 <= start_row <= prune_stop <= stop <= stream.num_rows:
        raise ValueError(
            f"rows do not fit the stream of {stream.num_rows} rows: start_row={start_row}, "
            f"pruning to row {prune_stop}, stop_row={stop}; need 0 <= start_row <= "
            "start_row + prune_rows <= stop_row <= stream rows"
        )
    phase_steps = stream.num_batches(train.batch_size, start_row=start_row, num_rows=prune_stop - start_row)
    pruner = make_pruner(model, prune, phase_steps) if prune is not None else None
    trainer = IncrementalTrainer(
        model,
        train,
        optimizers=optimizers,
        hooks=[pruner] if pruner is not None else [],
        writer=writer,
        device=device,
        forward_fn=forward_fn,
    )
    if pruner is None:
        stretches = [(start_row, stop, "dense")]
    else:
        stretches = [(start_row, prune_stop, "prune"), (prune_stop, stop, "sparse")]
    records: list[WindowRecord] = []
    started = time.perf_counter()
    bar = tqdm(
        total=stop - start_row,
        unit="rows",
        desc=desc or "train",
        disable=not train.progress or not sys.stderr.isatty(),  # a bar redrawn into a log file is noise
    )
    index = 0
    try:
        for first, last, phase in stretches:
            trainer.ctx.phase = phase  # FLOPs are booked per phase
            for increment in stretch_increments(
                stream, first, last, train.increment_rows, train.batch_size, index
            ):
                records += trainer.train_increment(increment)
                bar.update(increment.num_rows)
                index += 1
            if phase == "prune" and pruner is not None:
                pruner.finalize(trainer.optimizers)  # no-op when the pruner froze itself at its last step
    finally:
        bar.close()
    flushed = trainer.window.flush()
    if flushed is not None:
        records.append(flushed)
        if writer is not None:
            writer.write(flushed)
    stats = pruner.stats() if pruner is not None else {}
    return PruneResult(
        records=records,
        prune_samples=prune_stop - start_row,
        stats=stats,
        sparsity=overall_sparsity(stats) if stats else 0.0,
        phase_steps=phase_steps if pruner is not None else 0,
        flops=trainer.flops.totals,
        wall_seconds=time.perf_counter() - started,
    )


class LambdaSearch:
    """Find the AUX lambda that gives a target overall sparsity, from pruning phases run on demand.

    Lambda is AUX's only sparsity knob, but the sparsity a lambda gives depends on the model and data, so
    comparing AUX with methods told their sparsity needs lambda calibrated. Sparsity rises with lambda;
    the search works on ``log(lambda)`` against ``log(1 - sparsity)`` (the log density, close to linear
    in it), by regula falsi inside a bracket found by doubling or halving lambda. Every phase run is
    kept, so searching several targets reuses the earlier runs.

    Args:
        sparsity_at: runs a pruning phase with the given lambda and returns its overall sparsity.
        rel_tol: accept a lambda whose density ``1 - sparsity`` is within this relative tolerance of the
            target density (> 0).
        max_runs: new phase runs allowed per target (>= 1).
        start: the first two lambdas tried (> 0, distinct).

    Example::

        search = LambdaSearch(lambda lam: prune_and_train(copy_of_model(), ...).sparsity)
        lam, sparsity = search.find(0.8)
    """

    def __init__(
        self,
        sparsity_at: Callable[[float], float],
        *,
        rel_tol: float = 0.1,
        max_runs: int = 8,
        start: tuple[float, float] = (1.0, 2.0),
    ) -> None:
        if not rel_tol > 0:
            raise ValueError(f"LambdaSearch.rel_tol must be > 0, got {rel_tol!r}")
        check_steps("LambdaSearch", "max_runs", max_runs)
        if not (min(start) > 0 and start[0] != start[1]):
            raise ValueError(f"LambdaSearch.start must be two distinct lambdas > 0, got {start!r}")
        self.sparsity_at = sparsity_at
        self.rel_tol = rel_tol
        self.max_runs = max_runs
        self.start = start
        self.runs: dict[float, float] = {}

    def sparsity(self, lam: float) -> float:
        """Sparsity of a phase with ``lam`` (run once, then remembered)."""
        if lam not in self.runs:
            self.runs[lam] = float(self.sparsity_at(lam))
        return self.runs[lam]

    def find(self, target: float) -> tuple[float, float]:
        """The lambda whose sparsity is closest to ``target`` in log density, and that sparsity."""
        if not 0 < target < 1:
            raise ValueError(f"target sparsity must be in (0, 1), got {target!r}")
        goal = math.log1p(-target)
        tol = math.log1p(self.rel_tol)

        def gap(lam: float) -> float:  # > 0: too dense, lambda too small
            return math.log(max(1.0 - self.runs[lam], 1e-12)) - goal

        budget = len(self.runs) + self.max_runs
        for lam in self.start:
            if len(self.runs) < budget:
                self.sparsity(lam)
        while True:
            best = min(self.runs, key=lambda lam: abs(gap(lam)))
            if abs(gap(best)) <= tol or len(self.runs) >= budget:
                return best, self.runs[best]
            self.sparsity(self._next(gap))

    def _next(self, gap: Callable[[float], float]) -> float:
        dense = [lam for lam in self.runs if gap(lam) > 0]
        sparse = [lam for lam in self.runs if gap(lam) <= 0]
        if not sparse:
            return 2.0 * max(dense)
        hi = min(sparse)
        below = [lam for lam in dense if lam < hi]
        if not below:
            return 0.5 * hi
        lo = max(below)
        x_lo, x_hi = math.log(lo), math.log(hi)
        f_lo, f_hi = gap(lo), gap(hi)
        x = x_lo + (x_hi - x_lo) * f_lo / (f_lo - f_hi)
        margin = 0.05 * (x_hi - x_lo)  # keep clear of the ends, so the bracket shrinks every time
        lam = math.exp(min(max(x, x_lo + margin), x_hi - margin))
        return lam if lam not in self.runs else math.sqrt(lo * hi)


# --------------------------------------------------------------------------------------------------
# As a job with a run folder (the ``prune`` command).


@dataclass
class PruneJobConfig:
    """Prune a checkpointed model on a stream and train on with the fixed mask.

    Args:
        checkpoint: DCP checkpoint of the trained wrapped DLRM (e.g. ``RUN/checkpoint`` of ``train``).
        job: stream, model shape (must match the checkpoint), loop settings, run folder; ``job.checkpoint``
            says whether the pruned model is saved to ``run_dir/checkpoint``.
        prune: method and pruning phase.
        start_row: first row of the pruning phase; fixed-mask training runs from its end to the end of
            the stream.
    """

    checkpoint: str
    job: JobConfig
    prune: PruneConfig
    start_row: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.start_row, int) or self.start_row < 0:
            raise ValueError(f"PruneJobConfig.start_row must be an integer >= 0, got {self.start_row!r}")


@dataclass
class PreparedPruneJob:
    """A prune job whose stream is open and whose model holds the checkpoint: nothing has trained yet.

    The model's tables are fused (``fuse_tables``: their optimizer runs in the backward) and
    ``optimizer`` (``dense_optimizer``) trains the rest; an optimizer over all of ``model.parameters()``
    would step the tables a second time. Both hold the trained optimizer state when the checkpoint is a
    run checkpoint and start fresh from a weights-only one.
    """

    config: PruneJobConfig
    stream: Stream
    model: nn.Module
    optimizer: torch.optim.Optimizer


def prepare_prune_job(config: PruneJobConfig) -> PreparedPruneJob:
    """Open the stream, check the rows fit, build the wrapped DLRM and load the checkpoint into it.

    The job's run folder must not overlap the run folder the checkpoint belongs to (the nearest of the
    checkpoint and the two folders above it holding ``config.json`` or ``summary.json``; else the
    checkpoint itself): writing ``checkpoint/`` or ``config.json`` there would replace the trained model
    it starts from, or mix two runs.

    Raises:
        FileNotFoundError: no stream file or no checkpoint at the path.
        ValueError: the rows do not fit the stream, the checkpoint's keys or shapes differ from the
            model's (one line naming the first differences), the checkpoint is torn or corrupt
            (``CorruptCheckpointError``), or the run folder overlaps the checkpoint's.
    """
    checkpoint, target = Path(config.checkpoint).resolve(), Path(config.job.run_dir).resolve()
    folders = (checkpoint, checkpoint.parent, checkpoint.parent.parent)
    source = next((f for f in folders if any((f / m).is_file() for m in RUN_MARKERS)), checkpoint)
    if source.is_relative_to(target) or target.is_relative_to(source):
        raise ValueError(
            f"--run-dir {config.job.run_dir!r} overlaps the folder of --checkpoint {config.checkpoint!r}: "
            "the pruned run would write over the model it starts from; give another --run-dir"
        )
    run_checkpoint = find_run_checkpoint(config.checkpoint)
    if run_checkpoint is None:
        read_metadata(config.checkpoint)  # a missing checkpoint fails before the stream is read
    stream = make_stream(config.job)
    prune_stop = config.start_row + config.prune.prune_rows
    if prune_stop > stream.num_rows:
        raise ValueError(
            f"start_row + prune_rows = {prune_stop} exceeds the {stream.num_rows} rows of the stream"
        )
    torch.manual_seed(config.job.seed)
    # the tables fused as in the one-process jobs (``FusedReplicaFactory``), with the same optimizers
    sharding = sharding_config(config.job.train)
    model = fuse_tables(wrap(build_dlrm(model_config_for(stream, config.job.model))), sharding)
    try:
        if run_checkpoint is None:
            load_checkpoint(model, config.checkpoint)
            return PreparedPruneJob(config, stream, model, dense_optimizer(model, sharding))
        return _from_run_checkpoint(config, stream, model, run_checkpoint)
    except CheckpointMismatchError as e:
        raise ValueError(e.one_line()) from e


def _from_run_checkpoint(
    config: PruneJobConfig, stream: Stream, model: nn.Module, info: CheckpointInfo
) -> PreparedPruneJob:
    """Weights, masks and optimizer state of the trained model of a run checkpoint (``train``,
    ``grow-prune``: ``model``; ``d2s``: its dense model), written by any number of ranks."""
    saved = info.manifest.get("config", {}).get("train", {}).get("optimizer")
    if saved != config.job.train.optimizer:
        raise ValueError(
            f"--optimizer is {config.job.train.optimizer!r} but the run checkpoint {str(info.path)!r} "
            f"trained with {saved!r}: its optimizer state would not apply"
        )
    name = "model" if "model" in info.manifest.get("replicas", []) else "dense"
    optimizer = dense_optimizer(model, sharding_config(config.job.train))
    missing = load_into_one_process(info, name, Replica(model, [optimizer]))
    if missing:
        logger.info("optimizer state not in %s, left fresh: %s", info.path, ", ".join(missing))
    return PreparedPruneJob(config, stream, model, optimizer)


def write_sparsity_csv(rows: Sequence[LayerSparsity], path: str | Path) -> None:
    """One line per mask kind per mask-aware module: ``fqn, kind, kept, total, sparsity``."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["fqn", "kind", "kept", "total", "sparsity"])
        for r in rows:
            out.writerow([r.fqn, r.kind, r.kept, r.total, f"{r.sparsity:.6f}"])


def run_prune_job(prepared: PreparedPruneJob) -> tuple[PruneResult, str]:
    """Run the job and write its folder: ``config.json``, ``windows.jsonl``/``.csv``, ``sparsity.csv``,
    ``summary.json``, ``window_ce.png`` and (unless disabled) ``checkpoint/``.

    Returns the result and the per-layer sparsity table as text.
    """
    enable_ftz_daz()
    config = prepared.config
    run_dir = Path(config.job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(asdict(config), indent=2))
    with MetricsWriter(run_dir) as writer:
        result = prune_and_train(
            prepared.model,
            prepared.stream,
            config.job.train,
            config.prune,
            start_row=config.start_row,
            optimizers=[prepared.optimizer],
            writer=writer,
            desc=config.prune.label,
        )
    report = sparsity_report(prepared.model)
    write_sparsity_csv(report, run_dir / "sparsity.csv")
    if config.job.checkpoint:
        save_checkpoint(prepared.model, run_dir / "checkpoint")
    records = result.records
    tail = records[-max(1, len(records) // 4) :]
    summary = {
        "method": config.prune.label,
        "pruned_layers_sparsity": result.sparsity,
        "phase_steps": result.phase_steps,
        "prune_samples": result.prune_samples,
        "samples": records[-1].samples_end if records else 0,
        "wall_seconds": result.wall_seconds,
        "last_window_ce": records[-1].ce if records else None,
        "last_quarter_ce": sum(r.ce for r in tail) / len(tail) if records else None,
        "training_flops": result.flops.actual,
        "effective_training_flops": result.flops.effective,
        "dense_training_flops": result.flops.dense,
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    plot_window_metric(
        {config.prune.label: records}, run_dir / "window_ce.png", title=f"{config.job.data}: pruned model"
    )
    return result, format_report(report)
