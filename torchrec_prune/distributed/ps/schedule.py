"""Alternate grow/prune (and its baselines) driven from the driver by global samples consumed.

The phases, their cut points and the importance window are those of ``GrowPruneSchedule`` (same
``PhasePlan.sample_bounds``, the ``window_steps`` global batches before each sparse phase), and masks are
made by the library's ``prune_neurons`` / ``grow_neurons`` on a mask replica of the model: a wrapped model
whose weights are never trained (its tables have 2 rows). Trainers report each batch's neuron Taylor
importance (``NeuronTaylor`` on their own copy); the driver averages those in the window, which is the
rank average the synchronous path all-reduces. The new mask buffers go to every server shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from torchrec_prune.distributed.ps.layout import mask_buffers
from torchrec_prune.pruners.structured import grow_neurons, neuron_successors, prune_neurons
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.schedules.phases import SPARSE, batch_starts
from torchrec_prune.train.flops import fc_flops
from torchrec_prune.train.trainer import TrainConfig


@dataclass
class AsyncPhase:
    """One phase as run: planned bounds, when the driver entered it and the masks' per-sample FLOPs."""

    label: str
    kind: str
    start: int
    end: int
    entered_at_position: int
    mask_version: int
    training_flops_per_sample: float
    neurons_kept: dict[str, int] = field(default_factory=dict)


class AsyncGrowPrune:
    """Decide the masks of a ``PhasePlan`` as the consumed stream position crosses phase boundaries.

    Args:
        replica: a wrapped model of the trained structure (only its masks are used).
        config: plan, beta, importance window, seed of a first random mask.
        num_rows: rows of the stream.
        train: loop settings (per-trainer batch size, increment size).
        world: trainers (the global batch is ``train.batch_size * world``).

    Example::

        config = GrowPruneConfig(PhasePlan.every(0.2))
        schedule = AsyncGrowPrune(replica, config, num_rows=n, train=t, world=2)
        schedule.observe(score.start, score.taylor)
        masks = schedule.advance(collector.position)  # None, or mask buffers for the server
    """

    def __init__(
        self, replica: nn.Module, config: GrowPruneConfig, *, num_rows: int, train: TrainConfig, world: int
    ) -> None:
        modules = dict(replica.named_modules())
        self.layers = {fqn: modules[fqn] for fqn in self.prunable(replica, config)}
        self.replica = replica
        self.config = config
        global_batch = train.batch_size * world
        self.bounds = config.plan.sample_bounds(num_rows, train.increment_rows, global_batch)
        starts = batch_starts(num_rows, train.increment_rows, global_batch)
        self._window_starts = [
            starts[max(0, starts.index(start) - config.window_steps)] for start, _ in self.bounds
        ]
        self._sums: dict[str, np.ndarray] = {}
        self._batches = 0
        self.phases: list[AsyncPhase] = []
        self.mask_version = 0

    @staticmethod
    def prunable(model: nn.Module, config: GrowPruneConfig) -> list[str]:
        """FQNs of the layers the schedule prunes (as ``GrowPruneSchedule`` selects them)."""
        successors = neuron_successors(model, config.targets.output_layer)
        layers = [fqn for fqn in sorted(successors) if config.targets.selects(fqn)]
        if not layers:
            raise ValueError("AsyncGrowPrune: no neuron-prunable layer is selected")
        return layers

    def observe(self, start: int, taylor: dict[str, np.ndarray]) -> None:
        """Add one batch's importance if the batch lies in the window before the next sparse phase.

        Importance is per trainer batch; the synchronous path averages per rank-batch, the same unit.
        """
        following = len(self.phases)
        if following >= len(self.bounds) or self.config.plan.phases[following].kind != SPARSE:
            return
        if not (self._window_starts[following] <= start < self.bounds[following][0]) or not taylor:
            return
        for fqn in self.layers:
            self._sums[fqn] = self._sums.get(fqn, 0.0) + taylor[fqn]
        self._batches += 1

    def advance(self, position: int) -> dict[str, np.ndarray] | None:
        """Enter every phase that starts at or before ``position``; returns new masks when they changed."""
        changed = False
        while len(self.phases) < len(self.bounds) and position >= self.bounds[len(self.phases)][0]:
            changed |= self._enter(len(self.phases), position)
        if not changed:
            return None
        return {name: buf.numpy().copy() for name, buf in mask_buffers(self.replica).items()}

    def _enter(self, index: int, position: int) -> bool:
        kind = self.config.plan.phases[index].kind
        kept: dict[str, int] = {}
        changed = False
        if kind == SPARSE:
            if self._batches:
                importances = {fqn: torch.from_numpy(s / self._batches) for fqn, s in self._sums.items()}
            else:
                importances = self._random_scores(index)
            kept = prune_neurons(self.replica, self.config.beta, importances)
            self._sums, self._batches = {}, 0
            changed = True
        elif index > 0:
            grow_neurons(self.replica, fqns=list(self.layers))
            changed = True
        self.mask_version += changed
        start, end = self.bounds[index]
        self.phases.append(
            AsyncPhase(
                label=f"{kind}{index}",
                kind=kind,
                start=start,
                end=end,
                entered_at_position=position,
                mask_version=self.mask_version,
                training_flops_per_sample=fc_flops(self.replica).training,
                neurons_kept=kept,
            )
        )
        return changed

    def state_dict(self) -> dict[str, Any]:
        """Phases entered, the importance sums of the open window and the replica's masks."""
        return {
            "sums": dict(self._sums),
            "batches": self._batches,
            "phases": list(self.phases),
            "mask_version": self.mask_version,
            "masks": {name: buf.clone() for name, buf in mask_buffers(self.replica).items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = dict(state["sums"])
        self._batches = int(state["batches"])
        self.phases = list(state["phases"])
        self.mask_version = int(state["mask_version"])
        buffers = mask_buffers(self.replica)
        for name, value in state["masks"].items():
            buffers[name].copy_(value)

    def _random_scores(self, index: int) -> dict[str, torch.Tensor]:
        # The same seeded draw as GrowPruneSchedule's first mask of a plan that starts sparse.
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        return {
            fqn: torch.rand(layer.out_features, generator=generator) for fqn, layer in self.layers.items()
        }
