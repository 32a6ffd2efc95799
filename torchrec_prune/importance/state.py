"""Checkpoint state of scorers and pruners, for exact resume: CPU clones out, checked copies in.

A state is a tree of plain Python values and CPU tensors, so it pickles with ``torch.save`` and loads
with ``torch.load``'s default ``weights_only=True``. Tensors are cloned on the way out, so later in-place
updates of the live object never reach a saved state, and copied on the way in, so two objects loaded
from one state share nothing. A state made for other layers is refused with the names and shapes that
differ, instead of resuming a run that silently diverges.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch

K = TypeVar("K", bound=Hashable)


def cpu_clones(tensors: Mapping[K, torch.Tensor]) -> dict[K, torch.Tensor]:
    """Detached CPU copies, never aliasing the originals (``.to`` alone would on a CPU run)."""
    return {key: t.detach().to("cpu", copy=True) for key, t in tensors.items()}


def check_keys(owner: str, state: Mapping[str, Any], expected: Iterable[str]) -> None:
    """Refuse a state whose keys differ from ``expected``: a state of another object or configuration."""
    want = set(expected)
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ValueError(f"{owner} state does not fit: missing keys {missing}, unexpected keys {unexpected}")


def check_shapes(
    owner: str, what: str, saved: Mapping[str, Sequence[int]], live: Mapping[str, Sequence[int]]
) -> None:
    """Refuse a state made for other layers, naming the keys, or the first key whose shapes differ."""
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        lacks = [f"the state lacks {missing}"] if missing else []
        extra = [f"it has {unexpected}, which this one does not"] if unexpected else []
        raise ValueError(f"{owner} state is for other {what}: {'; '.join(lacks + extra)}")
    for key in sorted(live):
        if tuple(saved[key]) != tuple(live[key]):
            raise ValueError(
                f"{owner} state does not fit: {key!r} has shape {tuple(saved[key])} in the state but "
                f"{tuple(live[key])} here"
            )


def load_like(
    owner: str, what: str, saved: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Copies of ``saved`` on the devices of the matching ``live`` tensors, once names and shapes match."""
    check_shapes(owner, what, {k: t.shape for k, t in saved.items()}, {k: t.shape for k, t in live.items()})
    return {key: saved[key].to(live[key].device, copy=True) for key in live}


def accumulator(
    store: dict[K, torch.Tensor], key: K, shape: Sequence[int], device: torch.device, owner: str
) -> torch.Tensor:
    """``store[key]``, created as float32 zeros of ``shape`` on ``device`` at first use.

    A scorer meets its layers only when it observes them, so a restored accumulator (a CPU tensor) is
    checked against the layer's shape and moved to its device here, once.
    """
    acc = store.get(key)
    if acc is None:
        acc = store[key] = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    elif tuple(acc.shape) != tuple(shape):
        raise ValueError(
            f"{owner}: restored statistics of {key!r} have shape {tuple(acc.shape)} but the layer needs "
            f"{tuple(shape)}; the state was saved for another model"
        )
    elif acc.device != device:
        acc = store[key] = acc.to(device)
    return acc


class Stateless:
    """For scorers that keep nothing between steps: an empty state, and a clear error for any other."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_keys(type(self).__name__, state, ())
