"""AUX: auxiliary-mask pruning with a learned per-layer sparsity (SPEC 4, D2S paper section 5).

Every weight ``theta_i`` has a latent score ``a_i`` and the forward uses ``I(a_i > 0) * theta_i``. With the
linear straight-through estimator the mask gradient is ``G_i = g_i * theta_i``, ``g`` the gradient w.r.t.
the effective weight (captured by ``MaskedLinear`` also where the mask is closed). Each step, per layer::

    a <- a + eps * (w1 * |G| / mean|G| + w2 * |theta| / mean|theta| - lambda)

so weights whose rescaled importance stays below lambda drift to ``a <= 0`` and are pruned, and pruned
weights whose importance rises come back: their values are kept during the phase. lambda is the only
sparsity knob; each layer's sparsity is learned.

During the phase ``weight_mask`` is written directly (not through ``set_masks_``, which would zero the
pruned values). Pruned weights are frozen: their gradients are zeroed before the optimizer step, so
momentum and Adagrad state gain nothing from them, and their values are restored after it, so neither
old momentum nor weight decay moves them. ``finalize`` then makes pruned weights exact zeros with fresh
optimizer state (``set_masks_``), and training continues with that fixed mask. The adaptation variant
(``phase_steps=None``) never finalizes by itself and keeps learning the mask.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchrec_prune.importance.reduce import all_reduce_mean_
from torchrec_prune.importance.state import cpu_clones, load_like
from torchrec_prune.importance.weight import check_weights, combined_importance
from torchrec_prune.masks.surgery import set_masks_
from torchrec_prune.pruners.base import OptimizersArg, PrunerBase, optimizers_of
from torchrec_prune.pruners.rules import latent_sign
from torchrec_prune.pruners.schedules import check_steps
from torchrec_prune.pruners.targets import Targets, select_linears
from torchrec_prune.train.hooks import StepContext

LATENT_BUDGET = 10.0  # default eps * phase_steps of AUX's latent scores (see AuxConfig)


@dataclass
class AuxConfig:
    """Settings of AUX pruning.

    Args:
        lam: sparsity penalty lambda (>= 0); with the rescaled terms about 1.75 gives 75% sparsity.
        w1: weight of the Taylor term |G| / mean|G| (>= 0).
        w2: weight of the magnitude term |theta| / mean|theta| (>= 0); w1 + w2 > 0.
        eps: SGD step of the latent scores (> 0); ``None`` (default) derives it as ``latent_budget /
            phase_steps``, so that lambda alone sets the sparsity whatever the phase length.
        latent_budget: how far the latent scores can move over a whole phase (> 0) when ``eps`` is
            derived. After ``T`` steps ``a = a0 + eps * sum(importance - lambda)``; with ``eps = B / T``
            this is ``a0 + B * mean(importance - lambda)``, so a weight is pruned when its mean rescaled
            importance over the phase is below ``lambda - a0 / B``, the same for every ``T``. The
            default 10 makes that offset 0.1 (a0 = 1) and equals the former fixed step 0.01 over 1000
            steps, which set the lambda -> sparsity map (1.75 -> about 75%).
        a0: initial latent score of open weights (> 0); closed weights start at -a0.
        phase_steps: steps of the pruning phase, after which the mask is frozen (>= 1); ``None`` is the
            adaptation variant, which keeps updating the mask.
        targets: which Linears are pruned (the output layer only with ``include_output_layer``).
        min_layer_density: fraction of each layer's weights kept whatever the scores (those with the
            highest latent scores), in [0, 1). Default 0.01: a layer pruned to 100% disconnects
            everything behind it (all dense features, when it is the bottom MLP's first layer), which no
            sparsity penalty intends; 1% keeps a path and moves overall sparsity by at most 1% of that
            layer. 0 turns the floor off (a layer that reaches 100% is still reported as a warning).
    """

    lam: float = 1.75
    w1: float = 0.5
    w2: float = 0.5
    eps: float | None = None
    latent_budget: float = LATENT_BUDGET
    a0: float = 1.0
    phase_steps: int | None = 1000
    targets: Targets = field(default_factory=Targets)
    min_layer_density: float = 0.01

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"AuxConfig.lam must be >= 0, got {self.lam!r}")
        if not 0 <= self.min_layer_density < 1:
            raise ValueError(f"AuxConfig.min_layer_density must be in [0, 1), got {self.min_layer_density!r}")
        check_weights("AuxConfig", self.w1, self.w2)
        for name in ("eps", "latent_budget", "a0"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"AuxConfig.{name} must be > 0, got {value!r}")
        if self.phase_steps is not None:
            check_steps("AuxConfig", "phase_steps", self.phase_steps)
        elif self.eps is None:
            raise ValueError(
                "AuxConfig.eps is required when phase_steps is None (the adaptation variant has no phase "
                "to spread latent_budget over): pass eps = latent_budget / the steps of the phase it "
                "replaces, e.g. AuxConfig(...).step_for(steps)"
            )

    def step_for(self, phase_steps: int) -> float:
        """The latent-score step of a phase of ``phase_steps`` steps: ``eps`` if set, else
        ``latent_budget / phase_steps``."""
        return self.eps if self.eps is not None else self.latent_budget / phase_steps

    @property
    def step(self) -> float:
        """The latent-score step this configuration uses."""
        if self.phase_steps is None:
            assert self.eps is not None  # checked in __post_init__
            return self.eps
        return self.step_for(self.phase_steps)


class AuxPruner(PrunerBase):
    """Learn masks by the AUX dynamics during ``phase_steps`` steps, then freeze them.

    Args:
        model: the wrapped model (possibly DMP-wrapped).
        config: penalty, weights, step and phase.

    Example::

        pruner = AuxPruner(model, AuxConfig(lam=1.75, phase_steps=2000))
        IncrementalTrainer(model, TrainConfig(), hooks=[pruner]).run(stream)
        print(overall_sparsity(pruner.stats()))
    """

    def __init__(self, model: nn.Module, config: AuxConfig) -> None:
        super().__init__(select_linears(model, config.targets, "AuxPruner"))
        self.config = config
        self.eps = config.step
        self.latent = {
            fqn: torch.where(layer.weight_mask, config.a0, -config.a0).float()
            for fqn, layer in self.linears.items()
        }
        self._held: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()  # layers reported pruned to 100% (once each)
        for layer in self.linears.values():
            layer.capture_effective_grad = True
            layer.effective_grad = None

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        """Update the latent scores from this batch's gradients and set the masks the optimizer sees."""
        if self.finalized:
            return
        fqns = sorted(self.linears)
        grads = []
        for fqn in fqns:
            layer = self.linears[fqn]
            grad = layer.effective_grad
            grads.append(torch.zeros_like(layer.weight) if grad is None else grad)
            layer.effective_grad = None
        all_reduce_mean_(grads)
        cfg = self.config
        for fqn, grad in zip(fqns, grads, strict=True):
            layer = self.linears[fqn]
            theta = layer.weight.detach()
            importance = combined_importance(cfg.w1, grad * theta, cfg.w2, theta)
            latent = self.latent[fqn]
            latent.add_(importance.float() - cfg.lam, alpha=self.eps)
            keep = latent_sign(latent, cfg.min_layer_density)
            self._warn_if_empty(fqn, keep)
            layer.weight_mask.copy_(keep)
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(~keep, 0.0)
            self._held[fqn] = theta.clone()

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """Put pruned weights back to their values from before the optimizer step."""
        if self.finalized:
            return
        self._restore_held()
        self.steps += 1
        if self.config.phase_steps is not None and self.steps >= self.config.phase_steps:
            self.finalize(ctx)

    def _warn_if_empty(self, fqn: str, keep: torch.Tensor) -> None:
        if fqn not in self._warned and not bool(keep.any()):
            self._warned.add(fqn)
            warnings.warn(
                f"AuxPruner: layer {fqn!r} is pruned to 100% (lambda {self.config.lam:g}); nothing passes "
                "through it. AuxConfig.min_layer_density keeps a floor of its weights",
                stacklevel=3,
            )

    def _restore_held(self) -> None:
        for fqn, held in self._held.items():
            layer = self.linears[fqn]
            layer.weight.copy_(torch.where(layer.weight_mask, layer.weight, held))
        self._held.clear()

    @torch.no_grad()
    def finalize(self, ctx_or_optimizers: OptimizersArg = None) -> None:
        """Freeze the mask ``a > 0``: pruned weights become exact zeros with fresh optimizer state."""
        if self.finalized:
            return
        optimizers = optimizers_of(ctx_or_optimizers)
        self._restore_held()
        for fqn, layer in self.linears.items():
            # Re-open first so that set_masks_ sees every pruned weight as newly closed and resets its state.
            layer.weight_mask.fill_(True)
            keep = latent_sign(self.latent[fqn], self.config.min_layer_density)
            self._warn_if_empty(fqn, keep)
            set_masks_(layer, optimizers, name=fqn, weight_mask=keep)
        self._stop_capturing()
        self.finalized = True

    def _stop_capturing(self) -> None:
        """A frozen mask needs no mask gradient: turn its capture off (at finalize, and when a finalized
        state is restored onto a fresh pruner, which turned it on)."""
        for layer in self.linears.values():
            layer.capture_effective_grad = False
            layer.effective_grad = None

    def state_dict(self) -> dict[str, Any]:
        """Steps, finalized flag, unit shapes and the latent scores (CPU copies).

        Raises:
            RuntimeError: called between ``before_step`` and ``after_step``, where pruned weights' values
                are held outside the model and the state would not be complete.
        """
        if self._held:
            raise RuntimeError(
                "AuxPruner.state_dict() was called between before_step and after_step; take it between steps"
            )
        return {**super().state_dict(), "latent": cpu_clones(self.latent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.latent = load_like("AuxPruner", "latent scores", state["latent"], self.latent)
        if self.finalized:
            self._stop_capturing()
