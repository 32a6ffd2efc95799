"""Where pruners and schedules plug into the incremental trainer.

The trainer runs, per batch: ``before_batch``, forward (its logits are the look-ahead score of that
batch), backward, ``before_step``, ``optimizer.step()``, ``after_step``; and ``on_increment_end`` after
the last batch of each increment. Masks that change at a batch boundary change in ``before_batch``, so
the batch's score, gradients, step and booked FLOPs all see the same masks. ``before_step`` sees the
batch's gradients, so importance scores that need them (Taylor, AUX's mask gradient) accumulate there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torchrec.datasets.utils import Batch


@dataclass
class StepContext:
    """What a hook may read (and, for masks, change) at one training step.

    Args:
        model: the model being trained (possibly DMP-wrapped).
        optimizers: every optimizer that owns parameters of the model (mask changes reset their state).
        step: global step index, from 0.
        samples_seen: samples trained on before this batch, summed over all ranks.
        position: global stream position where the current batch starts, identical on every rank (set
            from the increment's layout by ``train_increment``; a rank's share of a final uneven batch
            would make ``samples_seen``-style counts differ across ranks).
        increment: index of the current increment.
        batch: this rank's current batch (already on the device).
        loss: the batch loss (detached).
        phase: label of the schedule phase (e.g. ``dense``/``sparse``) under which FLOPs are booked.
        extras: free-form values a hook wants to pass to later hooks of the same step.
    """

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    step: int = 0
    samples_seen: int = 0
    position: int = 0
    increment: int = 0
    batch: Batch | None = None
    loss: torch.Tensor | None = None
    phase: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Stateful(Protocol):
    """A part of a run that a checkpoint can capture and a restart can restore."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class TrainHook(Protocol):
    """A participant in the incremental loop. Every method is optional to override via ``BaseHook``."""

    def before_batch(self, ctx: StepContext) -> None: ...

    def before_step(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext) -> None: ...

    def on_increment_end(self, ctx: StepContext) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseHook:
    """No-op implementations, so a hook only defines the moments it cares about."""

    def before_batch(self, ctx: StepContext) -> None:
        return None

    def before_step(self, ctx: StepContext) -> None:
        return None

    def after_step(self, ctx: StepContext) -> None:
        return None

    def on_increment_end(self, ctx: StepContext) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """A stateless hook has nothing to save; stateful hooks override both methods."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} holds no state but was given keys {sorted(state)}")
