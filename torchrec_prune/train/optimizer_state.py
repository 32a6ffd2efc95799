"""Optimizer-state surgery for pruned and regrown weights (SPEC 3).

Momentum revives pruned weights and stale second moments distort regrown ones, so every mask change
resets the per-element state of the entries it touches: momentum and Adam moments to 0, Adagrad's sum to
its ``initial_accumulator_value``. Scalar state (Adam's ``step``) is shared by the whole tensor and is
left alone; bias correction then treats regrown entries as if they had seen ``step`` zero gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# State keys that hold one value per parameter element, and the value a fresh entry starts from.
_ZERO_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta")


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
