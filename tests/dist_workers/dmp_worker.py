"""One rank of the DMP test (tests/test_distributed_dmp.py), launched by torchrun on loopback with gloo.

Usage: torchrun --standalone --nproc_per_node 2 dmp_worker.py OUT_DIR CKPT_DIR

Every check asserts here and records what it saw in OUT_DIR/rank<r>.json, which the pytest side checks
again; a failure is recorded with its traceback and re-raised.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.planner import ParameterConstraints
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_prune.distributed.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from torchrec_prune.distributed.dmp import (
    ShardedModel,
    ShardingConfig,
    init_distributed,
    plan_by_table,
    plan_sharding,
    shard,
)
from torchrec_prune.masks import (
    MaskedEmbeddingBagCollection,
    MaskedLinear,
    grow_,
    masked_modules,
    prune_,
    wrap,
)
from torchrec_prune.masks.compact import compact_, compacted_layers, expand_, expanded
from torchrec_prune.masks.surgery import fused_state_blocks
from torchrec_prune.models.dlrm import DLRMConfig, build_dlrm
from torchrec_prune.pruners.structured import neuron_successors, prune_neurons
from torchrec_prune.train.replica import Replica, copy_replica_

CONFIG = DLRMConfig(num_sparse=4, num_embeddings=100, embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1])
OTHER_CONFIG = DLRMConfig(
    num_sparse=4, num_embeddings=100, embedding_dim=8, dense_arch=[32, 8], over_arch=[16, 1]
)
# One table of each kind: data-parallel (trained by the dense optimizer), column-wise over both ranks,
# and two that the planner places freely (table-wise on CPU).
CONSTRAINTS = {
    "t_cat_0": ParameterConstraints(sharding_types=["data_parallel"]),
    "t_cat_1": ParameterConstraints(sharding_types=["column_wise"], min_partition=4),
}
EBC = "model.sparse_arch.embedding_bag_collection"
PRUNED_COLUMNS = {"t_cat_0": [3], "t_cat_1": [1, 6], "t_cat_2": [2]}
SHARDED_PRUNED = {t: c for t, c in PRUNED_COLUMNS.items() if t != "t_cat_0"}
PRUNED_NEURONS = [1, 4]  # of the first bottom-MLP layer (16 neurons)
ID_RANGE = 20  # batches reuse few rows, so the optimizer state of every row fills up
LR = 0.05


def sharding_config(fused_optimizer: str) -> ShardingConfig:
    return ShardingConfig(
        fused_optimizer=fused_optimizer,
        dense_optimizer="adagrad",
        lr=LR,
        batch_size=16,
        constraints=CONSTRAINTS,
    )


def build(config: DLRMConfig, sharding: ShardingConfig, device: torch.device, **kwargs: Any) -> ShardedModel:
    return shard(wrap(build_dlrm(config, device="meta")), device, sharding, **kwargs)


def make_batch(generator: torch.Generator, batch_size: int = 16) -> Batch:
    lengths = torch.randint(1, 3, (CONFIG.num_sparse * batch_size,), generator=generator)
    values = torch.randint(0, ID_RANGE, (int(lengths.sum()),), generator=generator)
    return Batch(
        dense_features=torch.randn(batch_size, CONFIG.num_dense, generator=generator),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(CONFIG.feature_names, values, lengths),
        labels=torch.randint(0, 2, (batch_size,), generator=generator).float(),
    )


def train(sharded: ShardedModel, generator: torch.Generator, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss, _ = sharded.model(make_batch(generator))
        loss.backward()
        sharded.optimizer.step()
        sharded.optimizer.zero_grad()
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses), losses
    return losses


def masked_ebc(sharded: ShardedModel) -> MaskedEmbeddingBagCollection:
    return next(m for _, m in masked_modules(sharded.model) if isinstance(m, MaskedEmbeddingBagCollection))


def bottom_layers(sharded: ShardedModel) -> list[MaskedLinear]:
    return [m for fqn, m in masked_modules(sharded.model) if "dense_arch" in fqn]  # type: ignore[misc]


def table_blocks(state: dict[str, Any], table: str) -> list[tuple[int, torch.Tensor]]:
    """(first column, tensor) of every block of a table weight this rank holds in a state dict."""
    value = state[f"{EBC}.ebc.embedding_bags.{table}.weight"]
    if isinstance(value, ShardedTensor):
        return [(int(s.metadata.shard_offsets[1]), s.tensor) for s in value.local_shards()]
    return [(0, value)]


def local_columns(cols: list[int], col0: int, width: int) -> list[int]:
    return [c - col0 for c in cols if col0 <= c < col0 + width]


def pruned_entries_held(state: dict[str, Any]) -> dict[str, int]:
    """Per table, how many pruned-column entries this rank holds; asserts they are exactly zero."""
    held = {}
    for table, cols in PRUNED_COLUMNS.items():
        held[table] = 0
        for col0, block in table_blocks(state, table):
            local = local_columns(cols, col0, block.shape[1])
            assert torch.count_nonzero(block[:, local]) == 0, (table, local)
            held[table] += block[:, local].numel()
    return held


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ in any bit (sharded tables compared local shard by local shard)."""
    assert a.keys() == b.keys()
    differ = []
    for key, x in a.items():
        y = b[key]
        if isinstance(x, ShardedTensor):
            xs, ys = x.local_shards(), y.local_shards()
            equal = len(xs) == len(ys) and all(
                s.metadata.shard_offsets == t.metadata.shard_offsets and torch.equal(s.tensor, t.tensor)
                for s, t in zip(xs, ys, strict=True)
            )
        else:
            equal = torch.equal(x, y)
        if not equal:
            differ.append(key)
    return differ


def checksums(state: dict[str, Any]) -> dict[str, float]:
    """float64 sum of this rank's part of every entry: local shards of sharded tables, else the tensor."""
    out = {}
    for key, value in state.items():
        parts = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        out[key] = sum(float(p.double().sum()) for p in parts)
    return out


def mask_keys(model: torch.nn.Module) -> list[str]:
    return sorted(
        f"{fqn}.{name}"
        for fqn, module in masked_modules(model)
        for name in module.state_dict(keep_vars=True)  # an open element mask is a key, not a held buffer
        if name.endswith(("_mask", "feature_gate")) or name.startswith("dim_masks.")
    )


def check_plan(device: torch.device, world: int) -> tuple[ShardedModel, list[str], dict[str, Any]]:
    """(1) The wrapped model, wrapped on meta before DMP, gets the unwrapped model's plan per table."""
    sharding = sharding_config("rowwise_adagrad")
    plain_plan = plan_sharding(build_dlrm(CONFIG, "meta"), sharding, world_size=world, pg=dist.group.WORLD)
    wrapped = wrap(build_dlrm(CONFIG, "meta"))
    keys = mask_keys(wrapped)
    sharded = shard(wrapped, device, sharding)
    plain, mine = plan_by_table(plain_plan), plan_by_table(sharded.plan)
    assert plain == mine, (plain, mine)
    return (
        sharded,
        keys,
        {
            "identical": plain == mine,
            "modules": sorted(sharded.plan.plan),
            "plain_modules": sorted(plain_plan.plan),
            "tables": {
                t: [s.sharding_type, s.compute_kernel, list(s.ranks), len(s.shards)] for t, s in mine.items()
            },
        },
    )


def check_masks_open(sharded: ShardedModel, keys: list[str]) -> dict[str, Any]:
    """(3) Every mask buffer is in DMP's state dict and all-True after DMP materialised the model."""
    state = sharded.model.state_dict()
    missing = [k for k in keys if k not in state]
    closed = [k for k in keys if k in state and not bool(state[k].all())]
    assert keys and not missing and not closed, (missing, closed)
    return {"keys": keys, "missing": missing, "not_all_true": closed}


def check_prune(sharded: ShardedModel, generator: torch.Generator) -> dict[str, Any]:
    """(5) prune_ on the sharded model zeros the columns in the live fused weights; they stay zero."""
    mebc = masked_ebc(sharded)
    state = sharded.model.state_dict()
    kernel_storages = {
        t.untyped_storage().data_ptr()
        for lookup in mebc.ebc._lookups
        for emb in getattr(lookup, "module", lookup)._emb_modules
        for t in [*emb._emb_module.parameters(), *emb._emb_module.buffers()]
    }
    views = {
        table: all(b.untyped_storage().data_ptr() in kernel_storages for _, b in table_blocks(state, table))
        for table in PRUNED_COLUMNS
    }
    assert all(views.values()), views
    dims = {t: torch.ones(CONFIG.embedding_dim, dtype=torch.bool) for t in PRUNED_COLUMNS}
    for table, cols in PRUNED_COLUMNS.items():
        dims[table][cols] = False
    closed_columns = prune_(mebc, [sharded.optimizer], dim_masks=dims)
    layer, following = bottom_layers(sharded)[:2]
    neurons = torch.ones(layer.out_features, dtype=torch.bool)
    neurons[PRUNED_NEURONS] = False
    closed_weights = prune_(layer, [sharded.optimizer], neuron_mask=neurons)
    prune_(following, [sharded.optimizer], input_mask=neurons)
    held_after_prune = pruned_entries_held(sharded.model.state_dict())

    # The kernel reads the zeros: the inner, unmasked lookup returns zeros in the pruned columns.
    pooled = mebc.ebc(make_batch(generator).sparse_features)
    lookup = {}
    for key, values in zip(pooled.keys(), pooled.values().split(pooled.length_per_key(), dim=1), strict=True):
        table = mebc.table_of(key)
        if table in PRUNED_COLUMNS:
            kept = [c for c in range(CONFIG.embedding_dim) if c not in PRUNED_COLUMNS[table]]
            lookup[table] = {
                "pruned_nonzero": int(torch.count_nonzero(values[:, PRUNED_COLUMNS[table]])),
                "kept_nonzero": int(torch.count_nonzero(values[:, kept])),
            }
            assert lookup[table]["pruned_nonzero"] == 0 < lookup[table]["kept_nonzero"], (table, lookup)

    before = checksums(sharded.model.state_dict())
    losses = train(sharded, generator, 3)
    state = sharded.model.state_dict()
    held_after_training = pruned_entries_held(state)
    neurons_zero = (
        torch.count_nonzero(layer.weight[PRUNED_NEURONS]) == 0
        and torch.count_nonzero(layer.effective_bias()[PRUNED_NEURONS]) == 0
        and torch.count_nonzero(following.weight[:, PRUNED_NEURONS]) == 0
    )
    assert neurons_zero
    after = checksums(state)
    changed = sorted(k for k in after if after[k] != before[k] and k.endswith(".weight"))
    dense = torch.cat([p.detach().flatten() for _, p in sharded.optimizer.params.items()])
    replicas = [torch.zeros_like(dense) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, dense)
    replicas_equal = all(torch.equal(r, replicas[0]) for r in replicas)
    assert replicas_equal
    return {
        "closed_columns": closed_columns,
        "closed_weights": closed_weights,
        "local_shards_are_kernel_views": views,
        "held_after_prune": held_after_prune,
        "held_after_training": held_after_training,
        "lookup": lookup,
        "pruned_neurons_zero": bool(neurons_zero),
        "weights_changed_by_training": changed,
        "dense_replicas_equal": replicas_equal,
        "losses": losses,
    }


def check_checkpoint(
    sharded: ShardedModel, keys: list[str], ckpt: Path, device: torch.device, generator: torch.Generator
) -> dict[str, Any]:
    """(4) A DCP round trip into a freshly built and sharded model restores weights and masks exactly."""
    save_checkpoint(sharded.model, ckpt)
    fresh = build(CONFIG, sharding_config("rowwise_adagrad"), device, plan=sharded.plan)
    saved = sharded.model.state_dict()
    differ_before = differing_keys(saved, fresh.model.state_dict())
    load_checkpoint(fresh.model, ckpt)
    differ_after = differing_keys(saved, fresh.model.state_dict())
    assert differ_before and not differ_after, differ_after
    batch = make_batch(generator)
    logits_equal = torch.equal(sharded.model(batch)[1][1], fresh.model(batch)[1][1])
    assert logits_equal
    return {
        "differ_before_load": differ_before,
        "differ_after_load": differ_after,
        "mask_keys_differing_before_load": sorted(set(differ_before) & set(keys)),
        "logits_equal": logits_equal,
        "checksums": checksums(saved),
        "sharded_keys": sorted(k for k, v in saved.items() if isinstance(v, ShardedTensor)),
    }


def check_mismatch(ckpt: Path, device: torch.device) -> str:
    """(6) A checkpoint of another model (other hidden size) is refused, naming keys and shapes."""
    other = build(OTHER_CONFIG, sharding_config("rowwise_adagrad"), device)
    try:
        load_checkpoint(other.model, ckpt)
    except CheckpointMismatchError as err:
        return str(err)
    raise AssertionError("a checkpoint of another model loaded without error")


def check_adagrad_reset(device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    """Exact (per-element) fused Adagrad: closing and re-opening columns resets their accumulators."""
    sharded = build(CONFIG, sharding_config("adagrad"), device)
    ebc = masked_ebc(sharded)
    initial = [block for _, _, block, _ in fused_state_blocks(ebc)]
    assert initial and all(torch.count_nonzero(b) == 0 for b in initial)  # the value a reset restores
    train(sharded, generator, 3)
    dims = {t: torch.ones(CONFIG.embedding_dim, dtype=torch.bool) for t in SHARDED_PRUNED}
    for table, cols in SHARDED_PRUNED.items():
        dims[table][cols] = False
    prune_(ebc, [sharded.optimizer], dim_masks=dims)
    reset = other_nonzero = 0
    for table, _, block, col0 in fused_state_blocks(ebc):
        if table in SHARDED_PRUNED:
            local = local_columns(SHARDED_PRUNED[table], col0, block.shape[1])
            others = [c for c in range(block.shape[1]) if c not in local]
            assert torch.count_nonzero(block[:, local]) == 0
            reset += block[:, local].numel()
            other_nonzero += int(torch.count_nonzero(block[:, others]))
    grow_(ebc, [sharded.optimizer], dim_masks={t: ~m for t, m in dims.items()})
    train(sharded, generator, 1)
    # With a fresh accumulator, a weight regrown at 0 moves by exactly lr * sign(grad) in its first
    # step (up to Adagrad's eps); with the old accumulator it would move by less.
    steps: list[float] = []
    state = sharded.model.state_dict()
    for table, cols in SHARDED_PRUNED.items():
        for col0, block in table_blocks(state, table):
            values = block[:, local_columns(cols, col0, block.shape[1])]
            steps += values[values != 0].abs().tolist()
    assert all(abs(s - LR) < 1e-3 * LR for s in steps), steps
    return {"reset_entries": reset, "other_state_nonzero": other_nonzero, "first_steps": steps}


def train_on(sharded: ShardedModel, batches: list[Batch]) -> list[float]:
    losses = []
    for batch in batches:
        sharded.optimizer.zero_grad()
        loss, _ = sharded.model(batch)
        loss.backward()
        sharded.optimizer.step()
        losses.append(float(loss))
    return losses


def dense_state(sharded: ShardedModel) -> dict[str, torch.Tensor]:
    """Every replicated (DDP) tensor of the model and of the dense optimizer, by name."""
    out = {
        k: v
        for k, v in sharded.model.state_dict().items()
        if isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor)
    }
    for key, state in sharded.optimizer.state_dict()["state"].items():
        out.update({f"opt.{key}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def check_compact(device: torch.device, generator: torch.Generator) -> dict[str, Any]:
    """Compacted layers (DDP rebuilt on both ranks, both ways) train exactly like the masked ones."""
    batches = [make_batch(generator) for _ in range(8)]
    masked, compacted = (build(CONFIG, sharding_config("adagrad"), device) for _ in range(2))
    copy_replica_(Replica(compacted.model, [compacted.optimizer]), Replica(masked.model, [masked.optimizer]))
    losses: dict[str, list[float]] = {}
    shapes: dict[str, list[int]] = {}
    for name, sharded in (("masked", masked), ("compacted", compacted)):
        losses[name] = train_on(sharded, batches[:2])
        modules = dict(sharded.model.named_modules())
        scores = {
            f: torch.arange(modules[f].out_features, dtype=torch.float)
            for f in neuron_successors(sharded.model)
        }
        prune_neurons(sharded.model, 0.5, scores, [sharded.optimizer])
        if name == "compacted":
            compact_(sharded.model, [sharded.optimizer])
            shapes = {f: list(m.weight.shape) for f, m in compacted_layers(sharded.model).items()}
        losses[name] += train_on(sharded, batches[2:6])
    with expanded(compacted.model):
        during = dense_state(compacted)
    expand_(compacted.model)
    for name, sharded in (("masked", masked), ("compacted", compacted)):
        losses[name] += train_on(sharded, batches[6:])
    reference = dense_state(masked)
    after = dense_state(compacted)
    return {
        "losses": losses,
        "shapes": shapes,
        "differing_after": [k for k in reference if not torch.equal(reference[k], after[k])],
        "shapes_during": sorted({k for k in during if during[k].shape != after[k].shape}),
    }


def run(out: dict[str, Any], ckpt: Path) -> None:
    device = init_distributed(backend="gloo")
    torch.manual_seed(dist.get_rank())
    generator = torch.Generator().manual_seed(1000 + dist.get_rank())
    sharded, keys, out["plan"] = check_plan(device, dist.get_world_size())
    out["masks"] = check_masks_open(sharded, keys)
    out["losses"] = train(sharded, generator, 3)  # (2)
    out["prune"] = check_prune(sharded, generator)
    out["checkpoint"] = check_checkpoint(sharded, keys, ckpt, device, generator)
    out["mismatch"] = check_mismatch(ckpt, device)
    out["adagrad_reset"] = check_adagrad_reset(device, generator)
    out["compact"] = check_compact(device, generator)


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    out_dir, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    out: dict[str, Any] = {}
    try:
        run(out, ckpt)
    except BaseException:
        out["error"] = traceback.format_exc()
        raise
    finally:
        rank = dist.get_rank() if dist.is_initialized() else -1
        (out_dir / f"rank{rank}.json").write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
