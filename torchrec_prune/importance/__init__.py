"""Importance scorers: what a weight, a neuron or an embedding column is worth to the loss.

Scorers only measure; turning scores into masks (``pruners.rules``) and deciding when to do it
(``pruners.schedules``) are separate, so an algorithm is a composition of the three.
"""

from torchrec_prune.importance.embedding import ColumnMagnitude, ColumnScorer, ColumnTaylor
from torchrec_prune.importance.neuron import NeuronTaylor
from torchrec_prune.importance.reduce import all_reduce_mean_, is_distributed
from torchrec_prune.importance.weight import (
    Magnitude,
    Momentum,
    Taylor,
    WeightScorer,
    combined_importance,
    mean_normalized,
)

__all__ = [
    "ColumnMagnitude",
    "ColumnScorer",
    "ColumnTaylor",
    "Magnitude",
    "Momentum",
    "NeuronTaylor",
    "Taylor",
    "WeightScorer",
    "all_reduce_mean_",
    "combined_importance",
    "is_distributed",
    "mean_normalized",
]
