"""Mask-aware wrapper composed around a TorchRec ``EmbeddingBagCollection`` (SPEC 3).

The wrapper holds the EBC as its child ``ebc`` instead of subclassing it: DMP picks sharders by exact
module type, so the inner EBC keeps its sharder and gets the same per-table plan as the unwrapped model.
Masks act on the pooled output, which works the same on sharded and unsharded tables.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class MaskedEmbeddingBagCollection(nn.Module):
    """Per-table dimension masks and per-feature gates over an ``EmbeddingBagCollection``'s output.

    Buffers (in ``state_dict``): ``dim_masks.<table>`` (bool, one entry per embedding column of the
    table) and ``feature_gate`` (bool, one entry per feature, in the EBC's output key order). A pooled
    column is kept when both its table's dimension mask and its feature's gate are set.

    Masks are small, so they are created on a real device even when the EBC lives on ``meta``: DMP
    moves them with the dense part instead of materialising them as zeros.

    Args:
        ebc: the collection to wrap; its parameters are not copied.

    Example::

        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0"])])
        masked = MaskedEmbeddingBagCollection(ebc)
        masked.dim_masks.t0[3] = False  # column 3 of every feature of table t0 is now zero
    """

    feature_gate: torch.Tensor

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.ebc = ebc
        # Kept here: after DMP, ``ebc`` is a ShardedEmbeddingBagCollection without this method.
        self._configs: list[EmbeddingBagConfig] = list(ebc.embedding_bag_configs())
        configs = self._configs
        device = _mask_device(ebc)
        self.dim_masks = nn.Module()
        self._feature_tables: list[tuple[str, str, int]] = []
        for config in configs:
            self.dim_masks.register_buffer(
                config.name, torch.ones(config.embedding_dim, dtype=torch.bool, device=device)
            )
            for feature in config.feature_names:
                self._feature_tables.append((feature, config.name, config.embedding_dim))
        self.register_buffer(
            "feature_gate", torch.ones(len(self._feature_tables), dtype=torch.bool, device=device)
        )
        self._column_cache: tuple[tuple[int, ...], torch.Tensor | None] | None = None

    # TorchRec models read these from the EBC they hold; delegating keeps model code unchanged.
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    @property
    def feature_names(self) -> list[str]:
        return [feature for feature, _, _ in self._feature_tables]

    def table_of(self, feature: str) -> str:
        for name, table, _ in self._feature_tables:
            if name == feature:
                return table
        raise KeyError(f"{feature!r} is not a feature of this EmbeddingBagCollection: {self.feature_names}")

    def dim_mask(self, table: str) -> torch.Tensor:
        if not hasattr(self.dim_masks, table):
            raise KeyError(f"no table {table!r}; tables: {[c.name for c in self.embedding_bag_configs()]}")
        return getattr(self.dim_masks, table)

    def reset_parameters(self) -> None:
        """Open every mask (the inner EBC initialises its own weights)."""
        with torch.no_grad():
            self.feature_gate.fill_(True)
            for buf in self.dim_masks.buffers():
                buf.fill_(True)

    def column_mask(self) -> torch.Tensor | None:
        """Mask over the concatenated pooled columns, or ``None`` when every column is kept."""
        masks = [self.feature_gate, *self.dim_masks.buffers()]
        key = tuple(m._version for m in masks) + tuple(id(m) for m in masks)
        if self._column_cache is None or self._column_cache[0] != key:
            parts = [
                self.dim_mask(table) & self.feature_gate[i]
                for i, (_, table, _) in enumerate(self._feature_tables)
            ]
            column = torch.cat(parts)
            self._column_cache = (key, None if bool(column.all()) else column)
        return self._column_cache[1]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.ebc(features)
        column = self.column_mask()
        if column is None:
            return pooled
        order = [self.feature_names.index(k) for k in pooled.keys()]
        if order != list(range(len(order))):
            column = torch.cat([column.split(self._dims())[i] for i in order])
        return KeyedTensor(
            keys=pooled.keys(),
            length_per_key=pooled.length_per_key(),
            values=pooled.values() * column.to(device=pooled.values().device, dtype=pooled.values().dtype),
            key_dim=pooled.key_dim(),
        )

    def _dims(self) -> list[int]:
        return [dim for _, _, dim in self._feature_tables]


def _mask_device(ebc: nn.Module) -> torch.device:
    for p in ebc.parameters():
        return torch.device("cpu") if p.device.type == "meta" else p.device
    return torch.device("cpu")
