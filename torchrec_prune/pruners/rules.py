"""Mask rules: how scores become a mask.

``TopK`` keeps exactly ``n - round(sparsity * n)`` entries of one layer (or table), so every layer reaches
the target sparsity exactly (but at least one entry, so no layer is cut off). Ties are broken
deterministically, first in favour of entries that are open now (a tie never flips a mask), then by
lower flat index, so every rank picks the same mask from the same scores. ``latent_sign`` is AUX's
rule: an entry is kept while its latent score is positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_sparsity(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ValueError(f"{owner}.{name} must be in [0, 1), got {value!r}")


def fraction_count(n: int, fraction: float) -> int:
    """``round(fraction * n)``, half up and tolerant of float noise (0.7 * 10 is 7, not 6)."""
    return min(n, int(math.floor(fraction * n + 0.5 + 1e-9)))


def topk_mask(scores: torch.Tensor, keep: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask shaped like ``scores`` with exactly ``keep`` entries set: the highest scores.

    Among equal scores, entries where ``prefer`` is set win, then lower flat indices. NaN counts as -inf.
    The threshold comes from a selection (``kthvalue``, linear time) and only the entries tied at it are
    sorted, so a mask update costs no sort of the whole layer.
    """
    flat = torch.nan_to_num(scores.detach().reshape(-1).float(), nan=-math.inf)
    n = flat.numel()
    if keep >= n or keep <= 0:
        return torch.full_like(flat, keep > 0, dtype=torch.bool).view(scores.shape)
    threshold = torch.kthvalue(flat, n - keep + 1).values
    mask = flat > threshold
    tied = torch.nonzero(flat == threshold).squeeze(1)  # in index order
    need = keep - int(mask.sum())
    if prefer is not None and tied.numel() > need:
        preferred = prefer.reshape(-1).to(flat.device)[tied].int()
        tied = tied[torch.sort(preferred, descending=True, stable=True).indices]
    mask[tied[:need]] = True
    return mask.view(scores.shape)


@dataclass(frozen=True)
class TopK:
    """Per-layer top-k to a sparsity.

    Args:
        regrow: whether closed entries may be selected again (MoP, whose momentum can revive a weight).
            Without it the mask only ever closes: closed entries rank below every open one, and a layer
            that is already sparser than asked for stays as it is.
    """

    regrow: bool = False

    def __call__(self, scores: torch.Tensor, sparsity: float, current: torch.Tensor) -> torch.Tensor:
        n = scores.numel()
        keep = max(1, n - fraction_count(n, sparsity))
        if not self.regrow:
            scores = scores.float().masked_fill(~current, -math.inf)
            keep = min(keep, int(current.sum()))
        return topk_mask(scores, keep, prefer=current)


def latent_sign(latent: torch.Tensor, min_density: float = 0.0) -> torch.Tensor:
    """AUX: keep an entry while its latent score is positive; with ``min_density`` > 0, keep at least
    that fraction of the entries (those with the highest scores) whatever their sign."""
    keep = latent > 0
    floor = math.ceil(min_density * latent.numel())
    if floor and int(keep.sum()) < floor:
        keep = torch.zeros_like(keep).view(-1)
        keep[torch.topk(latent.reshape(-1), floor).indices] = True
        keep = keep.view_as(latent)
    return keep
