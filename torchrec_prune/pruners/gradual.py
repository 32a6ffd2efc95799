"""Gradual baselines MP, TP and MoP (SPEC 4, D2S paper section 6).

Sparsity rises linearly from 0 to the target over the pruning phase, with the same sparsity in every
layer, each layer reaching it exactly. Masks change through ``set_masks_``: closed weights become exact
zeros and any weight selected again (MoP) re-opens at zero, with fresh optimizer state either way. After
the phase the mask is frozen, except in MoP's adaptation variant, which re-selects every n samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchrec_prune.importance.embedding import ColumnMagnitude, ColumnScorer, ColumnTaylor
from torchrec_prune.importance.weight import Magnitude, Momentum, Taylor, WeightScorer
from torchrec_prune.masks.surgery import set_masks_
from torchrec_prune.pruners.base import OptimizersArg, PrunerBase, optimizers_of
from torchrec_prune.pruners.rules import TopK, check_sparsity
from torchrec_prune.pruners.schedules import LinearRamp, Schedule, check_steps
from torchrec_prune.pruners.targets import Targets, select_embeddings, select_linears
from torchrec_prune.train.hooks import StepContext


@dataclass
class GradualConfig:
    """Settings of a gradual pruner.

    Args:
        sparsity: target fraction of pruned weights in every selected Linear, in [0, 1).
        phase_steps: length of the pruning phase in training steps (>= 1).
        update_every: steps between mask updates during the phase (>= 1).
        embedding_sparsity: when set, also prune this fraction of the columns of every table of the
            selected ``MaskedEmbeddingBagCollection``s (dimension masks), on the same ramp; in [0, 1).
        reselect_every_samples: adaptation variant: after the phase, re-select the mask at the target
            sparsity every this many samples (all ranks together) instead of freezing it.
        targets: which modules are pruned.
    """

    sparsity: float
    phase_steps: int = 1000
    update_every: int = 1
    embedding_sparsity: float | None = None
    reselect_every_samples: int | None = None
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        check_sparsity("GradualConfig", "sparsity", self.sparsity)
        check_steps("GradualConfig", "phase_steps", self.phase_steps)
        check_steps("GradualConfig", "update_every", self.update_every)
        if self.embedding_sparsity is not None:
            check_sparsity("GradualConfig", "embedding_sparsity", self.embedding_sparsity)
        if self.reselect_every_samples is not None:
            check_steps("GradualConfig", "reselect_every_samples", self.reselect_every_samples)


class GradualPruner(PrunerBase):
    """Score, then top-k per layer, on a schedule.

    Args:
        model: the wrapped model (possibly DMP-wrapped).
        config: sparsity, phase and targets.
        scorer: element importance of Linear weights.
        rule: how scores become a mask.
        column_scorer: importance of embedding columns; required when ``config.embedding_sparsity`` is set.
        schedule: overrides the linear ramp built from ``config.phase_steps`` and ``config.update_every``.
        name: label used in error messages.

    Example::

        pruner = magnitude_pruner(model, GradualConfig(sparsity=0.8, phase_steps=500))
        trainer = IncrementalTrainer(model, TrainConfig(), hooks=[pruner])
    """

    def __init__(
        self,
        model: nn.Module,
        config: GradualConfig,
        scorer: WeightScorer,
        rule: TopK,
        *,
        column_scorer: ColumnScorer | None = None,
        schedule: Schedule | None = None,
        name: str = "GradualPruner",
    ) -> None:
        embeddings = {}
        if config.embedding_sparsity is not None:
            if column_scorer is None:
                raise ValueError(f"{name} does not score embedding columns; leave embedding_sparsity unset")
            embeddings = select_embeddings(model, config.targets, name)
            if not embeddings:
                raise ValueError(
                    f"{name}: embedding_sparsity is set but no MaskedEmbeddingBagCollection is selected"
                )
        super().__init__(select_linears(model, config.targets, name), embeddings)
        self.config = config
        self.scorer = scorer
        self.rule = rule
        self.column_scorer = column_scorer if embeddings else None
        self.schedule = schedule or LinearRamp(config.phase_steps, config.update_every)
        self.phase_over = False
        self._next_reselect = 0
        if scorer.needs_effective_grad:
            for layer in self.linears.values():
                layer.capture_effective_grad = True
        if self.column_scorer is not None:
            self.column_scorer.attach(self.embeddings)

    def before_step(self, ctx: StepContext) -> None:
        if self.finalized:
            return
        self.scorer.observe(self.linears)
        for layer in self.linears.values():
            layer.effective_grad = None
        if self.column_scorer is not None:
            self.column_scorer.observe(self.embeddings)

    def after_step(self, ctx: StepContext) -> None:
        if self.finalized:
            return
        self.steps += 1
        every = self.config.reselect_every_samples
        if self.phase_over:
            # Adaptation variant: ``samples_seen`` is global, so every rank re-selects at the same step.
            if every is not None and ctx.samples_seen >= self._next_reselect:
                self.update_masks(1.0, ctx.optimizers)
                while self._next_reselect <= ctx.samples_seen:
                    self._next_reselect += every
            return
        progress = self.schedule.progress(self.steps)
        if progress is not None:
            self.update_masks(progress, ctx.optimizers)
        if self.schedule.done(self.steps):
            self.phase_over = True
            if every is None:
                self.finalize(ctx)
            else:
                self._next_reselect = ctx.samples_seen + every

    @torch.no_grad()
    def update_masks(self, progress: float, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Re-make every mask at ``progress`` times the target sparsity, from the current scores."""
        optimizers = list(optimizers)
        scores = self.scorer.scores(self.linears)
        for fqn, layer in self.linears.items():
            current = layer.weight_mask & layer.neuron_mask.unsqueeze(1) & layer.input_mask.unsqueeze(0)
            mask = self.rule(scores[fqn], progress * self.config.sparsity, current)
            set_masks_(layer, optimizers, name=fqn, weight_mask=mask)
        if self.column_scorer is None:
            return
        column_sparsity = self.config.embedding_sparsity or 0.0
        column_scores = self.column_scorer.scores(self.embeddings)
        for fqn, module in self.embeddings.items():
            masks = {
                table.name: self.rule(
                    column_scores[(fqn, table.name)],
                    progress * column_sparsity,
                    module.dim_mask(table.name),
                )
                for table in module.embedding_bag_configs()
            }
            set_masks_(module, optimizers, name=fqn, dim_masks=masks)

    def finalize(self, ctx_or_optimizers: OptimizersArg = None) -> None:
        """Freeze the current masks (closed weights are exact zeros) and stop scoring."""
        if self.finalized:
            return
        optimizers = optimizers_of(ctx_or_optimizers)
        for fqn, layer in self.linears.items():
            set_masks_(layer, optimizers, name=fqn)
        for fqn, module in self.embeddings.items():
            set_masks_(module, optimizers, name=fqn)
        self._stop_scoring()
        self.finalized = True

    def _stop_scoring(self) -> None:
        """Release what scoring holds on the model (gradient capture, column hooks): at finalize, and when
        a finalized state is restored onto a fresh pruner, which set them up."""
        if self.scorer.needs_effective_grad:
            for layer in self.linears.values():
                layer.capture_effective_grad = False
                layer.effective_grad = None
        if self.column_scorer is not None:
            self.column_scorer.close()

    def state_dict(self) -> dict[str, Any]:
        """Steps (the ramp position: schedules are stateless), finalized flag, unit shapes, whether the
        phase is over, the next re-selection (adaptation variant) and the scorers' states."""
        return {
            **super().state_dict(),
            "phase_over": self.phase_over,
            "next_reselect": self._next_reselect,
            "scorer": self.scorer.state_dict(),
            "column_scorer": None if self.column_scorer is None else self.column_scorer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.phase_over = state["phase_over"]
        self._next_reselect = state["next_reselect"]
        self.scorer.load_state_dict(state["scorer"])
        if self.column_scorer is not None:
            self.column_scorer.load_state_dict(state["column_scorer"])
        if self.finalized:
            self._stop_scoring()


def magnitude_pruner(
    model: nn.Module, config: GradualConfig, schedule: Schedule | None = None
) -> GradualPruner:
    """MP: ``|theta|``; embedding columns by their L2 norm. Prune-only."""
    return GradualPruner(
        model,
        config,
        Magnitude(),
        TopK(regrow=False),
        column_scorer=ColumnMagnitude(),
        schedule=schedule,
        name="MP",
    )


def taylor_pruner(model: nn.Module, config: GradualConfig, schedule: Schedule | None = None) -> GradualPruner:
    """TP: ``|g * theta|`` summed over the phase; embedding columns by pooled-output Taylor. Prune-only."""
    return GradualPruner(
        model,
        config,
        Taylor(),
        TopK(regrow=False),
        column_scorer=ColumnTaylor(),
        schedule=schedule,
        name="TP",
    )


def momentum_pruner(
    model: nn.Module,
    config: GradualConfig,
    w1: float = 0.5,
    w2: float = 0.5,
    decay: float = 0.99,
    schedule: Schedule | None = None,
) -> GradualPruner:
    """MoP: ``w1 |theta|/mean|theta| + w2 |s|/mean|s|`` with ``s`` an EMA (``decay``) of gradients.

    Re-selection may bring back a pruned weight whose momentum grew (at zero, via ``set_masks_``); with
    ``config.reselect_every_samples`` this is the adaptation-mask variant.
    """
    return GradualPruner(
        model, config, Momentum(w1, w2, decay), TopK(regrow=True), schedule=schedule, name="MoP"
    )
