"""Importance of embedding columns, per table, for dimension masks (SPEC 3, kept deliberately small).

A table's column ``c`` is one dimension of every feature that reads the table, so it is scored as a
unit: by the L2 norm of the column over the table's rows (magnitude), or by the squared first-order loss
change of zeroing it in the pooled output, ``(sum over batch and features of g * v)^2`` (Taylor), with
``v`` the pooled column and ``g`` its gradient. Pooled outputs exist on sharded and unsharded tables
alike, so the Taylor score needs no access to the table weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch.utils.hooks import RemovableHandle
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_prune.importance.reduce import all_reduce_mean_
from torchrec_prune.importance.state import Stateless, accumulator, check_keys, cpu_clones
from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.surgery import embedding_weight_blocks

TableKey = tuple[str, str]  # (module FQN, table name)


class ColumnScorer(Protocol):
    """Importance of every column of every table of a set of ``MaskedEmbeddingBagCollection``s.

    Its state (what it accumulated) is checkpointed with its pruner's, for exact resume.
    """

    def attach(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> None: ...

    def observe(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> None: ...

    def scores(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> dict[TableKey, torch.Tensor]: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _zeros(module: MaskedEmbeddingBagCollection, table: str) -> torch.Tensor:
    mask = module.dim_mask(table)
    return torch.zeros(mask.numel(), device=mask.device)


def _column_accumulator(
    store: dict[TableKey, torch.Tensor], fqn: str, module: MaskedEmbeddingBagCollection, table: str
) -> torch.Tensor:
    mask = module.dim_mask(table)
    return accumulator(store, (fqn, table), (mask.numel(),), mask.device, "ColumnTaylor")


class ColumnMagnitude(Stateless):
    """L2 norm of each column over all rows of the table (every local shard contributes its rows)."""

    def attach(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> None:
        return None

    def observe(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> None:
        return None

    @torch.no_grad()
    def scores(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> dict[TableKey, torch.Tensor]:
        squares: dict[TableKey, torch.Tensor] = {}
        for fqn, module in sorted(modules.items()):
            for config in module.embedding_bag_configs():
                squares[(fqn, config.name)] = _zeros(module, config.name)
            for table, block, col0, _ in embedding_weight_blocks(module):
                acc = squares[(fqn, table)]
                acc[col0 : col0 + block.shape[1]] += block.float().square().sum(dim=0).to(acc.device)
        # Row-wise shards hold disjoint rows: the rank mean is the full sum over a constant factor.
        all_reduce_mean_(list(squares.values()))
        return {key: value.sqrt() for key, value in squares.items()}

    def close(self) -> None:
        return None


class ColumnTaylor:
    """Squared first-order loss change of zeroing each table column, averaged over observed batches.

    ``attach`` registers forward hooks that capture the pooled output and its gradient; ``close``
    removes them.
    """

    def __init__(self) -> None:
        self._sums: dict[TableKey, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self.batches = 0

    def attach(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> None:
        for fqn, module in modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(fqn)))

    def _forward_hook(self, fqn: str):
        def hook(module: MaskedEmbeddingBagCollection, _inputs: tuple, output: KeyedTensor) -> None:
            values = output.values()
            if not values.requires_grad:
                return
            keys, lengths, pooled = output.keys(), output.length_per_key(), values.detach()

            def on_grad(grad: torch.Tensor) -> None:
                self._accumulate(fqn, module, keys, lengths, pooled, grad)

            values.register_hook(on_grad)

        return hook

    @torch.no_grad()
    def _accumulate(
        self,
        fqn: str,
        module: MaskedEmbeddingBagCollection,
        keys: list[str],
        lengths: list[int],
        pooled: torch.Tensor,
        grad: torch.Tensor,
    ) -> None:
        first_order = (grad * pooled).sum(dim=0).float()
        per_table: dict[str, torch.Tensor] = {}
        for key, part in zip(keys, first_order.split(lengths), strict=True):
            table = module.table_of(key)
            per_table[table] = per_table.get(table, 0) + part
        for table, change in per_table.items():
            acc = _column_accumulator(self._sums, fqn, module, table)
            acc += change.square().to(acc.device)

    def observe(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> None:
        self.batches += 1

    @torch.no_grad()
    def scores(self, modules: Mapping[str, MaskedEmbeddingBagCollection]) -> dict[TableKey, torch.Tensor]:
        sums = {
            (fqn, config.name): _column_accumulator(self._sums, fqn, module, config.name)
            for fqn, module in sorted(modules.items())
            for config in module.embedding_bag_configs()
        }
        all_reduce_mean_(list(sums.values()))
        return {key: acc / max(self.batches, 1) for key, acc in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        """Sums as ``{module FQN: {table: tensor}}`` (string keys all the way down) and the batch count."""
        sums: dict[str, dict[str, torch.Tensor]] = {}
        for (fqn, table), acc in cpu_clones(self._sums).items():
            sums.setdefault(fqn, {})[table] = acc
        return {"sums": sums, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore onto the CPU; each sum moves to its table's device when the scorer next uses it."""
        check_keys("ColumnTaylor", state, ["sums", "batches"])
        self._sums = cpu_clones(
            {(fqn, t): acc for fqn, tables in state["sums"].items() for t, acc in tables.items()}
        )
        self.batches = state["batches"]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
