"""One torchrun rank of the D2S test (tests/test_d2s_distributed.py): D2S under DMP on gloo.

Usage: d2s_worker.py OUT_DIR

Every job (dense, pruning, serving) is data-parallel over both ranks. Every rank starts from the
weights of the one-process model built with seed 0, which rank 0 also writes to OUT_DIR/initial.pt for
the one-process reference run; rank 0 writes what both ranks saw to OUT_DIR/result.json. After
increment ``RESUME_AFTER`` the run is "checkpointed" in memory (replicas copied with the factory, which
copies local shards and fused optimizer state, plus ``state_dict()``) and resumed in a new controller.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.distributed.checkpoint import is_mask_key
from torchrec_prune.distributed.dmp import init_distributed
from torchrec_prune.masks import wrap
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import AuxConfig
from torchrec_prune.schedules import D2SConfig, D2SController
from torchrec_prune.train.job import sharding_config
from torchrec_prune.train.replica import DMPReplicaFactory
from torchrec_prune.train.trainer import TrainConfig

MODEL = DLRMConfig(
    num_dense=4, num_sparse=4, num_embeddings=1000, embedding_dim=4, dense_arch=[16, 4], over_arch=[16, 8, 1]
)
ROWS = 12_000
TRAIN = TrainConfig(batch_size=64, lr=0.05, window=1_000, increment_rows=2_000, progress=False)  # per rank
TRAIN_ONE_PROCESS = replace(TRAIN, batch_size=2 * TRAIN.batch_size)  # the same global batches
RESUME_AFTER = 3
D2S = D2SConfig(
    r=2, p=1, warmup=1, threshold=0.003, aux=AuxConfig(lam=1.75, eps=0.3), lines=("fixed", "adaptive")
)


def stream() -> SyntheticStream:
    return SyntheticStream(ROWS, drift=2.0, num_dense=4, num_sparse=4, num_embeddings=1000)


def initial_model() -> nn.Module:
    torch.manual_seed(0)
    return wrap(build_dlrm(MODEL))


@torch.no_grad()
def load_full_(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a DMP model: each rank copies the blocks of its local shards."""
    state = model.state_dict()
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(full[key][r : r + h, c : c + w])
        else:
            value.copy_(full[key])
    model.load_state_dict(state)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    device = init_distributed()
    rank = dist.get_rank()
    initial = initial_model().state_dict()
    factory = DMPReplicaFactory(lambda: build_dlrm(MODEL, device="meta"), device, sharding_config(TRAIN))
    dense = factory.build()
    load_full_(dense.model, initial)
    controller = D2SController(dense, stream(), TRAIN, D2S, factory=factory)
    saved: dict[str, Any] = {}

    def checkpoint(k: int) -> None:
        if k == RESUME_AFTER:
            saved["state"] = copy.deepcopy(controller.state_dict())
            for name, replica in controller.replicas().items():
                saved[name] = factory.build()
                factory.copy_(saved[name], replica)

    result = controller.run(on_increment_end=checkpoint)
    resumed = D2SController(factory.build(), stream(), TRAIN, D2S, factory=factory)
    resumed.prepare_resume(saved["state"])
    for name, replica in resumed.replicas().items():
        factory.copy_(replica, saved[name])
    resumed.load_state_dict(saved["state"])
    again = resumed.run()
    masks = {
        name: {k: v.clone() for k, v in line.current.model.state_dict().items() if is_mask_key(k)}
        for name, line in controller.lines.items()
    }
    seen = {
        name: {"births": line.births, "gaps": line.gaps, "ce": [r.ce for r in line.records]}
        for name, line in result.lines.items()
    }
    all_masks: list = [None] * dist.get_world_size()
    all_seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_masks, masks)
    dist.all_gather_object(all_seen, seen)
    if rank == 0:
        torch.save(initial, out / "initial.pt")
        summary = {
            "lines": seen,
            "dense_ce": [r.ce for r in result.dense],
            "masks_identical": all(
                torch.equal(masks[n][k], other[n][k]) for other in all_masks for n in masks for k in masks[n]
            ),
            "decisions_identical": all(other == seen for other in all_seen),
            "resume_identical": again.dense == result.dense
            and all(again.lines[n].records == line.records for n, line in result.lines.items())
            and all(again.lines[n].births == line.births for n, line in result.lines.items()),
            "pruned": {
                n: int(sum((~v).sum() for k, v in m.items() if k.endswith("weight_mask")))
                for n, m in masks.items()
            },
        }
        (out / "result.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
