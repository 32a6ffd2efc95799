"""``Delayed``: start any trainer hook (a pruner, a schedule) at a stream position instead of at once."""

from __future__ import annotations

from typing import Any

from torchrec_prune.data.stream import check_int
from torchrec_prune.train.hooks import StepContext, TrainHook


class Delayed:
    """Forward every call to ``hook`` from the first batch that starts at or after ``start_sample``.

    Pruners count their phase in their own steps, so a delayed pruner runs its whole phase (ramp, mask
    learning, importance window) from ``start_sample`` on, exactly as if it had been attached to a
    trainer started there. Positions are global stream positions (``ctx.position``), identical on every
    rank, so every rank starts on the same batch. The state holds whether it started and the hook's own
    state, so a resumed run restarts it where it was.

    Args:
        hook: the hook to start late.
        start_sample: global stream position (>= 0) of the first batch the hook sees.

    Example::

        pruner = AuxPruner(model, AuxConfig(lam=1.25, phase_steps=200))
        IncrementalTrainer(model, TrainConfig(), hooks=[Delayed(pruner, 100_000)]).run(stream)
    """

    def __init__(self, hook: TrainHook, start_sample: int) -> None:
        self.hook = hook
        self.start_sample = check_int("Delayed.start_sample", start_sample, 0)
        self.started = False

    def before_batch(self, ctx: StepContext) -> None:
        self.started = self.started or ctx.position >= self.start_sample
        if self.started:
            self.hook.before_batch(ctx)

    def before_step(self, ctx: StepContext) -> None:
        if self.started:
            self.hook.before_step(ctx)

    def after_step(self, ctx: StepContext) -> None:
        if self.started:
            self.hook.after_step(ctx)

    def on_increment_end(self, ctx: StepContext) -> None:
        if self.started:
            self.hook.on_increment_end(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started, "hook": self.hook.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started = bool(state["started"])
        self.hook.load_state_dict(state["hook"])

    def __getattr__(self, name: str) -> Any:
        # The wrapped pruner's own API (stats(), finalize(), masks) stays reachable through the wrapper.
        if "hook" not in self.__dict__:  # during copy/unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(self.__dict__["hook"], name)
