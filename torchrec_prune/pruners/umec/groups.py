"""UMEC's groups: the units of a model that are removed together (SPEC 7).

A *group layer* is a set of groups of one kind, among which UMEC learns how many to remove:

- ``neurons:<fqn>``: the output neurons of a hidden ``MaskedLinear``; neuron ``t`` is row ``t`` of the
  layer (with its bias) and column ``t`` of the Linear that reads it (``neuron_successors``).
- ``features:<ebc>``: the sparse features of a DLRM, each group the columns of the top MLP's first
  Linear that read it (its dot products, ``DLRMLayout.pair_columns``) and its feature gate.
- ``dims:<ebc>``: DLRM's embedding dimension, reduced in common: group ``k`` is column ``k`` of every
  table, output ``k`` of the bottom MLP and dense column ``k`` of the top MLP's first Linear.
- ``features:<ebc>`` of a model that concatenates the pooled embeddings into a Linear's input
  (``ConcatLayout``, found with a probe forward): each group the columns of that Linear reading one
  feature, and its feature gate.

A group's size is the L2 norm of all the weights it holds. Every row or column belongs to at most one
group layer, so the layers' removals add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.layout import ConcatLayout, dlrm_layouts
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.surgery import embedding_weight_blocks, prune_
from torchrec_prune.pruners.structured import neuron_successors
from torchrec_prune.pruners.targets import Targets

Index = tuple[torch.Tensor, torch.Tensor]  # (row or column index, group id), one entry per pair
Blocks = dict[str, list[tuple[str, torch.Tensor, int]]]  # EBC FQN -> (table, weight block, first column)


@dataclass
class GroupLayer:
    """One group layer: ``size`` groups and what each group holds.

    Args:
        name: ``<kind>:<fqn>``.
        size: number of groups.
        rows: Linear FQN -> (row index, group id): rows (with bias) of the group; closed by
            ``neuron_mask``.
        cols: Linear FQN -> (column index, group id): input columns of the group; closed by
            ``input_mask``.
        tables: EBC FQN -> tables whose column ``g`` belongs to group ``g``; closed by ``dim_masks``.
        features: EBC FQN -> feature index of group ``g``; closed by ``feature_gate``.
    """

    name: str
    size: int
    rows: dict[str, Index] = field(default_factory=dict)
    cols: dict[str, Index] = field(default_factory=dict)
    tables: dict[str, tuple[str, ...]] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.name.partition(":")[0]


def _ids(n: int) -> Index:
    ids = torch.arange(n)
    return ids, ids


def neuron_layers(model: nn.Module, targets: Targets) -> list[GroupLayer]:
    """A ``neurons`` layer per hidden ``MaskedLinear`` selected by ``targets`` that has a successor."""
    layers = []
    modules = dict(model.named_modules())
    for producer, consumer in neuron_successors(model, targets.output_layer).items():
        if not targets.selects(producer):
            continue
        n = modules[producer].out_features
        layers.append(
            GroupLayer(f"neurons:{producer}", n, rows={producer: _ids(n)}, cols={consumer: _ids(n)})
        )
    return layers


def dlrm_layers(model: nn.Module, *, features: bool, dims: bool) -> list[GroupLayer]:
    """``features`` and ``dims`` layers of every wrapped DLRM with a dot interaction (``DLRMLayout``)."""
    layers = []
    for layout in dlrm_layouts(model):
        n = len(layout.features)
        if features and n > 1:
            cols = [layout.pair_columns(f) for f in range(n)]
            ids = torch.cat([torch.full((len(c),), f) for f, c in enumerate(cols)])
            layers.append(
                GroupLayer(
                    f"features:{layout.ebc}",
                    n,
                    cols={layout.top_first: (torch.cat(cols), ids)},
                    features={layout.ebc: torch.arange(n)},
                )
            )
        if dims and layout.dim > 1:
            ebc = model.get_submodule(layout.ebc)
            assert isinstance(ebc, MaskedEmbeddingBagCollection)
            layers.append(
                GroupLayer(
                    f"dims:{layout.ebc}",
                    layout.dim,
                    rows={layout.bottom_last: _ids(layout.dim)},
                    cols={layout.top_first: _ids(layout.dim)},
                    tables={layout.ebc: tuple(ebc.table_names)},
                )
            )
    return layers


def concat_feature_layers(model: nn.Module, layouts: Iterable[ConcatLayout]) -> list[GroupLayer]:
    """A ``features`` layer per concatenated collection with more than one feature: group ``g`` is the
    block of the reading Linear's columns that holds feature ``layout.blocks[g]``, and its gate."""
    layers = []
    for layout in layouts:
        if len(layout.blocks) < 2:
            continue
        ebc = model.get_submodule(layout.ebc)
        assert isinstance(ebc, MaskedEmbeddingBagCollection)
        cols = [torch.tensor(list(layout.columns(g))) for g in range(len(layout.blocks))]
        ids = torch.cat([torch.full((len(c),), g) for g, c in enumerate(cols)])
        gates = torch.tensor([ebc.feature_names.index(f) for f, _, _ in layout.blocks])
        layers.append(
            GroupLayer(
                f"features:{layout.ebc}",
                len(layout.blocks),
                cols={layout.linear: (torch.cat(cols), ids)},
                features={layout.ebc: gates},
            )
        )
    return layers


def check_disjoint(layers: Iterable[GroupLayer]) -> None:
    """Raise if a row, column, table column or feature belongs to two group layers."""
    owner: dict[tuple, str] = {}
    for layer in layers:
        units = [("row", fqn, int(i)) for fqn, (idx, _) in layer.rows.items() for i in idx]
        units += [("col", fqn, int(i)) for fqn, (idx, _) in layer.cols.items() for i in idx]
        units += [("table", fqn, t) for fqn, tables in layer.tables.items() for t in tables]
        units += [("feature", fqn, int(i)) for fqn, idx in layer.features.items() for i in idx]
        for unit in set(units):
            if unit in owner:
                raise ValueError(f"UMEC: {unit} belongs to both {owner[unit]!r} and {layer.name!r}")
            owner[unit] = layer.name


def table_blocks(layers: Iterable[GroupLayer], modules: Mapping[str, nn.Module]) -> Blocks:
    """The local weight blocks of every table a group layer holds (views of the live weights, taken
    once: ``embedding_weight_blocks`` reads the collection's state dict, too slow for every step).

    Tables held as one ``Parameter`` each (an unsharded collection) are first laid end to end in one
    buffer (``tile_tables_``), as a table-batched kernel holds its tables, so that the column norms
    read them in one pass and the proximal step shrinks a column of every table in one operation."""
    out: Blocks = {}
    for layer in layers:
        for fqn, tables in layer.tables.items():
            wanted = set(tables)
            tile_tables_([p for t, _, _, p in embedding_weight_blocks(modules[fqn]) if t in wanted])
            out[fqn] = [
                (t, block, col0) for t, block, col0, _ in embedding_weight_blocks(modules[fqn]) if t in wanted
            ]
    return out


@torch.no_grad()
def tile_tables_(blocks: list[nn.Parameter | None]) -> None:
    """Move the tables' ``Parameter``s (``embedding_weight_blocks``'s fourth field, one per block) into
    one buffer, end to end, in place: each keeps its identity, shape and values (optimizers, hooks and
    state dicts are unaffected) and its ``data`` becomes a view of the buffer. Left alone: blocks
    without a ``Parameter`` (shards of a sharded collection, a fused kernel's tables) and tables that
    differ in width, dtype or device, or are not contiguous."""
    params = [p for p in blocks if p is not None]
    if len(params) < 2 or len(params) < len(blocks):
        return
    first = params[0]
    if any(
        p.dim() != 2
        or p.shape[1] != first.shape[1]
        or p.dtype != first.dtype
        or p.device != first.device
        or not p.is_contiguous()
        for p in params
    ):
        return
    buffer = torch.cat([p.data.reshape(-1) for p in params])
    for p, view in zip(params, buffer.split([p.numel() for p in params]), strict=True):
        p.data = view.view(p.shape)


def _column_span(blocks: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor, int] | None:
    """How ``_column_squares`` reads float32 ``blocks`` of one width: a flat view over them when they
    tile one storage end to end in some order (``tile_tables_``'s or a table-batched kernel's tables;
    else ``None``: they are copied into the buffer), the buffer (empty when tiled), and the most rows up
    to 128 that divide their row count. ``None`` for other dtypes."""
    if any(b.dtype != torch.float32 for b in blocks):
        return None
    order = sorted(blocks, key=lambda b: b.data_ptr())
    first = order[0]
    tiled = all(b.is_contiguous() for b in order) and all(
        b.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
        for a, b in zip(order, order[1:], strict=False)
    )
    total = sum(b.numel() for b in order)
    flat = torch.as_strided(first, (total,), (1,), first.storage_offset()) if tiled else None
    rows = total // first.shape[1]
    fold = max(k for k in range(1, min(rows, 128) + 1) if rows % k == 0)
    return flat, first.new_empty(0 if tiled else total), fold


def _host(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a float32 numpy array: a view of a CPU float32 tensor, else a converted copy."""
    return tensor.detach().to("cpu", torch.float32).numpy()


@dataclass
class _Axis:
    """The rows (``dim`` 0, with the bias) or the columns (``dim`` 1) of one Linear that hold groups:
    ``groups[entry]`` is the global group of an entry (``GroupMap.size`` for none) where an entry is in
    one group at most, else the (entry, global group) pairs (DLRM's dot products, each in two feature
    groups), whose entries ``norms`` also keeps on the host (``entries``)."""

    dim: int
    bias: torch.Tensor | None
    layers: set[int]
    groups: torch.Tensor | Index
    entries: np.ndarray | None = None


class GroupMap:
    """Every group of every layer under one global number (the layers one after the other), and where
    its weights are: the group norms and the proximal step of all layers then take a few operations
    per Linear and table, instead of a dozen per layer and Linear, which cost more than the arithmetic
    on a small model. Weights are held as taken at construction (UMEC's phase replaces none).

    Args:
        layers: the group layers.
        modules: every module a layer acts on, by FQN (``touched_modules``).
        blocks: the local weight blocks of the tables the layers hold (``table_blocks``).
        device: where the weights, and so the per-entry maps, are.
    """

    def __init__(
        self,
        layers: list[GroupLayer],
        modules: Mapping[str, nn.Module],
        blocks: Blocks,
        device: torch.device,
    ) -> None:
        sizes = [layer.size for layer in layers]
        self.size = sum(sizes)  # entries of no group point at group `size`: factor 1, norm dropped
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.device = device
        pairs: dict[tuple[str, int], list[tuple[int, Index]]] = {}  # (Linear, dim) -> (layer, global pairs)
        # blocks by the global group of their column 0 and their width (all tables of a common dimension)
        self.tables: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.table_groups = (self.size, 0)
        for i, (layer, offset) in enumerate(zip(layers, self.offsets, strict=True)):
            for dim, parts in ((0, layer.rows), (1, layer.cols)):
                for fqn, (idx, gid) in parts.items():
                    pairs.setdefault((fqn, dim), []).append((i, (idx, gid + offset)))
            for fqn in layer.tables:
                for _, block, col0 in blocks[fqn]:
                    self.tables.setdefault((offset + col0, block.shape[1]), []).append(block)
            if layer.tables:  # the global groups that hold table columns
                lo, hi = self.table_groups
                self.table_groups = (min(lo, offset), max(hi, offset + layer.size))
        self.linears: dict[str, tuple[torch.Tensor, list[_Axis]]] = {}  # FQN -> (weight, its axes)
        for (fqn, dim), parts in pairs.items():
            weight, bias = modules[fqn].weight, modules[fqn].bias if dim == 0 else None
            idx = torch.cat([i for _, (i, _) in parts])
            gid = torch.cat([g for _, (_, g) in parts])
            groups: torch.Tensor | Index
            entries = None
            if len(idx.unique()) == len(idx):
                groups = torch.full((weight.shape[dim],), self.size).index_put_((idx,), gid).to(device)
            else:
                groups, entries = (idx.to(device), gid.to(device)), idx.numpy()
            axis = _Axis(dim, bias, {layer for layer, _ in parts}, groups, entries)
            self.linears.setdefault(fqn, (weight, []))[1].append(axis)
        # the global group of each value `norms` sums per Linear axis (its rows or columns, in order;
        # for shared entries, one value per (entry, group) pair), all axes one after the other
        self._norm_ids = np.concatenate(
            [
                (a.groups if isinstance(a.groups, torch.Tensor) else a.groups[1]).cpu().numpy()
                for _, axes in self.linears.values()
                for a in axes
            ]
            or [np.zeros(0, np.int64)]
        )
        self._spans: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor, int] | None] = {}

    @torch.no_grad()
    def norms(self) -> torch.Tensor:
        """Squared L2 norm of every group (this rank's share of sharded tables), float32 on ``device``.

        Summed on the host with numpy: ``einsum`` squares and sums a Linear's rows or columns in one
        pass without writing the squares, one ``bincount`` adds every axis's sums into their groups, and
        numpy's per-call cost is a fraction of torch's on vectors of a few hundred entries.
        """
        values = []
        for weight, axes in self.linears.values():
            w = _host(weight)
            for axis in axes:
                sums = np.einsum("ij,ij->i" if axis.dim == 0 else "ij,ij->j", w, w)
                if axis.bias is not None:
                    bias = _host(axis.bias)
                    sums += bias * bias
                values.append(sums if axis.entries is None else sums[axis.entries])
        weights = np.concatenate(values) if values else None
        out = np.bincount(self._norm_ids, weights=weights, minlength=self.size + 1)
        for (first, width), group in self.tables.items():
            out[first : first + width] += self._column_squares((first, width), group)
        return torch.from_numpy(out[:-1].astype(np.float32)).to(self.device)

    def _column_squares(self, key: tuple[int, int], blocks: list[torch.Tensor]) -> np.ndarray:
        """Sum over the rows of every block of each column's squares, read as one flat tensor of wide
        rows (``fold`` table rows each) in one pass, then folded to the ``width`` columns. On the CPU the
        pass is numpy's ``einsum``, which squares and sums without writing the squares: right after a
        training step has evicted the tables from cache it took 0.5 ms for 26 tables of 10k x 4 here,
        against 1.1 ms for torch's square-then-sum and 0.9 ms warm table by table."""
        if key not in self._spans:
            self._spans[key] = _column_span(blocks)
        span = self._spans[key]
        if span is None:
            return sum(np.einsum("ij,ij->j", b, b) for b in map(_host, blocks))
        flat, buffer, fold = span
        if flat is None:
            flat = torch.cat([b.reshape(-1) for b in blocks], out=buffer)
        rows = _host(flat.view(-1, fold * key[1]))
        return np.einsum("ij,ij->j", rows, rows).reshape(fold, key[1]).sum(0)

    @torch.no_grad()
    def shrink_(self, factor: torch.Tensor, layers: set[int]) -> None:
        """Multiply every weight of global group ``g`` by ``factor[g]`` (the proximal step), in place;
        only the weights of ``layers`` (the group layers with a factor other than 1) are touched.

        A table is multiplied a shrunk column at a time (strided, in place) while those are few: the
        proximal step shrinks the few smallest columns, and a pass over the whole table for them would
        cost as much as several such columns.
        """
        factor = torch.cat([factor, torch.ones(1)])
        on_device = factor.to(self.device)
        for weight, axes in self.linears.values():
            for axis in axes:
                if not axis.layers & layers:
                    continue
                if isinstance(axis.groups, torch.Tensor):
                    scale = on_device[axis.groups]
                else:  # the product of the factors of an entry's groups
                    idx, gid = axis.groups
                    scale = torch.zeros(weight.shape[axis.dim], device=self.device)
                    scale = scale.index_add_(0, idx, on_device[gid].log()).exp()
                scale = scale.to(weight.dtype)
                weight.mul_(scale.unsqueeze(1 - axis.dim))
                if axis.bias is not None:
                    axis.bias.mul_(scale)
        lo, hi = self.table_groups
        shrunk = [(g, f) for g, f in enumerate(factor[lo:hi].tolist(), lo) if f != 1.0]
        for (first, width), group in self.tables.items():
            mine = [(g - first, f) for g, f in shrunk if first <= g < first + width]
            span = self._spans.get((first, width))
            if span is not None and span[0] is not None:  # tiled: a column of every table at once
                group = [span[0].view(-1, width)]
            for block in group:
                if 4 * len(mine) <= width:
                    for c, f in mine:
                        block[:, c].mul_(f)
                elif mine:
                    block.mul_(factor[first : first + width].to(block.device, block.dtype).unsqueeze(0))


@torch.no_grad()
def close_groups(
    layer: GroupLayer,
    removed: torch.Tensor,
    modules: Mapping[str, nn.Module],
    optimizers: list[torch.optim.Optimizer],
) -> None:
    """Close the masks of the groups whose entry in the bool vector ``removed`` is set.

    Closed weights become exact zeros with fresh optimizer state (``prune_``), fused table state
    included.
    """
    for fqn, (idx, gid) in layer.rows.items():
        keep = torch.ones(modules[fqn].out_features, dtype=torch.bool)
        keep[idx[removed[gid]]] = False
        prune_(modules[fqn], optimizers, name=fqn, neuron_mask=keep)
    for fqn, (idx, gid) in layer.cols.items():
        keep = torch.ones(modules[fqn].in_features, dtype=torch.bool)
        keep[idx[removed[gid]]] = False
        prune_(modules[fqn], optimizers, name=fqn, input_mask=keep)
    for fqn, tables in layer.tables.items():
        ebc = modules[fqn]
        assert isinstance(ebc, MaskedEmbeddingBagCollection)
        prune_(ebc, optimizers, name=fqn, dim_masks={t: ~removed for t in tables})
    for fqn, feature_ids in layer.features.items():
        ebc = modules[fqn]
        assert isinstance(ebc, MaskedEmbeddingBagCollection)
        keep = torch.ones_like(ebc.feature_gate, device="cpu")
        keep[feature_ids[removed]] = False
        prune_(ebc, optimizers, name=fqn, feature_gate=keep)


def touched_modules(layers: Iterable[GroupLayer], modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Every module a group layer acts on, by FQN."""
    names: set[str] = set()
    for layer in layers:
        names |= set(layer.rows) | set(layer.cols) | set(layer.tables) | set(layer.features)
    return {fqn: modules[fqn] for fqn in sorted(names)}


def is_open(module: nn.Module) -> bool:
    """Whether every structured mask of ``module`` is open (UMEC starts from a model without removals)."""
    if isinstance(module, MaskedLinear):
        return bool(module.neuron_mask.all()) and bool(module.input_mask.all())
    if isinstance(module, MaskedEmbeddingBagCollection):
        return all(bool(m.all()) for m in module.mask_buffers().values())
    return True
