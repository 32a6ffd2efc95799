"""Which server shard owns which parameter, and the mask each owned tensor obeys.

Embedding rows are sharded by row id (``id % shards``, every table), so a batch's rows spread over all
shards and no shard holds a hot table alone; dense tensors are assigned whole, largest first to the
least-loaded shard. The layout is derived from the wrapped model itself, so the trainers' model, the
server's tensors and the driver's mask replica agree on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from torchrec_prune.distributed.ps.messages import as_tensor
from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.linear import MaskedLinear


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: its parameter FQN, its features and its row width."""

    name: str
    param: str
    module: str
    features: tuple[str, ...]
    num_embeddings: int
    dim: int


@dataclass(frozen=True)
class ParamLayout:
    """Parameter names, shapes and owners of a wrapped model on ``shards`` server shards.

    Args:
        dense: dense parameter FQN -> shape.
        dense_owner: dense parameter FQN -> shard.
        tables: table name -> spec.
        linear_of: FQN of a ``MaskedLinear`` weight or bias -> FQN of its module.
        shards: number of shards.

    Example::

        layout = ParamLayout.from_model(wrap(build_dlrm()), shards=2)
        layout.row_owner(np.array([0, 1, 2]))  # [0, 1, 0]
    """

    dense: dict[str, tuple[int, ...]]
    dense_owner: dict[str, int]
    tables: dict[str, TableSpec]
    linear_of: dict[str, str]
    shards: int

    @classmethod
    def from_model(cls, model: nn.Module, shards: int) -> ParamLayout:
        tables: dict[str, TableSpec] = {}
        linear_of: dict[str, str] = {}
        for fqn, module in model.named_modules():
            if isinstance(module, MaskedEmbeddingBagCollection):
                for config in module.embedding_bag_configs():
                    tables[config.name] = TableSpec(
                        name=config.name,
                        param=f"{fqn}.ebc.embedding_bags.{config.name}.weight",
                        module=fqn,
                        features=tuple(config.feature_names),
                        num_embeddings=config.num_embeddings,
                        dim=config.embedding_dim,
                    )
            elif isinstance(module, MaskedLinear):
                linear_of[f"{fqn}.weight"] = fqn
                if module.bias is not None:
                    linear_of[f"{fqn}.bias"] = fqn
        table_params = {spec.param for spec in tables.values()}
        dense = {n: tuple(p.shape) for n, p in model.named_parameters() if n not in table_params}
        load = [0] * shards
        owner: dict[str, int] = {}
        for name in sorted(dense, key=lambda n: (-int(np.prod(dense[n])), n)):
            shard = load.index(min(load))
            owner[name] = shard
            load[shard] += int(np.prod(dense[name]))
        return cls(dense=dense, dense_owner=owner, tables=tables, linear_of=linear_of, shards=shards)

    def row_owner(self, ids: np.ndarray) -> np.ndarray:
        return ids % self.shards

    @cached_property
    def key_bases(self) -> np.ndarray:
        """Global key of each table's row 0, tables in layout order: a row's key is its table's base plus
        its id, so one sorted array of keys names rows of every table (what messages carry)."""
        sizes = [spec.num_embeddings for spec in self.tables.values()]
        return np.cumsum([0, *sizes[:-1]]).astype(np.int64)

    def keys(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Global keys of rows ``ids`` of ``table``."""
        return self.key_bases[list(self.tables).index(table)] + np.asarray(ids, dtype=np.int64)

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Table index (layout order) and id of each global key."""
        table = np.searchsorted(self.key_bases, keys, side="right") - 1
        return table, keys - self.key_bases[table]

    def local_rows(self, ids: np.ndarray) -> np.ndarray:
        """Index of global rows ``ids`` inside their owner's block."""
        return ids // self.shards

    def owned_rows(self, table: str, shard: int) -> int:
        n = self.tables[table].num_embeddings
        return max(0, (n - shard + self.shards - 1) // self.shards)

    def owned_dense(self, shard: int) -> list[str]:
        return sorted(n for n, s in self.dense_owner.items() if s == shard)

    def feature_table(self) -> dict[str, str]:
        return {f: spec.name for spec in self.tables.values() for f in spec.features}

    def split_state(self, state: dict[str, torch.Tensor], shard: int) -> dict[str, np.ndarray]:
        """The part of a full model state (``named_parameters``) that ``shard`` owns, as numpy."""
        out = {name: state[name].detach().cpu().numpy().copy() for name in self.owned_dense(shard)}
        for spec in self.tables.values():
            out[spec.param] = state[spec.param].detach().cpu().numpy()[shard :: self.shards].copy()
        return out

    def merge_states(self, parts: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Inverse of ``split_state`` over every shard: the full parameters."""
        full: dict[str, torch.Tensor] = {}
        for shard, part in enumerate(parts):
            for name in self.owned_dense(shard):
                full[name] = as_tensor(part[name]).clone()
        for spec in self.tables.values():
            weight = torch.empty(spec.num_embeddings, spec.dim)
            for shard, part in enumerate(parts):
                weight[shard :: self.shards] = as_tensor(part[spec.param])
            full[spec.param] = weight
        return full


def mask_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every mask buffer of the model's mask-aware modules, by FQN (what the server distributes)."""
    out: dict[str, torch.Tensor] = {}
    for fqn, module in model.named_modules():
        if isinstance(module, (MaskedLinear, MaskedEmbeddingBagCollection)):
            for name, buf in module.named_buffers():
                out[f"{fqn}.{name}"] = buf
    return out


def keep_mask(layout: ParamLayout, name: str, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The bool mask of the entries of parameter ``name`` that are open, and whether closed ones are zero.

    A Linear's weight keeps ``weight_mask & neuron_mask & input_mask`` (closed entries are exact zeros;
    a layer holds no ``weight_mask`` while every element is open);
    its bias keeps ``neuron_mask`` but a closed bias keeps its value (see ``set_linear_masks_``); a table
    keeps the columns of its ``dim_masks`` entry (shape ``[1, dim]``, broadcast over rows).
    """
    if name in layout.linear_of:
        module = layout.linear_of[name]
        neuron = masks[f"{module}.neuron_mask"]
        if name.endswith(".bias"):
            return neuron.clone(), False
        keep = neuron.unsqueeze(1) & masks[f"{module}.input_mask"].unsqueeze(0)
        element = masks.get(f"{module}.weight_mask")  # absent while every element is open
        return (keep & element if element is not None else keep.clone()), True
    for spec in layout.tables.values():
        if spec.param == name:
            return masks[f"{spec.module}.dim_masks.{spec.name}"].unsqueeze(0).clone(), True
    raise KeyError(f"parameter {name!r} has no mask")


def has_mask(layout: ParamLayout, name: str) -> bool:
    return name in layout.linear_of or any(spec.param == name for spec in layout.tables.values())
