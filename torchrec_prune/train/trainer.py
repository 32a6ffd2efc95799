"""The incremental trainer: one pass over a time-ordered stream, every batch scored before it is learned.

The same loop runs in one process and on every torchrun rank under DMP; metrics are all-reduced by
``LookAheadWindow``, so the definitions are identical. Pruners and schedules plug in as ``TrainHook``s.

The trainer is ``Stateful``: ``state_dict()`` holds its counters, its position in the stream (increment
and batches done in it), the open look-ahead window, the FLOPs meter, the closed windows, every hook's
state and the RNG states. After ``load_state_dict`` (on a model whose weights, masks and optimizer state
were restored), ``run`` skips what was trained and continues with the next batch, so a resumed run
trains on exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_prune.data.stream import Increment, Stream, iter_increments
from torchrec_prune.metrics.window import LookAheadWindow, WindowRecord
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.train.flops import FlopsMeter, FlopsTotals
from torchrec_prune.train.hooks import StepContext, TrainHook
from torchrec_prune.train.rng import rng_state, set_rng_state

logger = logging.getLogger(__name__)
OPTIMIZERS = ("sgd", "adagrad")
PROGRESS_SECONDS = 30.0  # one progress line this often when stderr is not a terminal


class NonFiniteError(RuntimeError):
    """The loss or the model became NaN or inf: training stopped before anything more was saved."""


@dataclass
class TrainConfig:
    """Knobs of the incremental loop, validated at construction.

    Args:
        batch_size: rows per batch on each rank.
        lr: learning rate of the dense optimizer and of the fused table optimizer.
        optimizer: ``adagrad`` (default) or ``sgd``. A fresh DLRM's embeddings start at +-1/sqrt(N) and
            reach the top MLP only through dot products; plain SGD barely moves them in a single pass of
            a few 100k rows (NE stays ~1.0 on the synthetic stream and the Criteo head), Adagrad does.
        momentum: SGD momentum of the dense layers (the jobs' tables train with the fused kernel's exact
            SGD, which has none).
        window: look-ahead window size in global samples.
        increment_rows: rows per increment (a chunk of the stream; hooks fire at each boundary).
        progress: show progress (rank 0 only): a tqdm bar on a terminal, else a logged line every
            ``PROGRESS_SECONDS`` (a bar redrawn into a log file is megabytes of noise).
    """

    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "adagrad"
    momentum: float = 0.0
    window: int = 5_000
    increment_rows: int = 20_000
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "window", "increment_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr (--lr) must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(
                f"TrainConfig.momentum (--momentum) applies to --optimizer sgd only, not {self.optimizer!r}"
            )


def make_optimizer(
    params: Iterable[nn.Parameter], config: TrainConfig, *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """The dense optimizer named by ``config`` (SGD or Adagrad); ``fused=True`` updates every tensor in one
    kernel (torch's default, ``None``, loops over tensors on CPU)."""
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=config.lr, fused=fused)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, fused=fused)


def default_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits of a TorchRec ``DLRMTrain``-style model: ``model(batch) -> (loss, (_, logits, _))``."""
    loss, (_, logits, _) = model(batch)
    return loss, logits.detach().reshape(-1)


@dataclass
class RunResult:
    """What a run produced: closed look-ahead windows and the FLOPs integral.

    ``wall_seconds`` covers this process's training (after a resume: since the resume);
    ``resume_seconds`` the time to load the run checkpoint it resumed from (``None``: fresh start);
    ``checkpoint_seconds`` the time this process spent writing run checkpoints.
    """

    records: list[WindowRecord] = field(default_factory=list)
    samples: int = 0
    steps: int = 0
    flops: FlopsTotals = field(default_factory=FlopsTotals)
    wall_seconds: float = 0.0
    resume_seconds: float | None = None
    checkpoint_seconds: float = 0.0


class IncrementalTrainer:
    """Train ``model`` on a stream in time order, one increment at a time.

    Args:
        model: a wrapped TorchRec model (DMP-sharded or not) whose forward follows ``forward_fn``.
        config: loop settings.
        optimizers: optimizers to step (default: one built from ``config`` over all parameters).
            Under DMP pass the dense optimizer and the model's fused optimizer.
        hooks: pruners and schedules, called in order.
        writer: where window records go (JSON lines + CSV), or ``None``.
        device: where batches are moved.
        forward_fn: ``(model, batch) -> (loss, logits)``.
        process_group: for metric all-reduce (default: the world when initialised).
        checkpoint_every: call ``on_checkpoint`` each time training passes a multiple of this many global
            stream positions (0: never). Checkpoints fall between batches, and after ``on_increment_end``
            when the due batch is the last of an increment, so a resume never replays a hook.
        on_checkpoint: ``(trainer) -> None``, saves the run (see ``torchrec_prune.train.job``).

    Example::

        trainer = IncrementalTrainer(wrap(build_dlrm()), TrainConfig())
        result = trainer.run(SyntheticStream(50_000, drift=1.0))
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
        hooks: Sequence[TrainHook] = (),
        writer: MetricsWriter | None = None,
        device: torch.device | str = "cpu",
        forward_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]] = default_forward,
        process_group: dist.ProcessGroup | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[IncrementalTrainer], None] | None = None,
    ) -> None:
        if isinstance(checkpoint_every, bool) or not (
            isinstance(checkpoint_every, int) and checkpoint_every >= 0
        ):
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {checkpoint_every!r}")
        self.model = model
        self.config = config
        self.optimizers = (
            list(optimizers) if optimizers is not None else [make_optimizer(model.parameters(), config)]
        )
        self.hooks = list(hooks)
        self.writer = writer
        self.device = torch.device(device)
        self.forward_fn = forward_fn
        # Batches hold at most batch_size rows per rank, so window sizes are exchanged once per window.
        self.window = LookAheadWindow(config.window, process_group=process_group, max_batch=config.batch_size)
        self.flops = FlopsMeter()
        self.world_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self.ctx = StepContext(model=model, optimizers=self.optimizers)
        self.result = RunResult()
        self.checkpoint_every = checkpoint_every
        self.on_checkpoint = on_checkpoint
        self._next_checkpoint = checkpoint_every
        self._resume_at = (0, 0)  # (increment index, batches of it already trained)
        self._batches_done = 0

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but model and optimizer tensors needed to continue exactly here (this rank's view)."""
        return {
            "step": self.ctx.step,
            "samples_seen": self.ctx.samples_seen,
            "resume_at": self.resume_position,
            "next_checkpoint": self._next_checkpoint,
            "window": self.window.state_dict(),
            "flops": self.flops.state_dict(),
            "records": [asdict(r) for r in self.result.records],
            "hooks": [hook.state_dict() for hook in self.hooks],
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the next ``run`` continues after the last trained batch.

        Raises:
            ValueError: the state holds another number of hooks than this trainer has.
        """
        if len(state["hooks"]) != len(self.hooks):
            raise ValueError(
                f"trainer state has {len(state['hooks'])} hook states, this trainer has {len(self.hooks)} "
                f"hooks ({', '.join(type(h).__name__ for h in self.hooks) or 'none'})"
            )
        self.ctx.step = state["step"]
        self.ctx.samples_seen = state["samples_seen"]
        self._resume_at = tuple(state["resume_at"])
        self.ctx.increment = self._resume_at[0]
        self._next_checkpoint = state["next_checkpoint"]
        self.window.load_state_dict(state["window"])
        self.flops.load_state_dict(state["flops"])
        self.result.records = [WindowRecord(**r) for r in state["records"]]
        for hook, hook_state in zip(self.hooks, state["hooks"], strict=True):
            hook.load_state_dict(hook_state)
        set_rng_state(state["rng"])
        self._record([])

    @property
    def resume_position(self) -> tuple[int, int]:
        """``(increment index, batches of it trained)``: where a run resumed from this state starts."""
        return self.ctx.increment, self._batches_done

    # ----------------------------------------------------------------------------------------------
    def step(self, batch: Batch) -> list[WindowRecord]:
        """Score ``batch`` (look-ahead), then learn from it; returns windows closed by this batch."""
        batch = self._on_device(batch)
        self.ctx.batch = batch
        for hook in self.hooks:
            hook.before_batch(self.ctx)
        if not self.model.training:  # train() walks every module: ~5% of a fused-table step
            self.model.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, logits = self.forward_fn(self.model, batch)
        flops = self.flops.after_forward(self.model)  # the masks this forward used
        if not math.isfinite(loss.item()):  # before backward: the step that would spread it never runs
            raise NonFiniteError(
                f"loss is {loss.item()} at step {self.ctx.step}, look-ahead window {len(self.result.records)}"
                f" (stream row {self.ctx.position}): lower --lr"
            )
        closed = self.window.update(logits, batch.labels)
        loss.backward()
        self.ctx.loss = loss.detach()
        for hook in self.hooks:
            hook.before_step(self.ctx)
        for optimizer in self.optimizers:
            optimizer.step()
        for hook in self.hooks:
            hook.after_step(self.ctx)
        global_samples = batch.labels.numel() * self.world_size
        self.flops.add_at(flops, global_samples, phase=self.ctx.phase)
        self.ctx.step += 1
        self.ctx.samples_seen += global_samples
        self.ctx.position += global_samples  # exact positions come from train_increment
        self._record(closed)
        return closed

    @torch.no_grad()
    def score(self, batch: Batch) -> list[WindowRecord]:
        """Score ``batch`` into the look-ahead window without learning from it (a frozen model)."""
        batch = self._on_device(batch)
        _, logits = self.forward_fn(self.model, batch)
        closed = self.window.update(logits, batch.labels)
        self.ctx.samples_seen += batch.labels.numel() * self.world_size
        self._record(closed)
        return closed

    def _on_device(self, batch: Batch) -> Batch:
        """``batch`` on ``self.device``; as it is when it is there already (``to`` would rebuild the
        batch and its KJT, ~10 us a step)."""
        device = self.device
        there = batch.dense_features.device == device and batch.labels.device == device
        return batch if there and batch.sparse_features.device() == device else batch.to(device)

    def score_increment(self, increment: Increment) -> list[WindowRecord]:
        """Score every batch of ``increment`` without training (no hooks fire)."""
        closed: list[WindowRecord] = []
        for batch in increment.batches():
            closed += self.score(batch)
        return closed

    def train_increment(self, increment: Increment, *, skip_batches: int = 0) -> list[WindowRecord]:
        """Train on every batch of ``increment`` (after the first ``skip_batches`` global batches, already
        trained before a resume), then fire ``on_increment_end``."""
        self.ctx.increment = increment.index
        global_batch = increment.batch_size * increment.world_size
        end = increment.start_row + increment.num_rows
        start = min(end, increment.start_row + skip_batches * global_batch)
        rest = replace(increment, start_row=start, num_rows=end - start)
        self._batches_done = skip_batches
        closed: list[WindowRecord] = []
        batches = rest.batches()
        total = rest.num_batches
        for i, batch in enumerate(batches):
            batch_start = self.ctx.position = start + i * global_batch
            closed += self.step(batch)
            self._batches_done += 1
            if self._bar is not None:
                self._bar.update(min(global_batch, end - batch_start))
                if closed:
                    self._bar.set_postfix(ce=f"{closed[-1].ce:.4f}", ne=f"{closed[-1].ne:.3f}")
            if self._log_at is not None and time.monotonic() >= self._log_at:
                self._log_progress(min(end, batch_start + global_batch))
            if i + 1 < total:
                self._maybe_checkpoint(start + (i + 1) * global_batch)
        for hook in self.hooks:
            hook.on_increment_end(self.ctx)
        self.ctx.increment, self._batches_done = increment.index + 1, 0
        self._maybe_checkpoint(end)
        return closed

    def _maybe_checkpoint(self, position: int) -> None:
        if not self.checkpoint_every or position < self._next_checkpoint:
            return
        while self._next_checkpoint <= position:
            self._next_checkpoint += self.checkpoint_every
        if self.on_checkpoint is not None:
            self.on_checkpoint(self)

    def run(self, stream: Stream) -> RunResult:
        """One pass over ``stream``, in increments."""
        show = self.config.progress and self.rank == 0
        terminal = sys.stderr.isatty()
        first, skip = self._resume_at
        done = min(stream.num_rows, first * self.config.increment_rows)
        self._total = stream.num_rows
        self._log_at = time.monotonic() + PROGRESS_SECONDS if show and not terminal else None
        self._bar = tqdm(
            total=stream.num_rows,
            initial=done,
            unit="rows",
            desc="train",
            disable=not (show and terminal),
            dynamic_ncols=True,
        )
        try:
            for increment in iter_increments(
                stream,
                self.config.increment_rows,
                self.config.batch_size,
                rank=self.rank,
                world_size=self.world_size,
            ):
                if increment.index >= first:
                    self.train_increment(increment, skip_batches=skip if increment.index == first else 0)
            last = self.window.flush()
            if last is not None:
                self._record([last])
        finally:
            self._bar.close()
            self._bar = None
        return self.result

    _bar: tqdm | None = None
    _log_at: float | None = None  # when the next progress line is due (None: no progress lines)
    _total = 0

    def _log_progress(self, done: int) -> None:
        self._log_at = time.monotonic() + PROGRESS_SECONDS
        last = self.result.records[-1] if self.result.records else None
        tail = f", last window CE {last.ce:.4f}" if last is not None else ""
        logger.info("train: row %d of %d (%.0f%%)%s", done, self._total, 100 * done / self._total, tail)

    def _record(self, closed: list[WindowRecord]) -> None:
        self.result.records += closed
        self.result.samples = self.ctx.samples_seen
        self.result.steps = self.ctx.step
        self.result.flops = self.flops.totals
        if self.writer is not None and self.rank == 0:
            for record in closed:
                self.writer.write(record)
