"""UMEC's resource function R: FLOPs and parameter bytes of the model left after removing groups.

FLOPs follow SPEC 2: a Linear with ``I`` inputs and ``O`` outputs costs ``2*I*O + O`` per sample forward
(no ``+ O`` without a bias), summed over every ``nn.Linear`` of the model. Parameter bytes count every
Linear's weights and biases and every wrapped table's ``rows x open columns`` (a table whose features
are all gated off is gone). Both are returned as fractions of the dense model's.

R depends on *which* groups go, not only on how many (DLRM's feature groups share dot products), so
``profiles`` turns a per-layer removal order into, for every ``k``, the rows and columns the first ``k``
groups remove; ``evaluate`` then costs any ``k`` per layer in plain arithmetic, cheap enough for every
step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import data_type_to_dtype

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.pruners.umec.groups import GroupLayer

RESOURCES = ("flops", "bytes")


@dataclass(frozen=True)
class _Linear:
    fqn: str
    inputs: int
    outputs: int
    bias: bool
    elem_bytes: int


@dataclass(frozen=True)
class _Table:
    ebc: str
    name: str
    rows: int
    dim: int
    elem_bytes: int


@dataclass
class Profile:
    """What the first ``k`` groups of one layer remove, for ``k = 0 .. size`` (lists, for speed).

    Args:
        linear: (Linear FQN, ``"row"`` or ``"col"``) -> rows or columns removed.
        dims: table keys (EBC FQN, table) -> columns removed (``k`` for a ``dims`` layer).
        dead: table key -> whether the table has no open feature left.
    """

    linear: dict[tuple[str, str], list[int]]
    dims: list[tuple[str, str]]
    dead: dict[tuple[str, str], list[bool]]


@dataclass
class _Removal:
    """Rows and columns removed per Linear, columns per table, and the tables left without a feature."""

    rows: dict[str, int]
    cols: dict[str, int]
    dims: dict[tuple[str, str], int]
    dead: set[tuple[str, str]]

    @classmethod
    def of(cls, profiles: Sequence[Profile], removed: Sequence[int]) -> _Removal:
        out = cls({}, {}, {}, set())
        for profile, k in zip(profiles, removed, strict=True):
            out.add(profile, k, 0)
        return out

    def add(self, profile: Profile, k: int, before: int) -> None:
        """Count ``k`` removed groups of ``profile``'s layer where ``before`` were counted."""
        for (fqn, axis), counts in profile.linear.items():
            target = self.rows if axis == "row" else self.cols
            target[fqn] = target.get(fqn, 0) + counts[k] - counts[before]
        for key in profile.dims:
            self.dims[key] = self.dims.get(key, 0) + k - before
        self.dead |= {key for key, gone in profile.dead.items() if gone[k]}

    def plus(self, profile: Profile, k: int) -> _Removal:
        """A copy with one more group of ``profile``'s layer removed (``k`` were)."""
        out = _Removal(dict(self.rows), dict(self.cols), dict(self.dims), set(self.dead))
        out.add(profile, k + 1, k)
        return out


class ResourceModel:
    """FLOPs and bytes of ``model`` as a function of per-layer removals.

    Args:
        model: the wrapped model (possibly DMP-wrapped; its Linears must be materialised).
        layers: the group layers UMEC learns.
    """

    def __init__(self, model: nn.Module, layers: Sequence[GroupLayer]) -> None:
        self.layers = list(layers)
        self.linears = [
            _Linear(fqn, m.in_features, m.out_features, m.bias is not None, m.weight.element_size())
            for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear)
        ]
        self.tables: list[_Table] = []
        self._feature_tables: dict[str, torch.Tensor] = {}  # EBC -> [features, tables] membership
        for fqn, module in model.named_modules():
            if not isinstance(module, MaskedEmbeddingBagCollection):
                continue
            names = module.table_names
            member = torch.zeros(len(module.feature_names), len(names), dtype=torch.long)
            for f, feature in enumerate(module.feature_names):
                member[f, names.index(module.table_of(feature))] = 1
            self._feature_tables[fqn] = member
            for config in module.embedding_bag_configs():
                size = data_type_to_dtype(config.data_type).itemsize
                self.tables.append(
                    _Table(fqn, config.name, config.num_embeddings, config.embedding_dim, size)
                )
        self._linear = {lin.fqn: lin for lin in self.linears}
        self._table = {(t.ebc, t.name): t for t in self.tables}
        # per layer, per (Linear, axis): membership [groups, width] where groups share entries, else
        # the entries each group holds; a layer whose groups hold equal disjoint shares (neurons, the
        # common dimension) has a profile that does not depend on the order, computed once
        self._members: list[dict[tuple[str, str], torch.Tensor]] = []
        self._fixed: list[Profile | None] = []
        self._last: list[tuple[torch.Tensor, Profile] | None] = [None] * len(self.layers)
        widths = {lin.fqn: (lin.outputs, lin.inputs) for lin in self.linears}
        for layer in self.layers:
            members = {}
            for axis, parts in (("row", layer.rows), ("col", layer.cols)):
                for fqn, (idx, gid) in parts.items():
                    m = torch.zeros(layer.size, widths[fqn][axis == "col"], dtype=torch.long)
                    m[gid, idx] = 1
                    members[(fqn, axis)] = m.sum(1) if int(m.sum(0).max()) <= 1 else m.bool()
            self._members.append(members)
            uniform = all(m.dim() == 1 and bool((m == m[0]).all()) for m in members.values())
            self._fixed.append(None)
            if uniform and not layer.features:
                self._fixed[-1] = self._profile(layer, members, torch.arange(layer.size))
        nothing = self.profiles([torch.arange(layer.size) for layer in self.layers])
        self.dense_flops, self.dense_bytes = self.absolute(nothing, [0] * len(self.layers))

    def profiles(self, orders: Sequence[torch.Tensor], upto: Sequence[int] | None = None) -> list[Profile]:
        """Removal profiles of every layer when its groups are removed in ``orders[l]`` order.

        With ``upto``, a profile need only hold for removing at most ``upto[l]`` groups: a layer's last
        profile is then reused while its first ``upto[l]`` groups stay the same (UMEC's step costs
        ``ceil(s)`` and ``ceil(s) + 1`` removals, and the smallest groups seldom change places).
        """
        out = []
        for i, (layer, members, order, fixed) in enumerate(
            zip(self.layers, self._members, orders, self._fixed, strict=True)
        ):
            if fixed is None:
                n = len(order) if upto is None else upto[i]
                last = self._last[i]
                if last is None or not torch.equal(last[0][:n], order[:n]):
                    self._last[i] = last = (order, self._profile(layer, members, order))
                fixed = last[1]
            out.append(fixed)
        return out

    def _profile(
        self, layer: GroupLayer, members: dict[tuple[str, str], torch.Tensor], order: torch.Tensor
    ) -> Profile:
        linear = {}
        for key, m in members.items():
            if m.dim() == 1:  # disjoint groups: counts add up
                counts = m[order].cumsum(0)
            else:  # shared entries (DLRM's dot products) go with the first group that removes them
                counts = (m[order].long().cumsum(0) > 0).sum(1)
            linear[key] = [0, *counts.tolist()]
        dims = [(fqn, t) for fqn, tables in layer.tables.items() for t in tables]
        dead = {}
        for fqn, ids in layer.features.items():
            member = self._feature_tables[fqn][ids[order]]
            gone = member.cumsum(0) == self._feature_tables[fqn].sum(0)
            gone = torch.cat([torch.zeros(1, gone.shape[1], dtype=torch.bool), gone])
            names = [t.name for t in self.tables if t.ebc == fqn]
            for i, name in enumerate(names):
                dead[(fqn, name)] = gone[:, i].tolist()
        return Profile(linear, dims, dead)

    def evaluate(self, profiles: Sequence[Profile], removed: Sequence[int]) -> tuple[float, float]:
        """``(FLOPs, bytes)`` with ``removed[l]`` groups of layer ``l`` gone, as fractions of dense."""
        flops, size = self.absolute(profiles, removed)
        return flops / self.dense_flops, size / self.dense_bytes

    def absolute(self, profiles: Sequence[Profile], removed: Sequence[int]) -> tuple[int, int]:
        """Per-sample forward FLOPs and parameter bytes with ``removed[l]`` groups of layer ``l`` gone."""
        removal = _Removal.of(profiles, removed)
        return self._cost(removal, self.linears, self.tables)

    def around(
        self, profiles: Sequence[Profile], removed: Sequence[int]
    ) -> tuple[tuple[float, float], list[tuple[float, float]]]:
        """``evaluate`` at ``removed``, and with one more group of each layer ``l`` gone (at ``removed``
        where the layer can lose no more): what UMEC's straight-through gradient needs, each neighbour
        costed on the Linears and tables its layer touches only."""
        removal = _Removal.of(profiles, removed)
        flops, size = self._cost(removal, self.linears, self.tables)
        out = []
        for layer, profile, k in zip(self.layers, profiles, removed, strict=True):
            if k + 1 >= layer.size:
                out.append((flops / self.dense_flops, size / self.dense_bytes))
                continue
            linears = [self._linear[fqn] for fqn in {fqn for fqn, _ in profile.linear}]
            tables = [self._table[key] for key in {*profile.dims, *profile.dead}]
            before = self._cost(removal, linears, tables)
            after = self._cost(removal.plus(profile, k), linears, tables)
            out.append(
                (
                    (flops + after[0] - before[0]) / self.dense_flops,
                    (size + after[1] - before[1]) / self.dense_bytes,
                )
            )
        return (flops / self.dense_flops, size / self.dense_bytes), out

    @staticmethod
    def _cost(removal: _Removal, linears: Sequence[_Linear], tables: Sequence[_Table]) -> tuple[int, int]:
        """FLOPs and bytes of ``linears`` and ``tables`` after ``removal``."""
        flops = 0
        size = 0
        for lin in linears:
            i, o = lin.inputs - removal.cols.get(lin.fqn, 0), lin.outputs - removal.rows.get(lin.fqn, 0)
            flops += 2 * i * o + (o if lin.bias else 0)
            size += (i * o + (o if lin.bias else 0)) * lin.elem_bytes
        for t in tables:
            key = (t.ebc, t.name)
            if key not in removal.dead:
                size += t.rows * (t.dim - removal.dims.get(key, 0)) * t.elem_bytes
        return flops, size

    def smallest(self) -> tuple[float, float]:
        """Upper bound of R when every layer keeps one group (whichever it is): the least that any run
        can reach, so a budget below it is infeasible."""
        orders = []
        for layer, members in zip(self.layers, self._members, strict=True):
            # keep last the group that removes least when the others are gone (largest exclusive share)
            exclusive = torch.zeros(layer.size, dtype=torch.long)
            for m in members.values():
                exclusive += m if m.dim() == 1 else (m & (m.sum(0, keepdim=True) == 1)).sum(1)
            kept = int(torch.argmax(exclusive))
            order = [g for g in range(layer.size) if g != kept] + [kept]
            orders.append(torch.tensor(order))
        return self.evaluate(self.profiles(orders), [layer.size - 1 for layer in self.layers])
