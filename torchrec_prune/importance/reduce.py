"""Averaging pruning statistics over ranks, so that every rank derives the same mask (SPEC 8).

Each rank sees different data, so gradient statistics differ between ranks; masks made from local
statistics would diverge. Statistics are therefore averaged in place right before masks are made, in one
collective per (device, dtype) bucket. Every rank must pass the same tensors in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


@torch.no_grad()
def all_reduce_mean_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Replace each tensor by its mean over the ranks of ``group``; a no-op in a single process."""
    if not tensors or not is_distributed(group):
        return
    world = dist.get_world_size(group)
    buckets: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((str(t.device), t.dtype), []).append(t)
    for key in sorted(buckets, key=str):
        members = buckets[key]
        flat = torch.cat([t.reshape(-1) for t in members])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for t in members:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
