"""Structured Taylor neuron pruning and regrowth (SPEC 5, growth paper section III).

Pruning neuron ``t`` of layer ``l`` closes row ``t`` (``neuron_mask``: weights zeroed, bias masked but kept)
and column ``t`` of the layer that reads its output (``input_mask``), so both matmuls shrink and training
FLOPs drop. Only
layers whose output feeds exactly one Linear through a chain of ``nn.Sequential``s are pruned: hidden
layers of a TorchRec ``MLP``, and the last hidden layer of DLRM's over arch, which feeds the logit layer
in the same ``Sequential``. DLRM's last bottom-MLP layer feeds the feature interaction, so it has no
successor and is never pruned; neither is the model's final output layer.

Between the two Linears only element-wise modules are allowed (activations, dropout, batch norm, a
Perceptron's functional activation), since they keep column ``t`` separate from the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.modules.mlp import MLP, Perceptron

from torchrec_prune.importance.neuron import NeuronTaylor
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.surgery import grow_, prune_
from torchrec_prune.masks.wrap import masked_modules
from torchrec_prune.pruners.base import OptimizersArg, PrunerBase, optimizers_of
from torchrec_prune.pruners.rules import fraction_count, topk_mask
from torchrec_prune.pruners.schedules import OneShot, check_steps
from torchrec_prune.pruners.targets import Targets, output_layer_fqn, select_linears
from torchrec_prune.train.hooks import StepContext
from torchrec_prune.train.optimizer_state import check_regrown_state

_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.BatchNorm1d,
)


def check_beta(owner: str, beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0 < beta < 1):
        raise ValueError(f"{owner}.beta must be in (0, 1), got {beta!r}")


def _end_linear(module: nn.Module, last: bool) -> nn.Module | None:
    """The Linear that produces ``module``'s output (``last``) or reads its input, when the path between
    it and the module boundary is element-wise; ``None`` otherwise."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, Perceptron):
        activation = module._activation_fn
        if last and isinstance(activation, nn.Module) and not isinstance(activation, _ELEMENTWISE):
            return None  # e.g. SwishLayerNorm mixes the columns of the output
        return module._linear
    if isinstance(module, MLP):
        return _end_linear(module._mlp, last)
    if isinstance(module, nn.Sequential):
        children = [c for c in module if not isinstance(c, _ELEMENTWISE)]
        if not children:
            return None
        return _end_linear(children[-1] if last else children[0], last)
    return None


def neuron_successors(model: nn.Module, output_layer: str | None = None) -> dict[str, str]:
    """Map the FQN of every neuron-prunable ``MaskedLinear`` to the FQN of the ``MaskedLinear`` reading it.

    ``output_layer`` overrides the detection of the final output layer (see ``Targets.output_layer``).
    """
    fqn_of = {id(m): name for name, m in model.named_modules()}
    successors: dict[str, str] = {}
    for _, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = [c for c in seq if not isinstance(c, _ELEMENTWISE)]
        for producer, consumer in zip(children, children[1:], strict=False):
            src, dst = _end_linear(producer, last=True), _end_linear(consumer, last=False)
            if (
                isinstance(src, MaskedLinear)
                and isinstance(dst, MaskedLinear)
                and src.out_features == dst.in_features
            ):
                successors[fqn_of[id(src)]] = fqn_of[id(dst)]
    successors.pop(output_layer_fqn(model, output_layer) or "", None)
    return successors


def _why_not_prunable(model: nn.Module, fqn: str, output_layer: str | None) -> Exception:
    modules = dict(model.named_modules())
    if fqn not in modules:
        return ValueError(f"{fqn!r} is not a module of the model")
    if not isinstance(modules[fqn], MaskedLinear):
        return TypeError(
            f"module {fqn!r} of type {type(modules[fqn]).__name__} is not mask-aware; "
            "call torchrec_prune.wrap(model) first"
        )
    if fqn == output_layer_fqn(model, output_layer):
        return ValueError(f"{fqn!r} is the model's final output layer, whose neurons are never pruned")
    return ValueError(
        f"{fqn!r} cannot be neuron-pruned: its output does not feed a Linear through an element-wise "
        "Sequential chain (e.g. DLRM's last bottom-MLP layer feeds the feature interaction)"
    )


@torch.no_grad()
def _prune_layers(
    modules: Mapping[str, nn.Module],
    successors: Mapping[str, str],
    beta: float,
    importances: Mapping[str, torch.Tensor],
    optimizers: list[torch.optim.Optimizer],
) -> dict[str, int]:
    kept: dict[str, int] = {}
    for fqn in sorted(importances):
        layer, consumer = modules[fqn], modules[successors[fqn]]
        assert isinstance(layer, MaskedLinear)
        importance = importances[fqn]
        if tuple(importance.shape) != (layer.out_features,):
            raise ValueError(
                f"importance of {fqn!r} must have shape ({layer.out_features},), "
                f"got {tuple(importance.shape)}"
            )
        keep = topk_mask(
            importance, max(1, fraction_count(layer.out_features, 1 - beta)), prefer=layer.neuron_mask
        )
        prune_(layer, optimizers, name=fqn, neuron_mask=keep)
        prune_(consumer, optimizers, name=successors[fqn], input_mask=keep.to(consumer.input_mask.device))
        kept[fqn] = int(layer.neuron_mask.sum())
    return kept


def prune_neurons(
    model: nn.Module,
    beta: float,
    importances: Mapping[str, torch.Tensor],
    optimizers: Iterable[torch.optim.Optimizer] = (),
    output_layer: str | None = None,
) -> dict[str, int]:
    """Keep the top ``1 - beta`` neurons (at least one) of every layer in ``importances``; close the rest
    and the matching inputs of the next layer. Returns the kept-neuron count per layer.

    ``importances`` maps layer FQNs to one score per output neuron; under torchrun they must be the same
    on every rank (``NeuronTaylor.scores`` averages them). Ties keep neurons that are open now.

    Raises:
        ValueError: ``beta`` outside (0, 1), a layer that cannot be neuron-pruned, or a wrong shape.
        TypeError: a named module that is not a ``MaskedLinear``.
    """
    check_beta("prune_neurons", beta)
    successors = neuron_successors(model, output_layer)
    for fqn in importances:
        if fqn not in successors:
            raise _why_not_prunable(model, fqn, output_layer)
    return _prune_layers(dict(model.named_modules()), successors, beta, importances, list(optimizers))


def grow_neurons(
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    fqns: Iterable[str] | None = None,
    *,
    regrown_state: str = "reset",
) -> int:
    """Re-open pruned neurons and the inputs they feed, at exactly zero with fresh optimizer state.

    With ``fqns`` only those layers' neurons (and their successors' matching inputs) re-open; by default
    every ``neuron_mask`` and ``input_mask`` of the model does. Returns the number of re-opened weights.
    A re-opened neuron has a zero row and a zero outgoing column but its kept bias, so behind a ReLU its
    output relu(b) gives the column a gradient, and the column the row (with a zero bias neither would
    ever move: relu'(0) = 0). Neurons whose kept bias is <= 0 stay silent until their input moves.

    ``regrown_state`` starts the re-opened entries' optimizer state (``regrow_state_``): ``"reset"`` (SPEC
    3) or ``"layer_mean"``. Each layer's masks change in one step, so "the entries that stay open" of a
    layer that is both a pruned layer and a successor are those open before and after the whole growth.
    """
    check_regrown_state("grow_neurons: regrown_state", regrown_state)
    modules = dict(model.named_modules())
    masks: dict[str, dict[str, torch.Tensor]] = {}
    if fqns is None:
        for fqn, module in masked_modules(model):
            if isinstance(module, MaskedLinear):
                masks[fqn] = {
                    "neuron_mask": torch.ones_like(module.neuron_mask),
                    "input_mask": torch.ones_like(module.input_mask),
                }
    else:
        successors = neuron_successors(model)
        for fqn in fqns:
            if fqn not in successors:
                raise _why_not_prunable(model, fqn, None)
            layer, consumer = modules[fqn], modules[successors[fqn]]
            assert isinstance(layer, MaskedLinear) and isinstance(consumer, MaskedLinear)
            masks.setdefault(fqn, {})["neuron_mask"] = torch.ones_like(layer.neuron_mask)
            masks.setdefault(successors[fqn], {})["input_mask"] = torch.ones_like(consumer.input_mask)
    optimizers = list(optimizers)
    return sum(
        grow_(modules[fqn], optimizers, name=fqn, regrown_state=regrown_state, **layer_masks)
        for fqn, layer_masks in masks.items()
    )


@dataclass
class StructuredConfig:
    """Settings of one structured Taylor pruning event.

    Args:
        beta: fraction of neurons pruned in every selected layer, in (0, 1).
        window_steps: batches over which neuron importance is averaged before pruning (>= 1).
        targets: candidate layers; those that cannot be neuron-pruned are skipped unless named exactly.
    """

    beta: float
    window_steps: int = 100
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        check_beta("StructuredConfig", self.beta)
        check_steps("StructuredConfig", "window_steps", self.window_steps)
        if self.targets.include_output_layer:
            raise ValueError(
                "StructuredConfig.targets.include_output_layer must be False: output neurons are never pruned"
            )


class NeuronPruner(PrunerBase):
    """Average neuron Taylor importance over the first ``window_steps`` steps, then prune once.

    The mask then stays fixed; ``grow_neurons`` re-opens it (alternate grow/prune schedules create one
    ``NeuronPruner`` per sparse phase).

    Example::

        pruner = NeuronPruner(model, StructuredConfig(beta=0.7, window_steps=200))
        IncrementalTrainer(model, TrainConfig(), hooks=[pruner]).run(stream)
    """

    def __init__(self, model: nn.Module, config: StructuredConfig) -> None:
        selected = select_linears(model, config.targets, "NeuronPruner")
        successors = neuron_successors(model, config.targets.output_layer)
        for pattern in config.targets.include:
            if pattern in selected and pattern not in successors:
                raise _why_not_prunable(model, pattern, config.targets.output_layer)
        layers = {fqn: layer for fqn, layer in selected.items() if fqn in successors}
        if not layers:
            raise ValueError(f"NeuronPruner: none of {sorted(selected)} can be neuron-pruned")
        super().__init__(layers)
        self.config = config
        self.successors = {fqn: successors[fqn] for fqn in layers}
        self._modules = {**layers, **{s: dict(model.named_modules())[s] for s in self.successors.values()}}
        self.scorer = NeuronTaylor()
        self.schedule = OneShot(config.window_steps)
        self.kept: dict[str, int] = {}

    def before_step(self, ctx: StepContext) -> None:
        if not self.finalized:
            self.scorer.observe(self.linears)

    def after_step(self, ctx: StepContext) -> None:
        if self.finalized:
            return
        self.steps += 1
        if self.schedule.progress(self.steps) is not None:
            self.finalize(ctx)

    def finalize(self, ctx_or_optimizers: OptimizersArg = None) -> None:
        """Prune now from the importance gathered so far (if any batch was seen) and stop."""
        if self.finalized:
            return
        if self.scorer.batches:
            importances = self.scorer.scores(self.linears)
            self.kept = _prune_layers(
                self._modules,
                self.successors,
                self.config.beta,
                importances,
                optimizers_of(ctx_or_optimizers),
            )
        self.finalized = True

    def state_dict(self) -> dict[str, Any]:
        """Steps, finalized flag, unit shapes, the importance gathered so far and the kept counts."""
        return {**super().state_dict(), "scorer": self.scorer.state_dict(), "kept": dict(self.kept)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scorer.load_state_dict(state["scorer"])
        self.kept = dict(state["kept"])
