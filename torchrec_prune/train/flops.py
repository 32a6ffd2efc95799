"""Training FLOPs of the fully connected layers, per sample and integrated over a run (SPEC 2).

A Linear with effective input ``I`` and output ``O`` costs ``2*I*O + O`` per sample forward (no ``+ O``
without a bias) and training counts forward + backward as 3x forward. ``I`` and ``O`` are read from the
live masks of a ``MaskedLinear``: ``neuron_mask`` shrinks ``O`` and ``input_mask`` shrinks ``I`` (the
structured pruner sets the next layer's ``input_mask`` when it prunes neurons, so that mask is the
contract; nothing is inferred from the layer order). Element (unstructured) sparsity saves no dense
FLOPs, so it is reported apart as *effective* FLOPs, ``2*nnz(kept weights) + kept biases``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from torchrec_prune.masks.linear import MaskedLinear, masks_seen_changed

TRAINING_MULTIPLIER = 3
_registrations = 0  # child modules registered (or set to None) anywhere in this process


def _count_registration(module: nn.Module, name: str, child: nn.Module | None) -> None:
    global _registrations
    _registrations += 1


# A meter walks a model's modules again only after a registration (``model.fc = ...``, ``add_module``)
# or a change on a cached layer's path.
register_module_module_registration_hook(_count_registration)


@dataclass(frozen=True)
class LayerFlops:
    """Sizes of one Linear and what its masks keep.

    Args:
        name: module FQN.
        in_features, out_features: the layer's shape.
        active_in, active_out: inputs and neurons kept by ``input_mask`` and ``neuron_mask``.
        kept_weights: weights kept by all three masks together.
        bias: whether the layer has a bias.
    """

    name: str
    in_features: int
    out_features: int
    active_in: int
    active_out: int
    kept_weights: int
    bias: bool

    @property
    def dense_forward(self) -> int:
        return 2 * self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def forward(self) -> int:
        """Forward FLOPs with structured sparsity (pruned neurons and inputs removed)."""
        return 2 * self.active_in * self.active_out + (self.active_out if self.bias else 0)

    @property
    def effective_forward(self) -> int:
        """Forward FLOPs counting only kept weights (unstructured sparsity); an *effective* figure."""
        return 2 * self.kept_weights + (self.active_out if self.bias else 0)


@dataclass(frozen=True)
class FlopsReport:
    """Per-sample FLOPs of every Linear of a model, per layer and in total."""

    layers: tuple[LayerFlops, ...]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FlopsReport:
        """Inverse of ``dataclasses.asdict``: checkpoint states hold reports as plain values."""
        return cls(tuple(LayerFlops(**layer) for layer in values["layers"]))

    @property
    def dense_forward(self) -> int:
        return sum(layer.dense_forward for layer in self.layers)

    @property
    def forward(self) -> int:
        return sum(layer.forward for layer in self.layers)

    @property
    def effective_forward(self) -> int:
        return sum(layer.effective_forward for layer in self.layers)

    @property
    def dense_training(self) -> int:
        return TRAINING_MULTIPLIER * self.dense_forward

    @property
    def training(self) -> int:
        return TRAINING_MULTIPLIER * self.forward

    @property
    def effective_training(self) -> int:
        return TRAINING_MULTIPLIER * self.effective_forward


def _fc_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _layer_flops(name: str, layer: nn.Linear) -> LayerFlops:
    if layer.weight.is_meta:
        raise ValueError(f"cannot count FLOPs of {name!r}: its weight is on 'meta'; materialise it first")
    out_features, in_features = layer.out_features, layer.in_features  # a compacted weight may be smaller
    if isinstance(layer, MaskedLinear):
        keep = layer.kept_mask()
        counts = torch.stack([layer.input_mask.sum(), layer.neuron_mask.sum(), keep.sum()]).tolist()
        active_in, active_out, kept = (int(v) for v in counts)
    else:
        active_in, active_out, kept = in_features, out_features, in_features * out_features
    return LayerFlops(name, in_features, out_features, active_in, active_out, kept, layer.bias is not None)


def fc_flops(model: nn.Module) -> FlopsReport:
    """Per-sample FLOPs of every ``nn.Linear`` (``MaskedLinear`` included) in ``model``, from its live masks.

    Example::

        report = fc_flops(model)
        report.training / report.dense_training  # fraction of dense training FLOPs still spent
    """
    return FlopsReport(tuple(_layer_flops(name, layer) for name, layer in _fc_layers(model)))


@dataclass(frozen=True)
class FlopsTotals:
    """Training FLOPs integrated over samples.

    Args:
        samples: samples trained on.
        dense: dense-equivalent training FLOPs (every mask open).
        actual: training FLOPs with structured sparsity.
        effective: training FLOPs counting only kept weights (unstructured sparsity); *effective*.
    """

    samples: int = 0
    dense: int = 0
    actual: int = 0
    effective: int = 0

    @property
    def saving(self) -> float:
        """Fraction of dense training FLOPs saved by structured sparsity."""
        return 1.0 - self.actual / self.dense if self.dense else 0.0

    @property
    def effective_saving(self) -> float:
        """Fraction of dense training FLOPs saved when nonzeros alone are counted (effective)."""
        return 1.0 - self.effective / self.dense if self.dense else 0.0

    def __add__(self, other: FlopsTotals) -> FlopsTotals:
        return FlopsTotals(
            self.samples + other.samples,
            self.dense + other.dense,
            self.actual + other.actual,
            self.effective + other.effective,
        )


def integrate_phases(phases: Iterable[tuple[int, FlopsReport]]) -> FlopsTotals:
    """Sum over phases of ``samples x per-sample training FLOPs``: what a schedule should have spent.

    A schedule checks its accounting by comparing this, built from its phases' sample counts and masks,
    against ``FlopsMeter.totals`` measured step by step.
    """
    total = FlopsTotals()
    for samples, report in phases:
        if samples < 0:
            raise ValueError(f"phase samples must be >= 0, got {samples}")
        total += FlopsTotals(
            samples,
            samples * report.dense_training,
            samples * report.training,
            samples * report.effective_training,
        )
    return total


@dataclass(frozen=True)
class FlopsSegment:
    """Consecutive samples trained with the same per-sample FLOPs and the same phase label."""

    phase: str | None
    samples: int
    report: FlopsReport


class PerSampleFlops(NamedTuple):
    """A model's FLOPs per sample: the report, and one sample's training FLOPs as totals."""

    report: FlopsReport
    unit: FlopsTotals


class FlopsMeter:
    """Integrate per-sample training FLOPs x samples over a run.

    Per-sample FLOPs are cached until a mask changes: the key holds each FC layer's parameters and
    buffers and the buffers' ``_version`` (bumped by every in-place write), so ``add`` costs no host sync
    while masks stay put. The FC layers themselves are found once per model and found again only after
    a module was registered anywhere (``setattr``, ``add_module``) or a module on a cached layer's path
    was removed or replaced, so a step does not walk the whole (DMP-sharded) module tree.

    ``after_forward`` and ``add_at`` split ``add`` in two: read the FLOPs of the masks a step's forward
    used, count the step's samples at them when it is over. ``IncrementalTrainer`` does so: each step
    counts at the masks its forward used (a pruner that writes masks after the forward changes the next
    step's FLOPs), and a step whose forward met no changed mask compares two integers.

    Example::

        meter = FlopsMeter()
        for batch in stream:
            ...  # forward, backward, optimizer step
            meter.add(model, batch_size * world_size, phase="sparse")
        meter.totals.saving
    """

    def __init__(self) -> None:
        self._segments: list[FlopsSegment] = []
        self._pending = 0  # samples of the last segment not folded into it yet (no dataclass per step)
        self._totals = FlopsTotals()
        self._tree: _FcTree | None = None
        self._cache: _CachedFlops | None = None
        self._seen: tuple[int, int] | None = None  # registrations and masks_seen_changed at the last read

    def per_sample(self, model: nn.Module) -> FlopsReport:
        """``fc_flops(model)``, recomputed only when a Linear or one of its masks changed."""
        return self.at(model).report

    def at(self, model: nn.Module) -> PerSampleFlops:
        """The model's per-sample FLOPs now (cached as for ``per_sample``), to count samples at with
        ``add_at``."""
        return self._current(model).flops

    def after_forward(self, model: nn.Module) -> PerSampleFlops:
        """``at``, for the masks ``model``'s forward has just used, re-read only when a module was
        registered anywhere or a ``MaskedLinear`` forward met written, replaced or loaded masks since the
        last read (``masks_seen_changed``): two integers compared, where ``at`` touches every FC layer's
        parameters and masks, which a training step has evicted from the CPU's caches by then.

        What no forward and no registration reports is seen by ``at`` but not here: a plain
        ``nn.Linear``'s bias set to ``None``, a module deleted (``del``) that the forward still reaches.
        """
        cache = self._cache
        if (
            cache is not None
            and cache.tree.model is model
            and self._seen == (_registrations, masks_seen_changed())
        ):
            return cache.flops
        flops = self.at(model)
        self._seen = (_registrations, masks_seen_changed())  # after ``at``: reading masks counts as looking
        return flops

    def _current(self, model: nn.Module) -> _CachedFlops:
        tree = self._tree
        if tree is None or not tree.intact(model):
            tree = self._tree = _FcTree.walk(model)
        # Touch as little as possible: this runs every step.
        buffers = [buf for layer in tree.layers for buf in layer._buffers.values()]
        tensors = [p for layer in tree.layers for p in layer._parameters.values()] + buffers
        versions = [buf._version for buf in buffers if buf is not None]
        cache = self._cache
        if (
            cache is None
            or (cache.tree is not tree and (cache.tree.layers, cache.tree.names) != (tree.layers, tree.names))
            or len(tensors) != len(cache.tensors)
            or not all(map(operator.is_, tensors, cache.tensors))
            or versions != cache.versions
        ):
            report = FlopsReport(
                tuple(_layer_flops(name, layer) for name, layer in zip(tree.names, tree.layers, strict=True))
            )
            flops = PerSampleFlops(report, integrate_phases([(1, report)]))
            cache = self._cache = _CachedFlops(tree, tensors, versions, flops)
        return cache

    def add(self, model: nn.Module, num_samples: int, phase: str | None = None) -> None:
        """Count ``num_samples`` samples at the model's current FLOPs (pass global counts for run totals)."""
        self.add_at(self.at(model), num_samples, phase)

    def add_at(self, flops: PerSampleFlops, num_samples: int, phase: str | None = None) -> None:
        """Count ``num_samples`` samples at ``flops``, read earlier with ``at``."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        report, unit = flops
        last = self._segments[-1] if self._segments else None
        if last is not None and last.phase == phase and (last.report is report or last.report == report):
            self._pending += num_samples
        else:
            self._fold()
            self._segments.append(FlopsSegment(phase, num_samples, report))
        t = self._totals  # kept running: the trainer reads the totals every step
        self._totals = FlopsTotals(
            t.samples + num_samples,
            t.dense + num_samples * unit.dense,
            t.actual + num_samples * unit.actual,
            t.effective + num_samples * unit.effective,
        )

    def _fold(self) -> None:
        if self._pending:
            last = self._segments[-1]
            self._segments[-1] = FlopsSegment(last.phase, last.samples + self._pending, last.report)
            self._pending = 0

    @property
    def segments(self) -> tuple[FlopsSegment, ...]:
        self._fold()
        return tuple(self._segments)

    @property
    def totals(self) -> FlopsTotals:
        return self._totals

    def phase_totals(self) -> dict[str | None, FlopsTotals]:
        """Totals per phase label, in order of first appearance; they add up to ``totals``."""
        out: dict[str | None, FlopsTotals] = {}
        for s in self.segments:
            out[s.phase] = out.get(s.phase, FlopsTotals()) + integrate_phases([(s.samples, s.report)])
        return out

    def state_dict(self) -> dict[str, Any]:
        """The segments as plain values (the per-sample cache is rebuilt from the live masks)."""
        return {"segments": [asdict(s) for s in self.segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"segments"}:
            raise ValueError(f"FlopsMeter state must have the key 'segments' only, got {sorted(state)}")
        self._segments = [
            FlopsSegment(s["phase"], s["samples"], FlopsReport.from_dict(s["report"]))
            for s in state["segments"]
        ]
        self._pending = 0
        self._totals = integrate_phases((s.samples, s.report) for s in self._segments)


@dataclass(frozen=True)
class _FcTree:
    """A model's FC layers by name, with every (parent, child name, child) edge on their paths."""

    model: nn.Module
    registrations: int
    names: tuple[str, ...]
    layers: tuple[nn.Linear, ...]
    edges: tuple[tuple[nn.Module, str, nn.Module], ...]

    @classmethod
    def walk(cls, model: nn.Module) -> _FcTree:
        named = _fc_layers(model)
        edges: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        for name, _ in named:
            parent = model
            for part in name.split(".") if name else ():
                child = parent._modules[part]
                edges[id(parent), part] = (parent, part, child)
                parent = child
        names, layers = tuple(n for n, _ in named), tuple(m for _, m in named)
        return cls(model, _registrations, names, layers, tuple(edges.values()))

    def intact(self, model: nn.Module) -> bool:
        """Same model, nothing registered since the walk, and every edge still there (``del`` registers
        nothing)."""
        if model is not self.model or self.registrations != _registrations:
            return False
        for parent, name, child in self.edges:  # a plain loop: this runs every step
            if parent._modules.get(name) is not child:
                return False
        return True


@dataclass(frozen=True)
class _CachedFlops:
    """Per-sample FLOPs of ``tree``'s layers while they hold ``tensors`` (parameters, then buffers) and
    the buffers are at ``versions``."""

    tree: _FcTree
    tensors: list[torch.Tensor | None]
    versions: list[int]
    flops: PerSampleFlops
