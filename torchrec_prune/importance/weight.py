"""Element importance of ``MaskedLinear`` weights: magnitude, Taylor and momentum (SPEC 4).

A scorer observes the model once per step, after backward and before the optimizer (``observe``), and
turns what it gathered into one score per weight when a mask is made (``scores``). Scores are averaged
over ranks inside ``scores``, so masks made from them are identical everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from torchrec_prune.importance.reduce import all_reduce_mean_
from torchrec_prune.importance.state import Stateless, accumulator, check_keys, cpu_clones
from torchrec_prune.masks.linear import MaskedLinear


def mean_normalized(x: torch.Tensor) -> torch.Tensor:
    """``x / mean(x)`` for a non-negative ``x``, so the term averages 1 over the layer (0 if all-zero).

    This is the D2S paper's gradient-rescaling trick: terms of different scales (|G| and |theta|, or
    |s| and |theta|) can then be mixed with plain weights w1, w2, and one lambda fits every layer.
    """
    mean = x.mean()
    return x / mean.clamp_min(torch.finfo(x.dtype).tiny)


def combined_importance(w1: float, x: torch.Tensor, w2: float, y: torch.Tensor) -> torch.Tensor:
    """``w1 * |x| / mean|x| + w2 * |y| / mean|y|`` over one layer."""
    return w1 * mean_normalized(x.abs()) + w2 * mean_normalized(y.abs())


def check_weights(owner: str, w1: float, w2: float) -> None:
    """Validate the mixing weights of a two-term importance."""
    for name, value in (("w1", w1), ("w2", w2)):
        if not value >= 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value!r}")
    if not w1 + w2 > 0:
        raise ValueError(f"{owner}.w1 + {owner}.w2 must be > 0, got w1={w1!r}, w2={w2!r}")


def weight_gradient(layer: MaskedLinear) -> torch.Tensor | None:
    """The gradient w.r.t. the effective weight when captured (it is also defined where the mask is
    closed), else ``weight.grad`` (zero where closed)."""
    if layer.effective_grad is not None:
        return layer.effective_grad
    return layer.weight.grad


class WeightScorer(Protocol):
    """Importance of every weight of a set of ``MaskedLinear`` layers, keyed by FQN.

    Its state (what ``observe`` accumulated) is checkpointed with its pruner's, for exact resume.
    """

    needs_effective_grad: bool

    def observe(self, layers: Mapping[str, MaskedLinear]) -> None: ...

    def scores(self, layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _weight_accumulator(
    store: dict[str, torch.Tensor], fqn: str, layer: MaskedLinear, owner: str
) -> torch.Tensor:
    return accumulator(store, fqn, layer.weight.shape, layer.weight.device, owner)


@dataclass
class Magnitude(Stateless):
    """MP: importance ``|theta|``."""

    needs_effective_grad: bool = field(default=False, init=False)

    def observe(self, layers: Mapping[str, MaskedLinear]) -> None:
        return None

    @torch.no_grad()
    def scores(self, layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
        out = {fqn: layer.weight.detach().abs().float() for fqn, layer in sorted(layers.items())}
        all_reduce_mean_(list(out.values()))
        return out


@dataclass
class Taylor:
    """TP: importance ``|g * theta|`` summed over every observed batch (first-order loss change)."""

    needs_effective_grad: bool = field(default=False, init=False)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @torch.no_grad()
    def observe(self, layers: Mapping[str, MaskedLinear]) -> None:
        for fqn, layer in sorted(layers.items()):
            acc = _weight_accumulator(self._sums, fqn, layer, "Taylor")
            grad = weight_gradient(layer)
            if grad is not None:
                acc.add_((grad * layer.weight).abs())

    @torch.no_grad()
    def scores(self, layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
        out = {
            fqn: _weight_accumulator(self._sums, fqn, layer, "Taylor")
            for fqn, layer in sorted(layers.items())
        }
        all_reduce_mean_(list(out.values()))
        return {fqn: acc.clone() for fqn, acc in out.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": cpu_clones(self._sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto the CPU; each sum moves to its layer's device when the scorer next uses it."""
        check_keys("Taylor", state, ["sums"])
        self._sums = cpu_clones(state["sums"])


@dataclass
class Momentum:
    """MoP: ``w1 |theta| / mean|theta| + w2 |s| / mean|s|``, ``s`` an EMA of gradients.

    The gradient is taken w.r.t. the effective weight, which is defined also for pruned weights: their
    momentum can grow while their value stays zero, so a re-selection may bring them back.

    Args:
        w1: weight of the magnitude term (>= 0).
        w2: weight of the momentum term (>= 0); w1 + w2 > 0.
        decay: EMA decay of the gradient, in [0, 1).
    """

    w1: float = 0.5
    w2: float = 0.5
    decay: float = 0.99
    needs_effective_grad: bool = field(default=True, init=False)
    _ema: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_weights("Momentum", self.w1, self.w2)
        if not 0 <= self.decay < 1:
            raise ValueError(f"Momentum.decay must be in [0, 1), got {self.decay!r}")

    @torch.no_grad()
    def observe(self, layers: Mapping[str, MaskedLinear]) -> None:
        for fqn, layer in sorted(layers.items()):
            ema = _weight_accumulator(self._ema, fqn, layer, "Momentum")
            grad = weight_gradient(layer)
            ema.mul_(self.decay)
            if grad is not None:
                ema.add_(grad, alpha=1 - self.decay)

    @torch.no_grad()
    def scores(self, layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
        # The EMA is linear in the gradients: its mean over ranks is the EMA of the mean gradient.
        emas = {
            fqn: _weight_accumulator(self._ema, fqn, layer, "Momentum")
            for fqn, layer in sorted(layers.items())
        }
        thetas = {fqn: layers[fqn].weight.detach().to(torch.float32, copy=True) for fqn in emas}
        all_reduce_mean_([*emas.values(), *thetas.values()])
        return {fqn: combined_importance(self.w1, thetas[fqn], self.w2, emas[fqn]) for fqn in emas}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": cpu_clones(self._ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto the CPU; each EMA moves to its layer's device when the scorer next uses it."""
        check_keys("Momentum", state, ["ema"])
        self._ema = cpu_clones(state["ema"])
