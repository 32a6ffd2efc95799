"""What every pruning algorithm looks like to the trainer and to logging.

A pruner is a ``TrainHook`` (it gathers statistics in ``before_step``, changes masks in ``before_step`` or
``after_step``) with two more methods: ``stats()`` for logging and ``finalize()`` to freeze its masks.
Algorithms are compositions of an importance scorer (``torchrec_prune.importance``), a mask rule
(``rules``) and a schedule (``schedules``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from torchrec_prune.importance.state import check_keys, check_shapes
from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.train.hooks import BaseHook, StepContext


@dataclass(frozen=True)
class LayerStats:
    """Mask counts of one pruned unit.

    Args:
        kind: ``linear`` (units are weights) or ``embedding`` (units are columns of one table).
        total: weights (or columns) of the unit.
        kept: weights (or columns) kept by the masks.
        neurons: output neurons of a Linear (``None`` for an embedding table).
        kept_neurons: neurons kept by ``neuron_mask`` (``None`` for an embedding table).
    """

    kind: str
    total: int
    kept: int
    neurons: int | None = None
    kept_neurons: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


def linear_stats(layer: MaskedLinear) -> LayerStats:
    keep = layer.kept_mask()
    return LayerStats(
        kind="linear",
        total=keep.numel(),
        kept=int(keep.sum()),
        neurons=layer.out_features,
        kept_neurons=int(layer.neuron_mask.sum()),
    )


def embedding_stats(module: MaskedEmbeddingBagCollection, fqn: str) -> dict[str, LayerStats]:
    """One entry per table, keyed by the FQN of its ``dim_masks`` buffer."""
    out = {}
    for config in module.embedding_bag_configs():
        mask = module.dim_mask(config.name)
        out[f"{fqn}.dim_masks.{config.name}"] = LayerStats("embedding", mask.numel(), int(mask.sum()))
    return out


def overall_sparsity(stats: Mapping[str, LayerStats], kind: str = "linear") -> float:
    """Fraction of pruned units over every entry of ``kind`` (weights of all Linears by default)."""
    entries = [s for s in stats.values() if s.kind == kind]
    total = sum(s.total for s in entries)
    return 1.0 - sum(s.kept for s in entries) / total if total else 0.0


OptimizersArg = StepContext | Iterable[torch.optim.Optimizer] | None


def optimizers_of(ctx_or_optimizers: OptimizersArg) -> list[torch.optim.Optimizer]:
    """The optimizers whose state a mask change must reset."""
    if ctx_or_optimizers is None:
        return []
    if isinstance(ctx_or_optimizers, StepContext):
        return list(ctx_or_optimizers.optimizers)
    return list(ctx_or_optimizers)


@runtime_checkable
class Pruner(Protocol):
    """A pruning algorithm as the trainer sees it."""

    def before_batch(self, ctx: StepContext) -> None: ...

    def before_step(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...

    def on_increment_end(self, ctx: StepContext) -> None: ...

    def stats(self) -> dict[str, LayerStats]: ...

    def finalize(self, ctx_or_optimizers: OptimizersArg = None) -> None:
        """Freeze the masks: pruned weights become exact zeros with fresh optimizer state, and the pruner
        stops changing masks (the model then fine-tunes with a fixed mask)."""
        ...


class PrunerBase(BaseHook):
    """Shared bookkeeping: the targeted modules, ``stats()``, the step count and the finalized flag.

    ``state_dict``/``load_state_dict`` checkpoint what the pruner has learned, not the masks: those are
    model buffers, saved with the weights and restored before the pruner's state is loaded.
    """

    def __init__(
        self,
        linears: Mapping[str, MaskedLinear],
        embeddings: Mapping[str, MaskedEmbeddingBagCollection] | None = None,
    ) -> None:
        self.linears = dict(linears)
        self.embeddings = dict(embeddings or {})
        self.finalized = False
        self.steps = 0

    def stats(self) -> dict[str, LayerStats]:
        out = {fqn: linear_stats(layer) for fqn, layer in self.linears.items()}
        for fqn, module in self.embeddings.items():
            out.update(embedding_stats(module, fqn))
        return out

    def _unit_shapes(self) -> dict[str, list[int]]:
        """Shape of every pruned unit: each Linear's weight, each table's dimension mask (by buffer FQN)."""
        out = {fqn: list(layer.weight.shape) for fqn, layer in self.linears.items()}
        for fqn, module in self.embeddings.items():
            for config in module.embedding_bag_configs():
                out[f"{fqn}.dim_masks.{config.name}"] = list(module.dim_mask(config.name).shape)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Steps, the finalized flag, and the pruned units' shapes, so a state of another model is refused.

        Subclasses add what they learn.
        """
        return {"units": self._unit_shapes(), "steps": self.steps, "finalized": self.finalized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto a fresh pruner of the same configuration, whose model's weights and masks are
        already restored. Raises ``ValueError`` for a state of another pruner or model."""
        owner = type(self).__name__
        check_keys(owner, state, self.state_dict())  # the keys of this pruner's state, subclass included
        check_shapes(owner, "pruned units", state["units"], self._unit_shapes())
        self.steps = state["steps"]
        self.finalized = state["finalized"]
