"""Per-layer sparsity of a wrapped model, read from its live masks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from torchrec_prune.masks.embedding import MaskedEmbeddings
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.wrap import masked_modules


@dataclass(frozen=True)
class LayerSparsity:
    """Kept vs total weights (or embedding columns / features) of one mask-aware module.

    Args:
        fqn: module path.
        kind: ``linear`` (weights), ``neurons`` (output rows), ``embedding_dims`` (table columns) or
            ``features`` (feature gates).
        kept: entries still open.
        total: all entries.
    """

    fqn: str
    kind: str
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


def sparsity_report(model: nn.Module) -> list[LayerSparsity]:
    """One row per mask kind per mask-aware module."""
    rows: list[LayerSparsity] = []
    for fqn, module in masked_modules(model):
        if isinstance(module, MaskedLinear):
            keep = module.weight_mask & module.neuron_mask.unsqueeze(1) & module.input_mask.unsqueeze(0)
            rows.append(LayerSparsity(fqn, "linear", int(keep.sum()), keep.numel()))
            rows.append(LayerSparsity(fqn, "neurons", int(module.neuron_mask.sum()), module.out_features))
        elif isinstance(module, MaskedEmbeddings):
            dims = [module.dim_mask(table) for table in module.table_names]
            kept, total = sum(int(d.sum()) for d in dims), sum(d.numel() for d in dims)
            rows.append(LayerSparsity(fqn, "embedding_dims", kept, total))
            gate = module.feature_gate
            rows.append(LayerSparsity(fqn, "features", int(gate.sum()), gate.numel()))
    return rows


def format_report(rows: list[LayerSparsity]) -> str:
    """A fixed-width table for the console."""
    width = max((len(r.fqn) for r in rows), default=10)
    lines = [f"{'module':<{width}}  {'kind':<14} {'kept':>9} {'total':>9} {'sparsity':>8}"]
    lines += [f"{r.fqn:<{width}}  {r.kind:<14} {r.kept:>9} {r.total:>9} {r.sparsity:>8.3f}" for r in rows]
    return "\n".join(lines)
