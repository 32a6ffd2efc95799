"""Neuron (output-row) importance for structured pruning (SPEC 5, growth paper section III-C).

``I_t = (sum_j g_tj * theta_tj)^2`` is the squared first-order change of the loss when row ``t`` of a
Linear is removed; it is computed per batch and averaged over the batches of an evaluation window.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from torchrec_prune.importance.reduce import all_reduce_mean_
from torchrec_prune.masks.linear import MaskedLinear


class NeuronTaylor:
    """Accumulate ``I_t`` per layer over observed batches; ``scores`` returns the window averages.

    Example::

        scorer = NeuronTaylor()
        for batch in window:
            model(batch)[0].backward()
            scorer.observe(layers)
        importances = scorer.scores(layers)  # fqn -> [out_features]
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.batches = 0

    @torch.no_grad()
    def observe(self, layers: Mapping[str, MaskedLinear]) -> None:
        for fqn, layer in sorted(layers.items()):
            acc = self._sums.setdefault(fqn, torch.zeros(layer.out_features, device=layer.weight.device))
            if layer.weight.grad is not None:
                acc.add_((layer.weight.grad * layer.weight).sum(dim=1).float().square())
        self.batches += 1

    @torch.no_grad()
    def scores(self, layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
        """Per-layer mean of ``I_t`` over the observed batches, averaged over ranks."""
        sums = {
            fqn: self._sums.setdefault(fqn, torch.zeros(layer.out_features, device=layer.weight.device))
            for fqn, layer in sorted(layers.items())
        }
        all_reduce_mean_(list(sums.values()))
        return {fqn: acc / max(self.batches, 1) for fqn, acc in sums.items()}

    def reset(self) -> None:
        """Start a new evaluation window."""
        self._sums.clear()
        self.batches = 0
