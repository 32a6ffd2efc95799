"""Optimizer-state surgery for pruned and regrown weights (SPEC 3).

Momentum revives pruned weights and stale second moments distort regrown ones, so every mask change
resets the per-element state of the entries it touches: momentum and Adam moments to 0, Adagrad's sum to
its ``initial_accumulator_value``. Scalar state (Adam's ``step``) is shared by the whole tensor and is
left alone; bias correction then treats regrown entries as if they had seen ``step`` zero gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# State keys that hold one value per parameter element, and the value a fresh entry starts from.
_ZERO_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta")


def _initial_value(key: str, group: dict) -> float:
    if key == "sum":
        return float(group.get("initial_accumulator_value", 0.0))
    return 0.0


def reset_state_(
    optimizers: Iterable[torch.optim.Optimizer], param: torch.Tensor, where: torch.Tensor
) -> int:
    """Reset the per-element optimizer state of ``param`` at ``where`` (bool, broadcastable to param).

    Returns the number of state tensors touched, summed over optimizers.
    """
    touched = 0
    for optimizer in optimizers:
        state = optimizer.state.get(param)
        if not state:
            continue
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue
            if key not in _ZERO_STATE and key != "sum":
                continue
            with torch.no_grad():
                value.masked_fill_(where.expand_as(value), _initial_value(key, group))
            touched += 1
    return touched


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
