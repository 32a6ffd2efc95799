"""One process trains its tables in TorchRec's ``FusedEmbeddingBagCollection``, without DMP.

On a one-rank group DMP's sharded collection runs the same fused kernel as a
``FusedEmbeddingBagCollection`` but adds the input and output distribution, awaitables and profiler
ranges around it: 0.5-0.7 ms of a 1 ms embedding forward and backward at batch 128 on the reference
DLRM, 12% of a whole step. A one-process job therefore swaps each ``EmbeddingBagCollection`` for a
``FusedEmbeddingBagCollection`` of the same tables and weights, with the fused optimizer DMP would use
(``ShardingConfig.fused_optimizer``: same kernel, same defaults), and trains the rest with the dense
optimizer ``shard`` would build.

``table_optimizer`` exposes the kernels' state under DMP's keys (parameter
``<collection>.embedding_bags.<table>.weight``, state ``<table>.momentum1``), and a
``FusedEmbeddingBagCollection``'s state dict has an
``EmbeddingBagCollection``'s keys: run checkpoints, replica copies and mask surgery read and write the
same state in one process as on every torchrun rank, and a one-process run checkpoint of either kind
resumes in the other.

Example::

    config = ShardingConfig(fused_optimizer="adagrad", lr=0.05)
    model = fuse_tables(wrap(build_dlrm(DLRMConfig())), config)
    optimizer = dense_optimizer(model, config)  # torchrec_prune.distributed.dmp
    loss, _ = model(batch)
    loss.backward()  # the tables step here
    optimizer.step()
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_prune.distributed.dmp import ShardingConfig

# The torch optimizer TorchRec maps onto each fused kernel optimizer of ``FUSED_OPTIMIZERS``.
FUSED_OPTIMIZER_TYPES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}


@torch.no_grad()
def fuse_tables(model: nn.Module, config: ShardingConfig) -> nn.Module:
    """Swap every ``EmbeddingBagCollection`` of ``model`` (``model`` itself included) for a
    ``FusedEmbeddingBagCollection`` of the same tables, weights and device, whose backward steps the
    tables with ``config.fused_optimizer`` at ``config.lr``. Returns the model (the new collection when
    ``model`` is one). Wrapped collections are swapped inside their wrapper; ``EmbeddingCollection`` modules
    are left as they are (the dense optimizer trains them).
    """
    if isinstance(model, EmbeddingBagCollection):
        return _fused(model, config)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                setattr(parent, name, _fused(child, config))
    return model


def _fused(ebc: EmbeddingBagCollection, config: ShardingConfig) -> FusedEmbeddingBagCollection:
    fused = FusedEmbeddingBagCollection(
        tables=ebc.embedding_bag_configs(),
        optimizer_type=FUSED_OPTIMIZER_TYPES[config.fused_optimizer],
        optimizer_kwargs={"lr": config.lr},
        is_weighted=ebc.is_weighted(),
        device=ebc.device,
    )
    fused.load_state_dict(ebc.state_dict())  # the kernel's weights, through views of them
    return fused


def table_optimizer(model: nn.Module) -> KeyedOptimizer | None:
    """The optimizer that steps ``model``'s tables inside the backward, or ``None`` when none does.

    Under DMP it is the model's own ``fused_optimizer``. For ``FusedEmbeddingBagCollection`` modules held
    directly it is a view over their kernels' state (the tensors themselves, not copies), keyed as DMP
    keys it, so ``state_dict``/``load_state_dict`` read and write the live state.
    """
    dmp = getattr(model, "fused_optimizer", None)
    if dmp is not None and not callable(dmp):
        return dmp
    params: dict[str, torch.Tensor] = {}
    state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    groups: list[dict] = []
    for path, module in model.named_modules():
        if not isinstance(module, FusedEmbeddingBagCollection):
            continue
        kernels = module.fused_optimizer()
        prefix = f"{path}.embedding_bags." if path else "embedding_bags."
        for key, weight in kernels.params.items():
            table = key.removesuffix(".weight")
            params[prefix + key] = weight
            # FusedEmbeddingBagCollection names its state "<table>.weight.momentum_1", DMP "<table>.momentum1"
            state[weight] = {
                f"{table}.{name.rpartition('.')[2].replace('_', '')}": value
                for name, value in kernels.state[weight].items()
            }
        groups.extend(kernels.param_groups)
    if not params:
        return None
    return KeyedOptimizer(params, state, groups)
