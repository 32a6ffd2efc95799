"""One rank of tests/test_your_model_distributed.py: user models under 2-rank DMP (gloo on CPU).

Usage: torchrun --standalone --nproc_per_node 2 your_model_worker.py OUT_DIR

For an EmbeddingCollection model and DLRM_DCN: wrap on meta, shard (the wrapped plan equals the plain
model's, every table planned), train with a custom forward, prune, refuse wrap() after DMP, checkpoint
round trip; then grow/prune on a user multi-hot BatchStream with every phase present. Each rank writes
what it saw to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM_DCN, DLRM_Projection
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import torchrec_prune as tp
from tests.test_your_model import (
    NUM_DENSE,
    FusedModel,
    SequenceModel,
    bag_tables,
    forward_fn,
    make_batch,
)
from torchrec_prune.data.stream import BatchStream
from torchrec_prune.distributed.checkpoint import load_checkpoint, save_checkpoint
from torchrec_prune.distributed.dmp import (
    ShardingConfig,
    init_distributed,
    plan_by_table,
    plan_sharding,
    shard,
)
from torchrec_prune.masks import MaskedEmbeddings, masked_modules
from torchrec_prune.schedules.grow_prune import GrowPruneConfig, run_grow_prune
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.trainer import TrainConfig

SHARDING = ShardingConfig(fused_optimizer="adagrad", dense_optimizer="adagrad", lr=0.05, batch_size=8)


def build(name: str) -> torch.nn.Module:
    if name == "embedding_collection":
        return SequenceModel(device="meta")
    if name == "fused_ebc":
        torch.manual_seed(0)  # built on CPU (its kernel allocates at construction): same weights per rank
        return FusedModel()
    meta = torch.device("meta")
    ebc = EmbeddingBagCollection(tables=bag_tables(), device=meta)
    if name == "deepfm":
        return SimpleDeepFMNN(NUM_DENSE, ebc, 8, 4)
    if name == "dlrm_projection":
        return DLRM_Projection(ebc, NUM_DENSE, [8, 4], [8, 1], [8, 4], [8, 4], dense_device=meta)
    return DLRM_DCN(ebc, NUM_DENSE, [8, 4], [8, 1], dcn_num_layers=2, dcn_low_rank_dim=2, dense_device=meta)


def wrapped(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.UnwrappedModuleWarning)
        return tp.wrap(build(name))


def check_model(name: str, device: torch.device, out: Path, rank: int) -> dict[str, object]:
    plain_plan = plan_sharding(build(name), SHARDING, world_size=2, pg=dist.group.WORLD)
    sharded = shard(wrapped(name), device, SHARDING)
    same_plan = plan_by_table(plain_plan) == plan_by_table(sharded.plan)
    tables = sorted(plan_by_table(sharded.plan))
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss, _ = forward_fn(sharded.model, make_batch(generator))
        loss.backward()
        sharded.optimizer.step()
        sharded.optimizer.zero_grad()
    for _, module in masked_modules(sharded.model):
        if isinstance(module, MaskedEmbeddings):
            tp.prune_(
                module, [sharded.optimizer], dim_masks={t: torch.arange(4) != 2 for t in module.table_names}
            )
    try:
        tp.wrap(sharded.model)
        refused = ""
    except TypeError as err:
        refused = str(err)
    batch = make_batch(torch.Generator().manual_seed(10 + rank))
    with torch.no_grad():
        before = sharded.model(batch.dense_features, batch.sparse_features)
    save_checkpoint(sharded.model, out / f"ckpt-{name}")
    fresh = shard(wrapped(name), device, SHARDING, plan=sharded.plan)
    load_checkpoint(fresh.model, out / f"ckpt-{name}")
    with torch.no_grad():
        after = fresh.model(batch.dense_features, batch.sparse_features)
    return {
        "same_plan": same_plan,
        "tables": tables,
        "refused": refused,
        "round_trip": bool(torch.allclose(before, after, atol=1e-6)),
        "finite": bool(torch.isfinite(before).all()),
    }


def grow_prune(device: torch.device) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)  # the same global stream on both ranks
    stream = BatchStream([make_batch(generator, 10) for _ in range(32)])  # 320 rows
    sharded = shard(wrapped("embedding_collection"), device, SHARDING)
    train = TrainConfig(batch_size=8, increment_rows=64, window=64, progress=False)
    plan = PhasePlan.every(0.2)
    result = run_grow_prune(
        sharded.model,
        stream,
        train,
        GrowPruneConfig(plan, beta=0.5, window_steps=2),
        forward_fn=forward_fn,
        optimizers=[sharded.optimizer],
    )
    return {
        "planned": [f"{p.kind}{i}" for i, p in enumerate(plan.phases)],
        "phases": [p.label for p in result.phases],
        "steps": [p.steps for p in result.phases],
    }


def d2s(device: torch.device) -> dict[str, object]:
    """D2S on the user stream: every job data-parallel over both ranks, replicas sharded by one factory."""
    from torchrec_prune.pruners.aux import AuxConfig
    from torchrec_prune.schedules.d2s import D2SConfig, D2SController
    from torchrec_prune.train.replica import DMPReplicaFactory

    generator = torch.Generator().manual_seed(0)
    stream = BatchStream([make_batch(generator, 10) for _ in range(24)])  # 240 rows, 6 increments of 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.UnwrappedModuleWarning)
        factory = DMPReplicaFactory(lambda: SequenceModel(device="meta"), device, SHARDING)
        dense = factory.build()
    train = TrainConfig(batch_size=4, increment_rows=40, window=40, progress=False)
    config = D2SConfig(r=2, p=1, aux=AuxConfig(lam=1.5, eps=1.0), lines=("fixed",))
    controller = D2SController(dense, stream, train, config, factory=factory, forward_fn=forward_fn)
    result = controller.run()
    line = controller.lines["fixed"]
    masks = {
        fqn: module.weight_mask.tolist()
        for fqn, module in masked_modules(line.current.replica.model)
        if hasattr(module, "weight_mask")
    }
    return {
        "births": result.lines["fixed"].births,
        "sparsity": result.lines["fixed"].sparsity,
        "ends": [r.samples_end for r in result.lines["fixed"].records],
        "masks": masks,
    }


def main() -> None:
    out = Path(sys.argv[1])
    device = init_distributed()
    rank = dist.get_rank()
    names = ("embedding_collection", "dlrm_dcn", "deepfm", "dlrm_projection", "fused_ebc")
    seen = {name: check_model(name, device, out, rank) for name in names}
    seen["grow_prune"] = grow_prune(device)
    seen["d2s"] = d2s(device)
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
