"""The top-k rule picks exactly what a full stable ranking picks (score, then open entries, then index)."""

import math

import pytest
import torch

from torchrec_prune.pruners.rules import topk_mask


def _ranked(scores: torch.Tensor, keep: int, prefer: torch.Tensor | None) -> torch.Tensor:
    """The definition: rank by score (NaN as -inf) descending, ties by prefer, then by lower index."""
    flat = torch.nan_to_num(scores.reshape(-1).float(), nan=-math.inf)
    order = torch.arange(flat.numel())
    if prefer is not None:
        order = torch.sort(prefer.reshape(-1).int(), descending=True, stable=True).indices
    ranked = order[torch.sort(flat[order], descending=True, stable=True).indices]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[ranked[:keep]] = True
    return mask.view(scores.shape)


@pytest.mark.parametrize("seed", range(5))
def test_selection_equals_the_full_ranking_with_ties_nan_and_inf(seed):
    g = torch.Generator().manual_seed(seed)
    for trial in range(200):
        n = int(torch.randint(1, 60, (1,), generator=g))
        scores = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        scores[torch.rand(n, generator=g) < 0.1] = float("nan")
        scores[torch.rand(n, generator=g) < 0.1] = -math.inf
        prefer = torch.rand(n, generator=g) < 0.5 if trial % 2 else None
        keep = int(torch.randint(0, n + 1, (1,), generator=g))
        mask = topk_mask(scores.view(1, n), keep, None if prefer is None else prefer.view(1, n))
        assert int(mask.sum()) == keep
        assert torch.equal(mask, _ranked(scores.view(1, n), keep, prefer))
