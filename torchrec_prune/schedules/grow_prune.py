"""Alternate grow/prune and its baselines as one trainer hook (SPEC 5, growth paper sections III-IV).

Entering a sparse phase prunes, in every neuron-prunable layer, the ``beta`` fraction of neurons with the
lowest Taylor importance averaged over the ``window_steps`` batches just before the phase. Leaving it
re-opens them at exactly zero with fresh optimizer state (``grow_neurons``; ``regrown_state`` picks SPEC
3's reset or the layer's mean for accumulators). While a sparse phase runs, its layers train their kept
blocks only (``compact``, on by default): the same numbers as the masked forward,
at the cost of a model of the kept sizes. A plan that starts sparse
(grow-only) has no trained model to score, so its first mask is drawn at random (seeded): at
initialisation the weights are random and Taylor scores rank neurons by noise, and a random small
network is the seed that growth-only schemes start from.

Mask changes happen between batches, never inside one: ``before_batch`` applies the change due at a
batch before the trainer runs the model on it. So the look-ahead score, the
gradients, the optimizer step and the FLOPs booked for every batch (under ``ctx.phase``, one label per
phase) all see the same masks, and the FLOPs of the run equal the sum over phases of samples times
per-sample FLOPs. ``before_batch`` also starts a clock that ``after_step`` stops: the time of forward,
backward, hooks and optimizer step, per phase, which is where the compacted forward of ``MaskedLinear``
shows its real (not only counted) saving.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch

from torchrec_prune.data.stream import Stream
from torchrec_prune.importance.neuron import NeuronTaylor
from torchrec_prune.importance.state import check_keys, check_shapes
from torchrec_prune.masks.compact import compact_, expand_
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.pruners.structured import grow_neurons, neuron_successors, prune_neurons
from torchrec_prune.pruners.targets import Targets
from torchrec_prune.schedules.phases import SPARSE, PhasePlan, batch_starts
from torchrec_prune.train.flops import FlopsReport, FlopsTotals, fc_flops, integrate_phases
from torchrec_prune.train.hooks import BaseHook, StepContext
from torchrec_prune.train.optimizer_state import check_regrown_state
from torchrec_prune.train.trainer import (
    IncrementalTrainer,
    RunResult,
    TrainConfig,
    default_forward,
    make_optimizer,
)


@dataclass
class GrowPruneConfig:
    """A grow/prune schedule.

    Args:
        plan: dense and sparse phases as fractions of the stream.
        beta: fraction of neurons pruned in every selected layer during sparse phases, in (0, 1).
        window_steps: batches before a sparse phase over which neuron importance is averaged (>= 1); a
            shorter preceding dense phase gives a shorter window.
        seed: seed of the random first mask of a plan that starts sparse.
        targets: candidate layers; only layers whose neurons can be pruned (see ``neuron_successors``) are
            used, never the output layer.
        compact: train sparse phases on physically smaller layers (``torchrec_prune.masks.compact``);
            off, the masked forward gathers the kept block every step (same results, slower).
        regrown_state: optimizer state of regrown entries (``regrow_state_``). ``"reset"`` (SPEC 3):
            accumulators at their initial value, so a regrown weight's first Adagrad step is about ``lr``
            long; ``"layer_mean"``: accumulators at the mean over the layer's entries that stayed open,
            which removed the loss blow-ups after regrowth (docs/results/fidelity_regrow_state.md).
            Momentum and first moments restart at 0 under both. The asynchronous parameter server regrows
            as SPEC 3.
    """

    plan: PhasePlan
    beta: float = 0.7
    window_steps: int = 50
    seed: int = 0
    targets: Targets = field(default_factory=Targets)
    compact: bool = True
    regrown_state: str = "reset"

    def __post_init__(self) -> None:
        check_regrown_state("GrowPruneConfig.regrown_state", self.regrown_state)
        if not isinstance(self.compact, bool):
            raise ValueError(f"GrowPruneConfig.compact must be a bool, got {self.compact!r}")
        if not isinstance(self.plan, PhasePlan):
            raise ValueError(f"GrowPruneConfig.plan must be a PhasePlan, got {type(self.plan).__name__}")
        if isinstance(self.beta, bool) or not (isinstance(self.beta, (int, float)) and 0 < self.beta < 1):
            raise ValueError(f"GrowPruneConfig.beta must be in (0, 1), got {self.beta!r}")
        for name in ("window_steps", "seed"):
            value, low = getattr(self, name), 1 if name == "window_steps" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"GrowPruneConfig.{name} must be an integer >= {low}, got {value!r}")


@dataclass
class PhaseRecord:
    """What one phase planned and what it measured.

    Args:
        label: FLOPs booking label (``dense0``, ``sparse1``, ...).
        kind: ``dense`` or ``sparse``.
        start, end: planned stream positions ``[start, end)``.
        report: per-sample FLOPs of the masks the phase trained with.
        steps: batches trained in the phase.
        seconds: wall time of those steps (forward, backward, hooks, optimizer step).
        cpu_seconds: CPU time of this process over the same steps (less sensitive to other jobs sharing
            the cores than wall time).
        transition_seconds: time spent pruning or growing at the phase start.
        neurons_kept: kept neurons per pruned layer while the phase ran.
    """

    label: str
    kind: str
    start: int
    end: int
    report: FlopsReport
    steps: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    transition_seconds: float = 0.0
    neurons_kept: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.end - self.start

    @property
    def fc_params(self) -> int:
        """Weights and biases of the fully connected layers still open."""
        return sum(
            layer.kept_weights + (layer.active_out if layer.bias else 0) for layer in self.report.layers
        )

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")

    def summary(self) -> dict[str, object]:
        """The phase as plain values, for JSON outputs."""
        return {
            "label": self.label,
            "start": self.start,
            "end": self.end,
            "steps": self.steps,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "training_flops_per_sample": self.report.training,
            "fc_params": self.fc_params,
        }


class GrowPruneSchedule(BaseHook):
    """Run a ``PhasePlan`` on a model: prune by Taylor importance entering sparse phases, regrow leaving them.

    Args:
        model: the wrapped model.
        config: plan, beta, importance window.
        optimizers: the optimizers whose state prune and grow reset.
        num_rows: rows of the stream the trainer will read.
        train: the loop settings (batch size and increment size fix where phases can switch).
        world_size: ranks reading the stream together.

    Raises:
        ValueError: no layer of ``model`` selected by ``config.targets`` can be neuron-pruned, or a phase
            that is empty at this stream length.

    Example::

        optimizer = make_optimizer(model.parameters(), train)
        schedule = GrowPruneSchedule(model, GrowPruneConfig(PhasePlan.every(0.2)), [optimizer],
                                     num_rows=stream.num_rows, train=train)
        IncrementalTrainer(model, train, optimizers=[optimizer], hooks=[schedule]).run(stream)
    """

    def __init__(
        self,
        model: nn.Module,
        config: GrowPruneConfig,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        num_rows: int,
        train: TrainConfig,
        world_size: int = 1,
    ) -> None:
        modules = dict(model.named_modules())
        successors = neuron_successors(model, config.targets.output_layer)
        self.layers: dict[str, MaskedLinear] = {
            fqn: modules[fqn] for fqn in sorted(successors) if config.targets.selects(fqn)
        }
        if not self.layers:
            raise ValueError(
                f"GrowPruneSchedule: no neuron-prunable layer matches include={config.targets.include} "
                f"exclude={config.targets.exclude}"
            )
        self.model = model
        self.config = config
        self.optimizers = list(optimizers)
        self.global_batch = train.batch_size * world_size
        self.world_size = world_size
        self.bounds = config.plan.sample_bounds(num_rows, train.increment_rows, self.global_batch)
        starts = batch_starts(num_rows, train.increment_rows, self.global_batch)
        # Importance of a sparse phase is averaged over the window_steps batches right before it.
        self._window_starts = [
            starts[max(0, starts.index(start) - config.window_steps)] for start, _ in self.bounds
        ]
        self.scorer = NeuronTaylor()
        self.phases: list[PhaseRecord] = []
        self._batch_start = 0  # stream position of the current batch
        self._clock: tuple[float, float] | None = None
        self._compacted = False

    # --------------------------------------------------------------------------------------------
    def before_batch(self, ctx: StepContext) -> None:
        """Enter the phase this batch belongs to (pruning or growing) and start the step clock."""
        assert ctx.batch is not None
        self._batch_start = ctx.position
        while len(self.phases) < len(self.bounds) and self._batch_start >= self.bounds[len(self.phases)][0]:
            self._enter(len(self.phases))
        if self.config.compact and not self._compacted and self.phases[-1].kind == SPARSE:
            started = time.perf_counter()  # entering the phase, or resuming inside it
            compact_(self.model, self.optimizers)
            self._compacted = True
            self.phases[-1].transition_seconds += time.perf_counter() - started
        self._clock = (time.perf_counter(), time.process_time())

    def before_step(self, ctx: StepContext) -> None:
        ctx.phase = self.phases[-1].label
        if self._in_importance_window():
            self.scorer.observe(self.layers)

    def after_step(self, ctx: StepContext) -> None:
        if self._clock is None:
            return
        phase = self.phases[-1]
        phase.seconds += time.perf_counter() - self._clock[0]
        phase.cpu_seconds += time.process_time() - self._clock[1]
        phase.steps += 1
        self._clock = None

    def state_dict(self) -> dict[str, Any]:
        """Phases entered so far (as plain values, timings included), stream position, the importance
        gathered for the next sparse phase, and the layers' shapes and phase bounds that give them meaning.
        The step clock runs only within a step, so it is not part of it."""
        return {
            "layers": self._layer_shapes(),
            "bounds": [list(bound) for bound in self.bounds],
            "phases": [asdict(phase) for phase in self.phases],
            "batch_start": self._batch_start,
            "scorer": self.scorer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto a fresh schedule of the same configuration, on a model whose weights and masks
        are already restored (no prune or grow is replayed).

        Raises:
            ValueError: a state of other layers, or of another plan or stream length (other phase bounds).
        """
        check_keys("GrowPruneSchedule", state, self.state_dict())
        check_shapes("GrowPruneSchedule", "layers", state["layers"], self._layer_shapes())
        bounds = [tuple(bound) for bound in state["bounds"]]
        if bounds != list(self.bounds):
            raise ValueError(
                f"GrowPruneSchedule state has phase bounds {bounds}, this schedule {self.bounds}: another "
                "plan, stream length or batch size"
            )
        self.phases = [
            PhaseRecord(**{**phase, "report": FlopsReport.from_dict(phase["report"])})
            for phase in state["phases"]
        ]
        self._batch_start = state["batch_start"]
        self.scorer.load_state_dict(state["scorer"])

    def finish(self) -> None:
        """Give compacted layers their full size back (the model then holds what it trained); collective."""
        if self._compacted:
            expand_(self.model)
            self._compacted = False

    def _layer_shapes(self) -> dict[str, list[int]]:
        return {fqn: [layer.out_features, layer.in_features] for fqn, layer in self.layers.items()}

    # --------------------------------------------------------------------------------------------
    def _in_importance_window(self) -> bool:
        """Whether the current batch lies in the last ``window_steps`` batches before a sparse phase."""
        following = len(self.phases)
        if following >= len(self.bounds) or self.config.plan.phases[following].kind != SPARSE:
            return False
        return self._batch_start >= self._window_starts[following]

    def _enter(self, index: int) -> None:
        started = time.perf_counter()
        kind = self.config.plan.phases[index].kind
        kept: dict[str, int] = {}
        if kind == SPARSE:
            importances = (
                self.scorer.scores(self.layers) if self.scorer.batches else self._random_scores(index)
            )
            kept = prune_neurons(self.model, self.config.beta, importances, self.optimizers)
            self.scorer.reset()
        elif index > 0:
            self.finish()
            grow_neurons(
                self.model, self.optimizers, fqns=list(self.layers), regrown_state=self.config.regrown_state
            )
        start, end = self.bounds[index]
        self.phases.append(
            PhaseRecord(
                label=f"{kind}{index}",
                kind=kind,
                start=start,
                end=end,
                report=fc_flops(self.model),
                transition_seconds=time.perf_counter() - started,
                neurons_kept=kept,
            )
        )

    def _random_scores(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        return {
            fqn: torch.rand(layer.out_features, generator=generator) for fqn, layer in self.layers.items()
        }


@dataclass
class GrowPruneResult:
    """A finished schedule run.

    Args:
        name: the plan's name.
        run: the trainer's records and FLOPs.
        phases: per-phase plan, masks and measured time.
        flops_by_phase: FLOPs booked by the trainer's meter under each phase label.
    """

    name: str
    run: RunResult
    phases: list[PhaseRecord]
    flops_by_phase: dict[str | None, FlopsTotals]

    @property
    def seconds(self) -> float:
        """Wall time of all training steps (transitions excluded)."""
        return sum(p.seconds for p in self.phases)

    def planned_flops(self) -> FlopsTotals:
        """The FLOPs integral over the phases: samples x per-sample FLOPs of each phase's masks."""
        return integrate_phases((p.samples, p.report) for p in self.phases)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of all training steps (transitions excluded)."""
        return sum(p.cpu_seconds for p in self.phases)

    def kind_seconds_per_step(self, kind: str, *, cpu: bool = False) -> float:
        """Mean step time (wall, or CPU with ``cpu``) over the phases of ``kind`` (``dense``/``sparse``)."""
        phases = [p for p in self.phases if p.kind == kind]
        steps = sum(p.steps for p in phases)
        seconds = sum(p.cpu_seconds if cpu else p.seconds for p in phases)
        return seconds / steps if steps else float("nan")


def run_grow_prune(
    model: nn.Module,
    stream: Stream,
    train: TrainConfig,
    config: GrowPruneConfig,
    *,
    writer: MetricsWriter | None = None,
    device: torch.device | str = "cpu",
    forward_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]] = default_forward,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
) -> GrowPruneResult:
    """Train ``model`` once over ``stream`` under ``config.plan``; ``PhasePlan.dense()`` is the reference.

    Under a process group every rank calls it with its part of the model (DMP-sharded or replicated):
    phase bounds are laid out over the global batches of all ranks, as the trainer reads them.

    Args:
        model: the wrapped model.
        stream: any ``Stream`` (e.g. a ``BatchStream`` over your own batches).
        train: loop settings.
        config: plan, beta, importance window.
        writer: receives every closed window.
        device: where batches go.
        forward_fn: ``(model, batch) -> (loss, logits)`` for models that are not ``DLRMTrain``-style.
        optimizers: optimizers to step and to reset on prune/grow (under DMP: the dense optimizer from
            ``shard``; the fused table optimizer steps inside the backward); default: one built from
            ``train`` over all parameters.

    Example::

        result = run_grow_prune(wrap(build_dlrm()), SyntheticStream(100_000, drift=1.0), TrainConfig(),
                                GrowPruneConfig(PhasePlan.every(0.2), beta=0.7))
        result.run.flops.saving, result.kind_seconds_per_step("sparse")
    """
    optimizers = list(optimizers) if optimizers is not None else [make_optimizer(model.parameters(), train)]
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    schedule = GrowPruneSchedule(
        model, config, optimizers, num_rows=stream.num_rows, train=train, world_size=world_size
    )
    trainer = IncrementalTrainer(
        model,
        train,
        optimizers=optimizers,
        hooks=[schedule],
        writer=writer,
        device=device,
        forward_fn=forward_fn,
    )
    run = trainer.run(stream)
    schedule.finish()
    return GrowPruneResult(config.plan.name, run, schedule.phases, trainer.flops.phase_totals())
