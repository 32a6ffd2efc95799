"""A model together with the optimizers that train it: the unit that is checkpointed, copied and restored.

Schedules that keep several models of one structure (D2S: the dense model, its snapshots, pruning jobs,
serving models) never deep-copy a model: a ``ReplicaFactory`` builds an empty replica and ``copy_`` fills
it. Deep copies fail under DMP (a sharded model holds process groups) and would not be sharded like the
original; a factory shards every replica with one plan, so local shards line up and copying is a local,
in-place ``load_state_dict`` on each rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_prune.distributed.dmp import ShardingConfig, dense_optimizer, shard
from torchrec_prune.distributed.fused_tables import fuse_tables, table_optimizer
from torchrec_prune.masks import wrap


@dataclass
class Replica:
    """A model and its dense optimizers.

    Under DMP, and in one process with fused tables, the embedding tables train with the fused
    optimizer of the model (``table_optimizer(model)``); it is not listed in ``optimizers`` (the
    trainer never steps it) but is part of the replica's state wherever the replica is saved or copied.
    """

    model: nn.Module
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)


class ReplicaFactory(Protocol):
    """Builds replicas of one model structure and copies state between them."""

    def build(self) -> Replica:
        """A new model of the structure (weights arbitrary until ``copy_``) and its optimizers."""
        ...

    def copy_(self, dst: Replica, src: Replica) -> None:
        """Make ``dst`` an independent copy of ``src``: weights, masks and all optimizer state."""
        ...


@torch.no_grad()
def copy_replica_(dst: Replica, src: Replica) -> None:
    """Copy weights, masks (buffers), dense and fused optimizer state of ``src`` into ``dst`` in place.

    Both must have the same structure and, under DMP, the same sharding plan. ``dst`` shares no tensor
    with ``src`` afterwards.

    Example::

        snapshot = factory.build()
        copy_replica_(snapshot, dense)  # what both factories' ``copy_`` do
    """
    if len(dst.optimizers) != len(src.optimizers):
        raise ValueError(
            f"cannot copy a replica with {len(src.optimizers)} optimizers into one with {len(dst.optimizers)}"
        )
    dst.model.load_state_dict(src.model.state_dict())
    for mine, theirs in zip(dst.optimizers, src.optimizers, strict=True):
        _copy_optimizer_(mine, theirs)
    fused_dst, fused_src = table_optimizer(dst.model), table_optimizer(src.model)
    if (fused_dst is None) != (fused_src is None):
        raise ValueError("cannot copy between a replica with fused tables and one without")
    if fused_dst is not None:
        _copy_optimizer_(fused_dst, fused_src)


def _copy_optimizer_(dst: torch.optim.Optimizer, src: torch.optim.Optimizer) -> None:
    if isinstance(dst, KeyedOptimizer):
        # TorchRec copies into dst's own state tensors (local shards included), which must exist first.
        if len(dst.state) != len(src.state):
            dst.init_state()
        dst.load_state_dict(src.state_dict())
    else:
        # torch.optim keeps the loaded tensors themselves: without a copy both would share their state.
        dst.load_state_dict(copy.deepcopy(src.state_dict()))


class LocalReplicaFactory:
    """Replicas of a model in one process: deep copies of a template, optimizers from a function (for
    models without a ``FusedEmbeddingBagCollection``, which a deep copy breaks: ``FusedReplicaFactory``).

    Args:
        template: a model of the structure (deep-copied now; its later training does not matter).
        optimizers: builds a model's dense optimizers.

    Example::

        factory = LocalReplicaFactory(model, lambda m: [make_optimizer(m.parameters(), TrainConfig())])
        snapshot = factory.build()
        factory.copy_(snapshot, Replica(model, optimizers))
    """

    def __init__(
        self, template: nn.Module, optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]]
    ) -> None:
        if any(isinstance(m, FusedEmbeddingBagCollection) for m in template.modules()):
            # a deep copy's table Parameters no longer view its kernel's weights: its training is lost
            raise ValueError(
                "LocalReplicaFactory cannot deep-copy a model with a FusedEmbeddingBagCollection: "
                "build its replicas with FusedReplicaFactory(model_fn, config)"
            )
        self.template = copy.deepcopy(template)
        self.optimizers = optimizers

    def build(self) -> Replica:
        model = copy.deepcopy(self.template)
        return Replica(model, self.optimizers(model))

    def copy_(self, dst: Replica, src: Replica) -> None:
        copy_replica_(dst, src)


class FusedReplicaFactory:
    """Replicas of one process: the model of ``model_fn``, wrapped, with its tables fused
    (``fuse_tables``), and the dense optimizer of ``config``: the one-process counterpart of
    ``DMPReplicaFactory``, with the same optimizers and state keys.

    Args:
        model_fn: builds the unwrapped model on this process's device.
        config: optimizers (``fused_optimizer``, ``dense_optimizer``, learning rates).

    Example::

        factory = FusedReplicaFactory(lambda: build_dlrm(cfg), sharding_config(train))
        dense = factory.build()
        D2SController(dense, stream, train, D2SConfig(), factory=factory).run()
    """

    def __init__(self, model_fn: Callable[[], nn.Module], config: ShardingConfig) -> None:
        self.model_fn = model_fn
        self.config = config

    def build(self) -> Replica:
        model = fuse_tables(wrap(self.model_fn()), self.config)
        return Replica(model, [dense_optimizer(model, self.config)])

    def copy_(self, dst: Replica, src: Replica) -> None:
        copy_replica_(dst, src)


class DMPReplicaFactory:
    """Replicas sharded by DMP, all with the plan of the first one built (so local shards line up).

    Every ``build`` is collective (DMP's construction syncs the dense parameters): call it on every rank
    in the same order. ``copy_`` is local to each rank.

    Args:
        model_fn: builds the unwrapped model on ``meta`` (the factory wraps and shards it).
        device: this rank's device (``init_distributed()``).
        config: optimizers and planner settings.
        plan: the plan to shard with; by default the one planned (collectively) for the first replica.
        pg: process group (default: the world).

    Example::

        factory = DMPReplicaFactory(lambda: build_dlrm(cfg, device="meta"), init_distributed(), sharding)
        dense = factory.build()
        D2SController(dense, stream, train, D2SConfig(), factory=factory).run()
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        device: torch.device,
        config: ShardingConfig | None = None,
        *,
        plan: ShardingPlan | None = None,
        pg: dist.ProcessGroup | None = None,
    ) -> None:
        self.model_fn = model_fn
        self.device = device
        self.config = config
        self.plan = plan
        self.pg = pg

    def build(self) -> Replica:
        sharded = shard(wrap(self.model_fn()), self.device, self.config, pg=self.pg, plan=self.plan)
        self.plan = sharded.plan
        return Replica(sharded.model, [sharded.optimizer])

    def copy_(self, dst: Replica, src: Replica) -> None:
        copy_replica_(dst, src)
