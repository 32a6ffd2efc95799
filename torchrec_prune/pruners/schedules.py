"""When a pruner changes masks, as a fraction of its final sparsity.

A schedule is asked once per finished training step (``step`` counts the pruner's steps from 1) and
answers the fraction of the target sparsity due now, or ``None`` when no mask change is due. Pruners
count their own steps, so a pruner created halfway through a stream starts its phase at once, and a
schedule holds no state: its position is the pruner's step count, checkpointed with the pruner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


def check_steps(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


class Schedule(Protocol):
    def progress(self, step: int) -> float | None: ...

    def done(self, step: int) -> bool: ...


@dataclass(frozen=True)
class LinearRamp:
    """Sparsity rises linearly from 0 to the target over ``phase_steps`` steps, updated every
    ``update_every`` steps and always on the last step of the phase (gradual MP/TP/MoP)."""

    phase_steps: int
    update_every: int = 1

    def __post_init__(self) -> None:
        check_steps("LinearRamp", "phase_steps", self.phase_steps)
        check_steps("LinearRamp", "update_every", self.update_every)

    def progress(self, step: int) -> float | None:
        if step > self.phase_steps or (step % self.update_every and step != self.phase_steps):
            return None
        return step / self.phase_steps

    def done(self, step: int) -> bool:
        return step >= self.phase_steps


@dataclass(frozen=True)
class OneShot:
    """The whole target at once, after ``at_step`` steps (e.g. after an importance window)."""

    at_step: int = 1

    def __post_init__(self) -> None:
        check_steps("OneShot", "at_step", self.at_step)

    def progress(self, step: int) -> float | None:
        return 1.0 if step == self.at_step else None

    def done(self, step: int) -> bool:
        return step >= self.at_step
