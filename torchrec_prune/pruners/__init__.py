"""Pruning algorithms as trainer hooks: AUX, gradual MP/TP/MoP, structured Taylor neuron pruning and UMEC.

Each algorithm composes an importance scorer (``torchrec_prune.importance``), a mask rule (``rules``)
and a schedule (``schedules``) over the modules chosen by ``Targets``.
"""

from torchrec_prune.pruners.aux import AuxConfig, AuxPruner
from torchrec_prune.pruners.base import LayerStats, Pruner, PrunerBase, overall_sparsity
from torchrec_prune.pruners.gradual import (
    GradualConfig,
    GradualPruner,
    magnitude_pruner,
    momentum_pruner,
    taylor_pruner,
)
from torchrec_prune.pruners.rules import TopK, latent_sign, topk_mask
from torchrec_prune.pruners.schedules import LinearRamp, OneShot, Schedule
from torchrec_prune.pruners.structured import (
    NeuronPruner,
    StructuredConfig,
    grow_neurons,
    neuron_successors,
    prune_neurons,
)
from torchrec_prune.pruners.targets import Targets, output_layer_fqn
from torchrec_prune.pruners.umec import UMECConfig, UMECPruner

__all__ = [
    "AuxConfig",
    "AuxPruner",
    "GradualConfig",
    "GradualPruner",
    "LayerStats",
    "LinearRamp",
    "NeuronPruner",
    "OneShot",
    "Pruner",
    "PrunerBase",
    "Schedule",
    "StructuredConfig",
    "Targets",
    "TopK",
    "UMECConfig",
    "UMECPruner",
    "grow_neurons",
    "latent_sign",
    "magnitude_pruner",
    "momentum_pruner",
    "neuron_successors",
    "output_layer_fqn",
    "overall_sparsity",
    "prune_neurons",
    "taylor_pruner",
    "topk_mask",
]
