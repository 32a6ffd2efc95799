"""Neuron (output-row) importance for structured pruning (SPEC 5, growth paper section III-C).

``I_t = (sum_j g_tj * theta_tj)^2`` is the squared first-order change of the loss when row ``t`` of a
Linear is removed; it is computed per batch and averaged over the batches of an evaluation window.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchrec_prune.importance.reduce import all_reduce_mean_
from torchrec_prune.importance.state import accumulator, check_keys, cpu_clones
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
            acc = self._accumulator(fqn, layer)
            if layer.weight.grad is not None:
                acc.add_((layer.weight.grad * layer.weight).sum(dim=1).float().square())
        self.batches += 1

    @torch.no_grad()
    def scores(self, layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
        """Per-layer mean of ``I_t`` over the observed batches, averaged over ranks."""
        sums = {fqn: self._accumulator(fqn, layer) for fqn, layer in sorted(layers.items())}
        all_reduce_mean_(list(sums.values()))
        return {fqn: acc / max(self.batches, 1) for fqn, acc in sums.items()}

    def reset(self) -> None:
        """Start a new evaluation window."""
        self._sums.clear()
        self.batches = 0

    def _accumulator(self, fqn: str, layer: MaskedLinear) -> torch.Tensor:
        return accumulator(self._sums, fqn, (layer.out_features,), layer.weight.device, "NeuronTaylor")

    def state_dict(self) -> dict[str, Any]:
        """The open window's sums (CPU copies) and batch count."""
        return {"sums": cpu_clones(self._sums), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto the CPU; each sum moves to its layer's device when the scorer next uses it."""
        check_keys("NeuronTaylor", state, ["sums", "batches"])
        self._sums = cpu_clones(state["sums"])
        self.batches = state["batches"]
