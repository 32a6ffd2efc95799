"""UMEC: learn under a FLOPs budget how many features, embedding columns and neurons to remove (SPEC 7).

Per group layer ``l`` (``groups.py``) a continuous count ``s_l`` says how many groups to remove; the
``ceil(s_l)`` groups with the smallest L2 norms are the candidates. Dual variables ``y_l >= 0`` (one per
layer, sparsity) and ``z_r >= 0`` (one per resource: FLOPs, and optionally parameter bytes) turn the
constraints into penalties of a minimax problem, solved with one update of every variable per step
(paper, Algorithm 1), after the weight optimizer's step:

1. proximal step: the ``ceil(s_l)`` smallest groups are shrunk by ``1 / (1 + 2 * eta1 * y_l)``;
2. ``s <- s - eta2 * (dS/ds + sum_r z_r * dR_r/ds)`` with Adam and the appendix's straight-through
   estimates: ``dS/ds_l = y_l * ||group||^2`` of the ``(ceil(s_l) + 1)``-th smallest group and
   ``dR/ds_l = R(ceil(s) + e_l) - R(ceil(s))`` (``d ceil(s)/ds = 1``);
3. ``y_l <- y_l + eta3 * (squared norm of the ceil(s_l) smallest groups)``;
4. ``z_r <- max(0, z_r + eta4 * (R_r(ceil(s)) - budget_r))``, with ``R`` a fraction of the dense model.

At the end of the phase (``finalize``) the ``ceil(s_l)`` smallest groups of every layer are removed by
closing their masks (exact zeros, fresh optimizer state, fused table state included). The minimax
iterates may sit just above the budget when the phase ends, so removal goes on greedily, one group at
a time where it saves most of the exceeded resource per unit of squared norm, until every resource is
within its budget: the removed model always fits.

``s_l`` moves, by Adam, about ``eta2 * n_l`` groups per step (``eta2`` is a fraction of the layer), so
the same setting works for layers of 4 and of 512 groups and for phases of hundreds of steps.

Under DMP every rank computes the same decisions: group norms are averaged over ranks (one collective
per step) before anything is derived from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from torchrec_prune.importance.reduce import all_reduce_mean_
from torchrec_prune.importance.state import check_keys
from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.layout import concat_layouts, dlrm_layouts
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.pruners.base import OptimizersArg, PrunerBase, optimizers_of
from torchrec_prune.pruners.schedules import check_steps
from torchrec_prune.pruners.targets import Targets
from torchrec_prune.pruners.umec.groups import (
    GroupLayer,
    GroupMap,
    check_disjoint,
    close_groups,
    concat_feature_layers,
    dlrm_layers,
    is_open,
    neuron_layers,
    table_blocks,
    touched_modules,
)
from torchrec_prune.pruners.umec.resource import RESOURCES, Profile, ResourceModel
from torchrec_prune.train.hooks import StepContext


class _Adam:
    """Adam (Kingma & Ba; torch's defaults) on the few numbers of ``u`` (one per group layer), in
    Python floats: the paper's optimizer for ``s``, without the per-operation overhead of tensors,
    which on vectors this small costs more than the arithmetic."""

    def __init__(
        self, n: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m, self.v, self.t = [0.0] * n, [0.0] * n, 0

    def step(self, param: list[float], grad: list[float]) -> list[float]:
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        self.m = [b1 * m + (1 - b1) * g for m, g in zip(self.m, grad, strict=True)]
        self.v = [b2 * v + (1 - b2) * g * g for v, g in zip(self.v, grad, strict=True)]
        return [
            p - self.lr * (m / c1) / (math.sqrt(v / c2) + self.eps)
            for p, m, v in zip(param, self.m, self.v, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"m": _tensor(self.m), "v": _tensor(self.v), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v, self.t = state["m"].tolist(), state["v"].tolist(), state["t"]


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


class _Floats:
    """A few numbers held as Python floats in ``_<name>`` (the update's arithmetic runs on them), read
    as a float64 tensor and set from a tensor or a sequence."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}"

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        return self if obj is None else _tensor(getattr(obj, self.attr))

    def __set__(self, obj: object, value: torch.Tensor | Sequence[float]) -> None:
        setattr(obj, self.attr, [float(v) for v in value])


def check_budget(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction of the dense model in (0, 1], got {value!r}")


@dataclass
class UMECConfig:
    """Settings of a UMEC phase, validated here.

    Args:
        budget: FC FLOPs allowed, as a fraction of the dense model's (SPEC 2), in (0, 1].
        bytes_budget: optional second resource: parameter bytes (Linears and wrapped tables) allowed, as
            a fraction of the dense model's, in (0, 1].
        phase_steps: training steps of the phase; groups are removed after the last one (>= 1).
        eta1: proximal step (the paper's weight learning rate), > 0.
        eta2: Adam step of ``s``, as a fraction of each layer's groups per step, > 0.
        eta3: ascent step of the sparsity duals ``y``, >= 0.
        eta4: ascent step of the resource duals ``z`` (resources in fractions of dense), > 0.
        features: learn which sparse features to drop (DLRM with dot interaction).
        embedding_dims: learn DLRM's common embedding dimension.
        neurons: learn the neurons of every hidden layer selected by ``targets``.
        targets: which hidden layers (producer FQNs) have neuron groups.
        update_every: training steps per UMEC iteration (1: every step, as in the paper's Algorithm 1;
            more runs several weight steps per iteration, which divides UMEC's cost per step).
        record_every: steps between entries of ``history`` (the learned allocation over training).

    Example::

        config = UMECConfig(budget=0.5, phase_steps=2000)
    """

    budget: float
    bytes_budget: float | None = None
    phase_steps: int = 1000
    eta1: float = 0.1
    eta2: float = 0.01
    eta3: float = 0.1
    eta4: float = 2.0
    features: bool = True
    embedding_dims: bool = True
    neurons: bool = True
    targets: Targets = field(default_factory=Targets)
    update_every: int = 1
    record_every: int = 10

    def __post_init__(self) -> None:
        check_budget("UMECConfig.budget (--budget)", self.budget)
        if self.bytes_budget is not None:
            check_budget("UMECConfig.bytes_budget (--bytes-budget)", self.bytes_budget)
        check_steps("UMECConfig", "phase_steps", self.phase_steps)
        check_steps("UMECConfig", "update_every", self.update_every)
        check_steps("UMECConfig", "record_every", self.record_every)
        for name in ("eta1", "eta2", "eta4"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"UMECConfig.{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.eta3, (int, float)) and 0 <= self.eta3 < math.inf):
            raise ValueError(f"UMECConfig.eta3 must be a finite number >= 0, got {self.eta3!r}")
        if self.targets.include_output_layer:
            raise ValueError("UMECConfig.targets.include_output_layer must be False: output neurons stay")

    @property
    def budgets(self) -> dict[str, float]:
        """Budget per resource in use (FLOPs always, bytes when set)."""
        out = {"flops": float(self.budget)}
        if self.bytes_budget is not None:
            out["bytes"] = float(self.bytes_budget)
        return out


def find_layers(
    model: nn.Module, config: UMECConfig, probe: Callable[[nn.Module], object] | None = None
) -> list[GroupLayer]:
    """The group layers ``config`` asks for, checked to be disjoint; with ``probe`` (one forward on an
    example batch), also the features of collections concatenated into a Linear (``concat_layouts``)."""
    layers = neuron_layers(model, config.targets) if config.neurons else []
    layers += dlrm_layers(model, features=config.features, dims=config.embedding_dims)
    if probe is not None and config.features:
        dlrm = {layout.ebc for layout in dlrm_layouts(model)}
        concat = [layout for layout in concat_layouts(model, probe) if layout.ebc not in dlrm]
        layers += concat_feature_layers(model, concat)
    if not layers:
        raise ValueError(
            "UMEC: the model has no group to remove (no hidden MaskedLinear feeding another through a "
            "Sequential chain, no wrapped DLRM with a dot interaction, no collection concatenated into a "
            "Linear found by a probe); call torchrec_prune.wrap(model) first, or enable more group kinds"
        )
    check_disjoint(layers)
    return layers


class UMECPruner(PrunerBase):
    """Resource-constrained joint feature selection, embedding-dimension reduction and neuron pruning.

    ``probe``: one call of the model on an example batch (``lambda m: m(dense, kjt)``), for a model
    other than DLRM that concatenates its pooled embeddings into a Linear: UMEC then also selects its
    features (``concat_layouts``; export the result with the same probe).

    Raises (at construction, before any training):
        ValueError: a budget outside (0, 1]; a budget below the smallest model that keeps one group per
            layer; no group to remove; a structured mask already closed.

    Example::

        pruner = UMECPruner(model, UMECConfig(budget=0.5, phase_steps=2000))
        IncrementalTrainer(model, TrainConfig(), hooks=[pruner]).run(stream)
        pruner.allocation()  # {"neurons:...": (removed, groups), ...}
    """

    u = _Floats()  # s_l / n_l per layer, the variable Adam moves
    y = _Floats()  # sparsity duals, one per layer
    z = _Floats()  # resource duals, one per resource (RESOURCES)

    def __init__(
        self, model: nn.Module, config: UMECConfig, probe: Callable[[nn.Module], object] | None = None
    ) -> None:
        layers = find_layers(model, config, probe)
        self._modules = touched_modules(layers, dict(model.named_modules()))
        closed = [fqn for fqn, module in self._modules.items() if not is_open(module)]
        if closed:
            raise ValueError(f"UMEC starts from a model whose structured masks are open; closed in {closed}")
        super().__init__(
            {f: m for f, m in self._modules.items() if isinstance(m, MaskedLinear)},
            {f: m for f, m in self._modules.items() if isinstance(m, MaskedEmbeddingBagCollection)},
        )
        self.config = config
        self.layers = layers
        self.resource = ResourceModel(model, layers)
        self.budgets = torch.tensor([config.budgets.get(r, math.inf) for r in RESOURCES], dtype=torch.float64)
        smallest = self.resource.smallest()
        for r, (name, least) in enumerate(zip(RESOURCES, smallest, strict=True)):
            if self.budgets[r] < least:
                flag = "--budget" if name == "flops" else "--bytes-budget"
                raise ValueError(
                    f"{flag} {float(self.budgets[r]):g} is below the smallest model that keeps one group "
                    f"per layer ({least:.4f} of the dense model's {name}); give {flag} >= {least:.4f}"
                )
        device = next(m for m in self._modules.values() if isinstance(m, MaskedLinear)).weight.device
        self.groups = GroupMap(layers, self._modules, table_blocks(layers, self._modules), device)
        self.sizes = torch.tensor([layer.size for layer in layers], dtype=torch.float64)
        self._u = [0.0] * len(layers)  # s_l / n_l
        self._adam = _Adam(len(layers), config.eta2)
        self._y = [0.0] * len(layers)
        self._z = [0.0] * len(RESOURCES)
        self.history: list[dict[str, Any]] = []
        self.removed: dict[str, int] = {}
        self._last_costs: (
            tuple[list[int], list[Profile], tuple[float, ...], list[tuple[float, ...]]] | None
        ) = None

    # ----------------------------------------------------------------------------------------------
    @property
    def s(self) -> torch.Tensor:
        """Continuous number of groups to remove, per layer."""
        return self.u * self.sizes

    def counts(self) -> list[int]:
        """``ceil(s_l)``, at most ``n_l - 1`` (every layer keeps a group)."""
        return [
            min(max(math.ceil(u * layer.size - 1e-6), 0), layer.size - 1)
            for u, layer in zip(self._u, self.layers, strict=True)
        ]

    def allocation(self) -> dict[str, tuple[int, int]]:
        """Per group layer, ``(groups removed, groups)``: the current ``ceil(s)``, or what ``finalize``
        removed."""
        counts = [self.removed[layer.name] for layer in self.layers] if self.finalized else self.counts()
        return {layer.name: (k, layer.size) for layer, k in zip(self.layers, counts, strict=True)}

    def _norms(self) -> np.ndarray:
        """Squared norms of all groups (``GroupMap`` numbering), on the CPU: summed where the weights
        are, averaged over ranks (every rank ranks the same groups) and moved in one piece."""
        flat = self.groups.norms()
        all_reduce_mean_([flat])
        return flat.cpu().numpy()

    def _split(self, norms: np.ndarray) -> list[np.ndarray]:
        """Each layer's share of the global ``norms`` (views)."""
        return [norms[o : o + layer.size] for o, layer in zip(self.groups.offsets, self.layers, strict=True)]

    def _orders(self, norms: np.ndarray) -> list[np.ndarray]:
        """Per layer, the order of its groups by norm, ties by index."""
        return [np.argsort(n, kind="stable") for n in self._split(norms)]

    # ----------------------------------------------------------------------------------------------
    def after_step(self, ctx: StepContext) -> None:
        if self.finalized:
            return
        self.steps += 1
        if self.steps % self.config.update_every == 0:
            self.update()
        if self.steps >= self.config.phase_steps:
            self.finalize(ctx)

    @torch.no_grad()
    def update(self) -> None:
        """One UMEC iteration on the current weights (after the optimizer's step). The weights are
        touched in a few operations over all groups (``GroupMap``); the per-layer arithmetic runs on
        numpy slices and Python floats: a tensor operation's own overhead exceeds a layer's arithmetic.
        """
        cfg = self.config
        norms = self._norms()
        orders = self._orders(norms)
        ks = self.counts()
        profiles = self.resource.profiles([torch.from_numpy(o) for o in orders], upto=[k + 1 for k in ks])
        now, afters = self._costs(ks, profiles)
        # 1. proximal step on the ceil(s) smallest groups (shrunk, they stay the smallest: orders hold)
        shrink = [1.0 / (1.0 + 2.0 * cfg.eta1 * y) for y in self._y]
        factor = np.ones(self.groups.size, np.float32)
        ranked = [n[o] for n, o in zip(self._split(norms), orders, strict=True)]  # each layer's, ascending
        active = set()
        for i, (offset, order, k) in enumerate(zip(self.groups.offsets, orders, ks, strict=True)):
            if k and self._y[i] > 0:
                factor[offset + order[:k]] = shrink[i]
                ranked[i][:k] *= np.float32(shrink[i]) ** 2
                active.add(i)
        if active:
            self.groups.shrink_(torch.from_numpy(factor), active)
        # 2. s: straight-through gradient (at the (ceil(s) + 1)-th smallest group of each layer), Adam
        z = self._z
        grad = [
            (y * float(r[k]) + sum(zr * (a - b) for zr, a, b in zip(z, after, now, strict=True))) * layer.size
            for layer, y, r, k, after in zip(self.layers, self._y, ranked, ks, afters, strict=True)
        ]
        self._u = [
            min(max(u, 0.0), (layer.size - 1) / layer.size)
            for u, layer in zip(self._adam.step(self._u, grad), self.layers, strict=True)
        ]
        # 3. y: squared norm of the ceil(s) smallest groups of the new weights
        self._y = [
            y + cfg.eta3 * float(r[:k].sum()) for y, r, k in zip(self._y, ranked, self.counts(), strict=True)
        ]
        # 4. z: resource excess over the budget
        self._z = [
            max(0.0, zr + cfg.eta4 * (r - b)) if b != math.inf else 0.0
            for zr, r, b in zip(z, now, self.budgets.tolist(), strict=True)
        ]
        if self.steps % cfg.record_every == 0:
            self._record(ks, now)

    def _costs(
        self, ks: list[int], profiles: list[Profile]
    ) -> tuple[tuple[float, ...], list[tuple[float, ...]]]:
        """R at ``ceil(s)``, and with one group more removed from each layer (``R`` itself where the layer
        can lose no more); reused while ``ceil(s)`` and the removal profiles stay, which is most steps."""
        last = self._last_costs
        if last is None or last[0] != ks or any(a is not b for a, b in zip(last[1], profiles, strict=True)):
            self._last_costs = last = (ks, profiles, *self.resource.around(profiles, ks))
        return last[2], last[3]

    def _record(self, ks: list[int], resources: Sequence[float]) -> None:
        self.history.append(
            {
                "step": self.steps,
                "removed": {layer.name: k for layer, k in zip(self.layers, ks, strict=True)},
                **{name: float(resources[r]) for r, name in enumerate(RESOURCES)},
            }
        )

    # ----------------------------------------------------------------------------------------------
    def finalize(self, ctx_or_optimizers: OptimizersArg = None) -> None:
        """Remove the ``ceil(s_l)`` smallest groups of every layer, and more until within budget."""
        if self.finalized:
            return
        norms = self._norms()
        orders = [torch.from_numpy(o) for o in self._orders(norms)]
        profiles = self.resource.profiles(orders)
        ks = self._fit(self.counts(), [torch.from_numpy(n) for n in self._split(norms)], orders, profiles)
        optimizers = optimizers_of(ctx_or_optimizers)
        for layer, order, k in zip(self.layers, orders, ks, strict=True):
            removed = torch.zeros(layer.size, dtype=torch.bool)
            removed[order[:k]] = True
            close_groups(layer, removed, self._modules, optimizers)
        self.removed = {layer.name: k for layer, k in zip(self.layers, ks, strict=True)}
        self._record(ks, self.resource.evaluate(profiles, ks))
        self.finalized = True

    def _fit(self, ks: list[int], norms, orders, profiles) -> list[int]:
        """Remove more groups, greedily, until every resource is within its budget."""
        ks = list(ks)
        while True:
            now = _tensor(list(self.resource.evaluate(profiles, ks)))
            over = now > self.budgets + 1e-12
            if not bool(over.any()):
                return ks
            best, best_ratio = None, -1.0
            for i, layer in enumerate(self.layers):
                if ks[i] >= layer.size - 1:
                    continue
                step = list(ks)
                step[i] += 1
                saving = float(((now - _tensor(list(self.resource.evaluate(profiles, step)))) * over).sum())
                ratio = saving / (float(norms[i][orders[i][ks[i]]]) + 1e-12)
                if saving > 0 and ratio > best_ratio:
                    best, best_ratio = i, ratio
            if best is None:  # the construction-time check makes this unreachable
                raise RuntimeError(f"UMEC cannot meet the budgets {self.budgets.tolist()}: at {now.tolist()}")
            ks[best] += 1

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Steps, finalized flag, unit shapes, ``s`` (as ``u = s / n``), ``y``, ``z``, Adam's state, the
        history and what ``finalize`` removed."""
        return {
            **super().state_dict(),
            "u": self.u,
            "y": self.y,
            "z": self.z,
            "adam": self._adam.state_dict(),
            "history": list(self.history),
            "removed": dict(self.removed),
            "layers": [layer.name for layer in self.layers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        check_keys("UMECPruner", state, self.state_dict())
        if state["layers"] != [layer.name for layer in self.layers]:
            raise ValueError(f"UMECPruner state is for group layers {state['layers']}, not these")
        self.u = state["u"]
        self.y = state["y"]
        self.z = state["z"]
        self._adam.load_state_dict(state["adam"])
        self.history = list(state["history"])
        self.removed = dict(state["removed"])
