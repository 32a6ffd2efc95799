"""UMEC's groups: the units of a model that are removed together (SPEC 7).

A *group layer* is a set of groups of one kind, among which UMEC learns how many to remove:

- ``neurons:<fqn>``: the output neurons of a hidden ``MaskedLinear``; neuron ``t`` is row ``t`` of the
  layer (with its bias) and column ``t`` of the Linear that reads it (``neuron_successors``).
- ``features:<ebc>``: the sparse features of a DLRM, each group the columns of the top MLP's first
  Linear that read it (its dot products, ``DLRMLayout.pair_columns``) and its feature gate.
- ``dims:<ebc>``: DLRM's embedding dimension, reduced in common: group ``k`` is column ``k`` of every
  table, output ``k`` of the bottom MLP and dense column ``k`` of the top MLP's first Linear.

A group's size is the L2 norm of all the weights it holds. Every row or column belongs to at most one
group layer, so the layers' removals add up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.layout import dlrm_layouts
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
    once: ``embedding_weight_blocks`` reads the collection's state dict, too slow for every step)."""
    out: Blocks = {}
    for layer in layers:
        for fqn, tables in layer.tables.items():
            wanted = set(tables)
            out[fqn] = [
                (t, block, col0) for t, block, col0, _ in embedding_weight_blocks(modules[fqn]) if t in wanted
            ]
    return out


@torch.no_grad()
def squared_norms(
    layers: list[GroupLayer], modules: Mapping[str, nn.Module], blocks: Blocks
) -> list[torch.Tensor]:
    """Per layer, the squared L2 norm of every group (this rank's share of sharded tables)."""
    squares: dict[str, torch.Tensor] = {}

    def square(fqn: str) -> torch.Tensor:
        if fqn not in squares:
            squares[fqn] = modules[fqn].weight.detach().float().square()
        return squares[fqn]

    out = []
    for layer in layers:
        norms = torch.zeros(layer.size)
        for fqn, (idx, gid) in layer.rows.items():
            bias = modules[fqn].bias
            sq = square(fqn).sum(1)
            if bias is not None:
                sq = sq + bias.detach().float().square()
            norms.index_add_(0, gid, sq.cpu()[idx])
        for fqn, (idx, gid) in layer.cols.items():
            norms.index_add_(0, gid, square(fqn).sum(0).cpu()[idx])
        for fqn in layer.tables:
            for _, block, col0 in blocks[fqn]:
                norms[col0 : col0 + block.shape[1]] += block.detach().float().square().sum(0).cpu()
        out.append(norms)
    return out


@torch.no_grad()
def shrink_(
    layer: GroupLayer, factor: torch.Tensor, modules: Mapping[str, nn.Module], blocks: Blocks
) -> None:
    """Multiply every weight of group ``g`` by ``factor[g]`` (the proximal step), in place."""
    for fqn, (idx, gid) in layer.rows.items():
        linear = modules[fqn]
        scale = _scale(linear.out_features, idx, gid, factor).to(linear.weight.device)
        linear.weight.mul_(scale.unsqueeze(1).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.mul_(scale.to(linear.bias.dtype))
    for fqn, (idx, gid) in layer.cols.items():
        linear = modules[fqn]
        scale = _scale(linear.in_features, idx, gid, factor).to(linear.weight.device)
        linear.weight.mul_(scale.unsqueeze(0).to(linear.weight.dtype))
    for fqn in layer.tables:
        for _, block, col0 in blocks[fqn]:
            block.mul_(factor[col0 : col0 + block.shape[1]].to(block.device, block.dtype).unsqueeze(0))


def _scale(n: int, idx: torch.Tensor, gid: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-entry product of the factors of the groups an entry belongs to (1 for no group)."""
    if len(idx) == n and bool((idx == gid).all()):  # entry i is group i (neurons, common dimension)
        return factor
    return torch.zeros(n).index_add_(0, idx, factor[gid].log()).exp()


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
