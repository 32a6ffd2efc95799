"""Mask-aware wrappers composed around TorchRec embedding collections (SPEC 3).

A wrapper holds the collection as a child (``ebc`` for pooled ``EmbeddingBagCollection`` and
``FusedEmbeddingBagCollection``, ``ec`` for sequence ``EmbeddingCollection``) instead of subclassing it:
DMP picks sharders by exact module type, so the inner collection keeps its sharder and gets the same
per-table plan as the unwrapped model. Masks act on the collection's output, which works the same on
sharded and unsharded tables.

A wrapper also loads the state dict of the plain collection it replaced (keys without the child's
segment and without masks, e.g. a checkpoint written before ``wrap``): the keys are moved under the
child and the masks load open.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    EmbeddingCollection,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor


class MaskedEmbeddings(nn.Module):
    """Per-table dimension masks and per-feature gates over one embedding collection (the base of both
    wrappers; ``inner`` is the wrapped collection, registered under the child name ``inner_name``).

    Buffers (in ``state_dict``): ``dim_masks.<table>`` (bool, one entry per embedding column of the
    table) and ``feature_gate`` (bool, one entry per feature, in table order). An output column of a
    feature is kept when both its table's dimension mask and the feature's gate are set.

    Masks are small, so they are created on a real device even when the collection lives on ``meta``:
    DMP moves them with the dense part instead of materialising them as zeros.

    Args:
        inner: the collection to wrap; its parameters are not copied.
        configs: its table configs (kept here: a DMP-sharded collection no longer has them).
    """

    inner_name: str
    weight_prefix: str  # state-dict path of the tables inside the collection
    feature_gate: torch.Tensor

    def __init__(self, inner: nn.Module, configs: Sequence[BaseEmbeddingConfig]) -> None:
        super().__init__()
        self.add_module(self.inner_name, inner)
        self._configs = list(configs)
        device = _mask_device(inner)
        self.dim_masks = nn.Module()
        self._feature_tables: list[tuple[str, str, int]] = []
        for config in self._configs:
            self.dim_masks.register_buffer(
                config.name, torch.ones(config.embedding_dim, dtype=torch.bool, device=device)
            )
            for feature in config.feature_names:
                self._feature_tables.append((feature, config.name, config.embedding_dim))
        self.register_buffer(
            "feature_gate", torch.ones(len(self._feature_tables), dtype=torch.bool, device=device)
        )
        self._derived_cache: _Derived | None = None
        self._register_load_state_dict_pre_hook(_load_plain_collection, with_module=True)

    @property
    def inner(self) -> nn.Module:
        """The wrapped collection (after DMP: its sharded counterpart)."""
        return getattr(self, self.inner_name)

    @property
    def feature_names(self) -> list[str]:
        return [feature for feature, _, _ in self._feature_tables]

    @property
    def table_names(self) -> list[str]:
        return [config.name for config in self._configs]

    def table_of(self, feature: str) -> str:
        for name, table, _ in self._feature_tables:
            if name == feature:
                return table
        raise KeyError(f"{feature!r} is not a feature of this {type(self).__name__}: {self.feature_names}")

    def dim_mask(self, table: str) -> torch.Tensor:
        if not hasattr(self.dim_masks, table):
            raise KeyError(f"no table {table!r}; tables: {self.table_names}")
        return getattr(self.dim_masks, table)

    def weight_key(self, table: str) -> str:
        """State-dict key of ``table``'s weight relative to the inner collection."""
        return f"{self.weight_prefix}.{table}.weight"

    def mask_buffers(self) -> dict[str, torch.Tensor]:
        """Every mask buffer by its state-dict name relative to this module."""
        masks = {f"dim_masks.{table}": self.dim_mask(table) for table in self.table_names}
        return {**masks, "feature_gate": self.feature_gate}

    def reset_parameters(self) -> None:
        """Open every mask (the inner collection initialises its own weights)."""
        with torch.no_grad():
            for buf in self.mask_buffers().values():
                buf.fill_(True)

    def _derived(self) -> _Derived:
        """``_derive()`` of the masks, rebuilt only when a mask was replaced or written in place.

        Keyed on identities and versions (read straight from the buffer dicts: the forward runs this
        every step), so a load, prune or grow invalidates it and the forward pays no host sync while
        masks stay put.
        """
        masks = (*self._modules["dim_masks"]._buffers.values(), self._buffers["feature_gate"])
        key = (*map(id, masks), *map(_VERSION, masks))
        derived = self._derived_cache
        if derived is None or derived.key != key:
            derived = self._derived_cache = _Derived(key, masks, self._derive(), {})
        return derived

    def _derive(self) -> Any:
        """What the forward needs from the masks (each wrapper's own); may cost a host sync."""
        raise NotImplementedError


class MaskedEmbeddingBagCollection(MaskedEmbeddings):
    """Masks over the pooled output of an ``EmbeddingBagCollection`` (also a subclass of it or a
    ``FusedEmbeddingBagCollection``), held as child ``ebc``.

    Args:
        ebc: the collection to wrap; its parameters are not copied.

    Example::

        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0"])])
        masked = MaskedEmbeddingBagCollection(ebc)
        masked.dim_masks.t0[3] = False  # column 3 of every feature of table t0 is now zero
    """

    inner_name = "ebc"
    weight_prefix = "embedding_bags"
    ebc: EmbeddingBagCollectionInterface

    def __init__(self, ebc: EmbeddingBagCollectionInterface) -> None:
        super().__init__(ebc, ebc.embedding_bag_configs())

    # TorchRec models read these from the EBC they hold; delegating keeps model code unchanged.
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs  # type: ignore[return-value]

    def column_mask(self) -> torch.Tensor | None:
        """Mask over the concatenated pooled columns, or ``None`` when every column is kept."""
        return self._derived().value

    def _derive(self) -> torch.Tensor | None:
        parts = [
            self.dim_mask(table) & self.feature_gate[i]
            for i, (_, table, _) in enumerate(self._feature_tables)
        ]
        column = torch.cat(parts)
        return None if bool(column.all()) else column

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.ebc(features)
        derived = self._derived()
        if derived.value is None:
            return pooled
        keys, values = pooled.keys(), pooled.values()
        spec = (tuple(keys), values.device, values.dtype)
        scale = derived.casts.get(spec)
        if scale is None:  # once per mask change: the output's key order, device and dtype
            order = [self.feature_names.index(k) for k in keys]
            scale = torch.cat([derived.value.split(self._dims())[i] for i in order])
            scale = derived.casts[spec] = scale.to(device=values.device, dtype=values.dtype)
        return KeyedTensor(
            keys=keys, length_per_key=pooled.length_per_key(), values=values * scale, key_dim=pooled.key_dim()
        )

    def _dims(self) -> list[int]:
        return [dim for _, _, dim in self._feature_tables]


class MaskedEmbeddingCollection(MaskedEmbeddings):
    """Masks over the per-id (jagged) output of an ``EmbeddingCollection``, held as child ``ec``.

    Every embedding row a feature returns has its table's closed columns zeroed, and a gated feature
    returns zeros of the same jagged shape (so sequence models downstream keep their lengths).

    Args:
        ec: the collection to wrap; its parameters are not copied.

    Example::

        ec = EmbeddingCollection(tables=[EmbeddingConfig(
            name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0"])])
        masked = MaskedEmbeddingCollection(ec)
        masked.dim_masks.t0[3] = False  # column 3 of every id of feature f0 is now zero
    """

    inner_name = "ec"
    weight_prefix = "embeddings"
    ec: EmbeddingCollection

    def __init__(self, ec: EmbeddingCollection) -> None:
        super().__init__(ec, ec.embedding_configs())
        names = [name for table in get_embedding_names_by_table(self._configs) for name in table]
        # Output keys are embedding names (the feature, or ``feature@table`` for a feature of two tables).
        self._output_index = {name: i for i, name in enumerate(names)}

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return self._configs  # type: ignore[return-value]

    def row_masks(self) -> list[torch.Tensor | None]:
        """Per feature (table order), the mask over its embedding columns, ``None`` when all are kept."""
        return self._derived().value

    def _derive(self) -> list[torch.Tensor | None]:
        masks = [
            self.dim_mask(table) & self.feature_gate[i]
            for i, (_, table, _) in enumerate(self._feature_tables)
        ]
        return [None if bool(m.all()) else m for m in masks]

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        embeddings = self.ec(features)
        derived = self._derived()
        if all(m is None for m in derived.value):
            return embeddings
        out: dict[str, JaggedTensor] = {}
        for name, jt in embeddings.items():
            index = self._output_index[name]
            mask = derived.value[index]
            if mask is None:
                out[name] = jt
                continue
            values = jt.values()
            spec = (index, values.device, values.dtype)
            scale = derived.casts.get(spec)
            if scale is None:  # once per mask change
                scale = derived.casts[spec] = mask.to(device=values.device, dtype=values.dtype)
            out[name] = JaggedTensor(
                values=values * scale,
                lengths=jt.lengths(),
                weights=jt.weights_or_none(),
            )
        return out


_VERSION = attrgetter("_version")  # a tensor's in-place write counter


@dataclass(frozen=True)
class _Derived:
    """What a wrapper derives from its masks, valid while ``key`` (their ids and versions) holds."""

    key: tuple[int, ...]
    masks: tuple[torch.Tensor, ...]  # held, so that no new tensor takes one of the keyed ids
    value: Any
    casts: dict[Hashable, torch.Tensor]  # ``value`` in an output's order, device and dtype


def _load_plain_collection(
    module: MaskedEmbeddings,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook: move a plain collection's keys under the child, open missing masks.

    A state dict with none of this wrapper's mask keys but with its collection's keys at the wrapper's
    own path is one written before ``wrap``: it loads as if the model had never been wrapped.
    """
    own = (f"{prefix}{module.inner_name}.", f"{prefix}dim_masks.", f"{prefix}feature_gate")
    plain = [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]
    masks = {prefix + name: buf for name, buf in module.mask_buffers().items()}
    if not plain or any(k in state_dict for k in masks):
        return
    for key in plain:
        state_dict[f"{prefix}{module.inner_name}.{key[len(prefix) :]}"] = state_dict.pop(key)
    for key, buf in masks.items():
        state_dict[key] = torch.ones_like(buf)


def _mask_device(inner: nn.Module) -> torch.device:
    for p in inner.parameters():
        return torch.device("cpu") if p.device.type == "meta" else p.device
    return torch.device("cpu")
