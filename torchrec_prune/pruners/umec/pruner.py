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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchrec_prune.importance.reduce import all_reduce_mean_
from torchrec_prune.importance.state import check_keys
from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.pruners.base import OptimizersArg, PrunerBase, optimizers_of
from torchrec_prune.pruners.schedules import check_steps
from torchrec_prune.pruners.targets import Targets
from torchrec_prune.pruners.umec.groups import (
    GroupLayer,
    GroupMap,
    check_disjoint,
    close_groups,
    dlrm_layers,
    is_open,
    neuron_layers,
    table_blocks,
    touched_modules,
)
from torchrec_prune.pruners.umec.resource import RESOURCES, Profile, ResourceModel
from torchrec_prune.train.hooks import StepContext


class _Adam:
    """Adam (Kingma & Ba; torch's defaults) on the small vector ``u``: the paper's optimizer for ``s``,
    without ``torch.optim``'s per-step overhead, which would cost more than the whole UMEC update."""

    def __init__(
        self, n: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m, self.v, self.t = torch.zeros(n), torch.zeros(n), 0

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad.square()
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        return param - self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m.clone(), "v": self.v.clone(), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v, self.t = state["m"].clone(), state["v"].clone(), state["t"]


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


def find_layers(model: nn.Module, config: UMECConfig) -> list[GroupLayer]:
    """The group layers ``config`` asks for, checked to be disjoint."""
    layers = neuron_layers(model, config.targets) if config.neurons else []
    layers += dlrm_layers(model, features=config.features, dims=config.embedding_dims)
    if not layers:
        raise ValueError(
            "UMEC: the model has no group to remove (no hidden MaskedLinear feeding another through a "
            "Sequential chain, no wrapped DLRM with a dot interaction); call torchrec_prune.wrap(model) "
            "first, or enable more group kinds"
        )
    check_disjoint(layers)
    return layers


class UMECPruner(PrunerBase):
    """Resource-constrained joint feature selection, embedding-dimension reduction and neuron pruning.

    Raises (at construction, before any training):
        ValueError: a budget outside (0, 1]; a budget below the smallest model that keeps one group per
            layer; no group to remove; a structured mask already closed.

    Example::

        pruner = UMECPruner(model, UMECConfig(budget=0.5, phase_steps=2000))
        IncrementalTrainer(model, TrainConfig(), hooks=[pruner]).run(stream)
        pruner.allocation()  # {"neurons:...": (removed, groups), ...}
    """

    def __init__(self, model: nn.Module, config: UMECConfig) -> None:
        layers = find_layers(model, config)
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
        self.budgets = torch.tensor([config.budgets.get(r, math.inf) for r in RESOURCES])
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
        self.sizes = torch.tensor([layer.size for layer in layers], dtype=torch.float32)
        # per global group: its layer, and its rank in that layer once each layer is sorted by norm
        self._layer_of = torch.repeat_interleave(torch.arange(len(layers)), self.sizes.long())
        self._rank = torch.arange(self.groups.size) - torch.tensor(self.groups.offsets)[self._layer_of]
        self.u = torch.zeros(len(layers))  # s_l / n_l
        self._adam = _Adam(len(layers), config.eta2)
        self.y = torch.zeros(len(layers))
        self.z = torch.zeros(len(RESOURCES))
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
        ks = torch.ceil(self.s - 1e-6).clamp(min=0).tolist()
        return [min(int(k), layer.size - 1) for k, layer in zip(ks, self.layers, strict=True)]

    def allocation(self) -> dict[str, tuple[int, int]]:
        """Per group layer, ``(groups removed, groups)``: the current ``ceil(s)``, or what ``finalize``
        removed."""
        counts = [self.removed[layer.name] for layer in self.layers] if self.finalized else self.counts()
        return {layer.name: (k, layer.size) for layer, k in zip(self.layers, counts, strict=True)}

    def _norms(self) -> torch.Tensor:
        """Squared norms of all groups (``GroupMap`` numbering), on the CPU: summed where the weights
        are, averaged over ranks (every rank ranks the same groups) and moved in one piece."""
        flat = self.groups.norms()
        all_reduce_mean_([flat])
        return flat.cpu()

    def _sorted(self, norms: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The global order that sorts each layer's groups by norm (layers stay in place), and per layer
        the order of its own groups."""
        order = torch.argsort(norms, stable=True)
        order = order[torch.argsort(self._layer_of[order], stable=True)]
        offsets = self.groups.offsets
        return order, [order[o : o + layer.size] - o for o, layer in zip(offsets, self.layers, strict=True)]

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
        """One UMEC iteration on the current weights (after the optimizer's step), vectorised over the
        groups of all layers: per-layer loops of small operations cost more than the update's arithmetic.
        """
        cfg = self.config
        norms = self._norms()
        order, orders = self._sorted(norms)
        ks = self.counts()
        profiles = self.resource.profiles(orders, upto=[k + 1 for k in ks])
        now, afters = self._costs(ks, profiles)
        by_rank = norms[order]  # each layer's norms, ascending
        # 1. proximal step on the ceil(s) smallest groups (shrunk, they stay the smallest: `order` holds)
        ys, zs = self.y.tolist(), self.z.tolist()
        shrunk = self._rank < torch.tensor(ks)[self._layer_of]
        factor = torch.where(shrunk, (1.0 / (1.0 + 2.0 * cfg.eta1 * self.y))[self._layer_of], 1.0)
        active = {i for i, (k, y) in enumerate(zip(ks, ys, strict=True)) if k and y > 0}
        if active:
            self.groups.shrink_(torch.empty_like(factor).index_put_((order,), factor), active)
            by_rank *= factor.square()
        # 2. s: straight-through gradient, Adam step (per layer in Python numbers: a few, and cheaper so)
        offsets = self.groups.offsets
        nexts = by_rank[  # the (ceil(s) + 1)-th smallest group of each layer
            [o + min(k, layer.size - 1) for o, k, layer in zip(offsets, ks, self.layers, strict=True)]
        ].tolist()
        grad = []
        for layer, y, smallest, after in zip(self.layers, ys, nexts, afters, strict=True):
            d = y * smallest + sum(z * (a - b) for z, a, b in zip(zs, after, now, strict=True))
            grad.append(d * layer.size)
        self.u = self._adam.step(self.u, torch.tensor(grad))
        self.u.clamp_(min=torch.zeros_like(self.sizes), max=(self.sizes - 1) / self.sizes)
        # 3. y: squared norm of the ceil(s) smallest groups of the new weights
        smallest = self._rank < torch.tensor(self.counts())[self._layer_of]
        self.y += cfg.eta3 * torch.zeros(len(self.layers)).index_add_(0, self._layer_of, by_rank * smallest)
        # 4. z: resource excess over the budget
        resources = torch.tensor(now)
        excess = torch.where(torch.isinf(self.budgets), torch.zeros_like(resources), resources - self.budgets)
        self.z = (self.z + cfg.eta4 * excess).clamp(min=0)
        if self.steps % cfg.record_every == 0:
            self._record(ks, resources)

    def _costs(
        self, ks: list[int], profiles: list[Profile]
    ) -> tuple[tuple[float, ...], list[tuple[float, ...]]]:
        """R at ``ceil(s)``, and with one group more removed from each layer (``R`` itself where the layer
        can lose no more); reused while ``ceil(s)`` and the removal profiles stay, which is most steps."""
        last = self._last_costs
        if last is None or last[0] != ks or any(a is not b for a, b in zip(last[1], profiles, strict=True)):
            self._last_costs = last = (ks, profiles, *self.resource.around(profiles, ks))
        return last[2], last[3]

    def _record(self, ks: list[int], resources: torch.Tensor) -> None:
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
        _, orders = self._sorted(norms)
        profiles = self.resource.profiles(orders)
        ks = self._fit(self.counts(), list(norms.split(self.sizes.long().tolist())), orders, profiles)
        optimizers = optimizers_of(ctx_or_optimizers)
        for layer, order, k in zip(self.layers, orders, ks, strict=True):
            removed = torch.zeros(layer.size, dtype=torch.bool)
            removed[order[:k]] = True
            close_groups(layer, removed, self._modules, optimizers)
        self.removed = {layer.name: k for layer, k in zip(self.layers, ks, strict=True)}
        self._record(ks, torch.tensor(self.resource.evaluate(profiles, ks)))
        self.finalized = True

    def _fit(self, ks: list[int], norms, orders, profiles) -> list[int]:
        """Remove more groups, greedily, until every resource is within its budget."""
        ks = list(ks)
        while True:
            now = torch.tensor(self.resource.evaluate(profiles, ks))
            over = now > self.budgets + 1e-12
            if not bool(over.any()):
                return ks
            best, best_ratio = None, -1.0
            for i, layer in enumerate(self.layers):
                if ks[i] >= layer.size - 1:
                    continue
                step = list(ks)
                step[i] += 1
                saving = float(((now - torch.tensor(self.resource.evaluate(profiles, step))) * over).sum())
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
            "u": self.u.clone(),
            "y": self.y.clone(),
            "z": self.z.clone(),
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
        self.u = state["u"].clone()
        self.y = state["y"].clone()
        self.z = state["z"].clone()
        self._adam.load_state_dict(state["adam"])
        self.history = list(state["history"])
        self.removed = dict(state["removed"])
