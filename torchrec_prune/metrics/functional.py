"""Per-window metric formulas (SPEC 2), computed from logits in float64.

CE works from logits (``BCE-with-logits`` never takes ``log(0)``); NE and accuracy reuse TorchRec's
formulas so numbers agree with TorchRec's metric modules; AUC is computed from average ranks because
TorchRec's AUC orders tied scores arbitrarily, which makes it depend on the order of the samples (and so
on how a window was split over ranks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchrec.metrics.accuracy import compute_accuracy_sum
from torchrec.metrics.ne import compute_ne

_ETA = 1e-12


def bce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of binary cross-entropies in nats, as a float64 scalar."""
    return F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="sum")


def correct_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of samples whose sigmoid score, thresholded at 0.5, equals the label."""
    ones = torch.ones_like(labels, dtype=torch.float64)
    return compute_accuracy_sum(labels.double(), torch.sigmoid(logits.double()), ones, threshold=0.5)


def normalized_entropy(ce_sum: float, positives: float, n: float) -> float:
    """CE divided by the entropy of the window's empirical CTR; NaN when that entropy is 0 (p in {0, 1})."""
    if n <= 0 or positives <= 0 or positives >= n:
        return math.nan
    ce_bits = torch.tensor(ce_sum / math.log(2.0), dtype=torch.float64)
    pos = torch.tensor(positives, dtype=torch.float64)
    total = torch.tensor(n, dtype=torch.float64)
    return float(compute_ne(ce_bits, total, pos, total - pos, _ETA))


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC with ties counted as half (Mann-Whitney U); NaN when one class is absent.

    Args:
        scores: any monotone score (logits are fine), one per sample.
        labels: binary labels (values above 0.5 count as positive).
    """
    scores = scores.detach().flatten().double()
    positive = labels.detach().flatten() > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1.0) / 2.0
    rank_sum = float(mean_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
