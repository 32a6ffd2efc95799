"""Per-layer sparsity of a wrapped model, read from its live masks, and what the masks cost in memory."""

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
            keep = module.kept_mask()
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


@dataclass(frozen=True)
class MaskMemory:
    """Bytes held by mask buffers against the parameters they mask (this process's tensors).

    Args:
        mask_bytes: bytes of every mask buffer held (an unheld, all-open element mask counts 0).
        fc_parameters: weights and biases of the ``MaskedLinear`` layers.
        table_parameters: embedding-table weights held locally by the wrapped collections.
    """

    mask_bytes: int
    fc_parameters: int
    table_parameters: int

    @property
    def bytes_per_fc_parameter(self) -> float:
        return self.mask_bytes / self.fc_parameters if self.fc_parameters else 0.0

    @property
    def bytes_per_parameter(self) -> float:
        total = self.fc_parameters + self.table_parameters
        return self.mask_bytes / total if total else 0.0


def mask_memory(model: nn.Module) -> MaskMemory:
    """What the masks of a wrapped model cost, per parameter.

    Example::

        memory = mask_memory(wrap(build_dlrm()))
        memory.bytes_per_fc_parameter  # ~0.01 until an element is pruned, then ~0.25 + that
    """
    from torchrec_prune.masks.surgery import embedding_weight_blocks

    mask_bytes = fc = tables = 0
    for _, module in masked_modules(model):
        if isinstance(module, MaskedLinear):
            masks = [module.element_mask(), module.neuron_mask, module.input_mask]
            fc += sum(p.numel() for p in (module.weight, module.bias) if p is not None)
        else:
            masks = list(module.mask_buffers().values())
            tables += sum(block.numel() for _, block, _, _ in embedding_weight_blocks(module))
        mask_bytes += sum(m.numel() * m.element_size() for m in masks if m is not None)
    return MaskMemory(mask_bytes, fc, tables)
