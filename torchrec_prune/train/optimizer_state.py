"""Optimizer-state surgery for pruned and regrown weights (SPEC 3).

Momentum revives pruned weights and stale second moments distort regrown ones, so a mask change resets
the per-element state of the entries it touches (growth: by default, see below): momentum and Adam moments
to 0, Adagrad's sum to its ``initial_accumulator_value``. Scalar state (Adam's ``step``) is shared by the
whole tensor and is left alone; bias correction then treats regrown entries as if they had seen ``step``
zero gradients.

An accumulator reset to 0 makes a regrown entry's first step about as long as the learning rate (Adagrad:
``lr * g / sqrt(g**2)``; Adam with default betas, once its bias correction is near 1: about ``3 * lr``),
which blew up the loss after regrowth in a minority of seeds (docs/results/fidelity_regrow_state.md). So
growth takes a rule (``regrow_state_``): ``"reset"`` follows SPEC 3, ``"layer_mean"`` starts accumulators
at the mean over the parameter's entries that stay open. Closing always resets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# State keys that hold one value per parameter element, and the value a fresh entry starts from.
# (RMSprop's ``grad_avg`` when centered, Adamax's ``exp_inf`` included.)
_ZERO_STATE = (
    "momentum_buffer",
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "square_avg",
    "grad_avg",
    "acc_delta",
    "exp_inf",
)
# Of those, the running sums or averages of squared gradients (or updates) that set an entry's step size.
# First moments and momentum are not among them: a regrown entry has no direction yet, they restart at 0.
_ACCUMULATORS = ("sum", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "exp_inf")
# How growth starts the state of re-opened entries: SPEC 3's reset (the default), or the layer's mean.
REGROWN_STATES = ("reset", "layer_mean")


def _initial_value(key: str, group: dict) -> float:
    if key == "sum":
        return float(group.get("initial_accumulator_value", 0.0))
    return 0.0


@dataclass(frozen=True)
class ElementState:
    """One per-element state tensor of a parameter: ``holder[key]`` of one optimizer, and the value a
    fresh entry starts from."""

    optimizer: int
    holder: dict[str, Any]
    key: str
    initial: float


def element_states(
    optimizers: Sequence[torch.optim.Optimizer], param: torch.Tensor, shape: torch.Size | None = None
) -> list[ElementState]:
    """The per-element state tensors of ``param`` (those of ``shape``, default the parameter's)."""
    shape = param.shape if shape is None else shape
    out = []
    for index, optimizer in enumerate(optimizers):
        state = optimizer.state.get(param)
        if not state:
            continue
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        for key, value in state.items():
            if (
                isinstance(value, torch.Tensor)
                and value.shape == shape
                and (key in _ZERO_STATE or key == "sum")
            ):
                out.append(ElementState(index, state, key, _initial_value(key, group)))
    return out


def reset_state_(
    optimizers: Iterable[torch.optim.Optimizer], param: torch.Tensor, where: torch.Tensor
) -> int:
    """Reset the per-element optimizer state of ``param`` at ``where`` (bool, broadcastable to param).

    Returns the number of state tensors touched, summed over optimizers.
    """
    entries = element_states(list(optimizers), param)
    with torch.no_grad():
        for entry in entries:
            value = entry.holder[entry.key]
            value.masked_fill_(where.expand_as(value), entry.initial)
    return len(entries)


def check_regrown_state(field: str, value: object) -> None:
    """Refuse a growth rule that is not one of ``REGROWN_STATES``; ``field`` names the setting."""
    if value not in REGROWN_STATES:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, REGROWN_STATES))}, got {value!r}")


def regrow_state_(
    optimizers: Iterable[torch.optim.Optimizer],
    param: torch.Tensor,
    opened: torch.Tensor,
    kept: torch.Tensor,
    regrown_state: str = "reset",
) -> int:
    """Start the per-element optimizer state of ``param``'s re-opened entries (``opened``, bool,
    broadcastable to param).

    ``"reset"`` is SPEC 3 (``reset_state_``). ``"layer_mean"`` starts each accumulator (Adagrad's ``sum``,
    Adam's ``exp_avg_sq`` and ``max_exp_avg_sq``, RMSprop's ``square_avg``, Adadelta's ``acc_delta``,
    Adamax's ``exp_inf``) at
    its mean over ``kept``, the entries open before and after the change, or at its initial value when
    none is; momentum and first moments restart at 0 either way. Returns the number of state tensors
    touched, summed over optimizers.
    """
    check_regrown_state("regrown_state", regrown_state)
    if regrown_state == "reset":
        return reset_state_(optimizers, param, opened)
    entries = element_states(list(optimizers), param)
    any_opened = bool(opened.any())  # most mask changes re-open nothing: skip the means
    with torch.no_grad():
        for entry in entries:
            value = entry.holder[entry.key]
            fill = entry.initial
            if any_opened and entry.key in _ACCUMULATORS:
                kept_values = value[kept.expand_as(value)]
                if kept_values.numel():
                    fill = kept_values.mean().item()
            value.masked_fill_(opened.expand_as(value), fill)
    return len(entries)


def renew_state_(
    optimizers: Iterable[torch.optim.Optimizer],
    param: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    regrown_state: str = "reset",
) -> None:
    """The optimizer state of ``param`` across a mask change from ``before`` to ``after`` (bool,
    broadcastable to param): entries that closed are reset, re-opened ones start under
    ``regrown_state`` (``regrow_state_``), the rest keep theirs."""
    optimizers = list(optimizers)
    reset_state_(optimizers, param, before & ~after)
    regrow_state_(optimizers, param, ~before & after, before & after, regrown_state)


def keep_pruned_zero(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module
) -> torch.utils.hooks.RemovableHandle:
    """Re-apply every mask after each ``optimizer.step()``.

    Masked forwards already give pruned weights zero gradient and mask changes reset their state, so
    stock SGD/Adagrad/Adam keep them at zero; this hook is the guard for optimizers that move weights
    without a gradient (decoupled decay with a non-zero start, proximal steps).
    """
    from torchrec_prune.masks.surgery import apply_masks_

    def hook(_opt: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:
        apply_masks_(model)

    return optimizer.register_step_post_hook(hook)
