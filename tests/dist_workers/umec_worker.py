"""One rank of the UMEC-under-DMP test (tests/test_umec_distributed.py), launched by torchrun with gloo.

Usage: torchrun --standalone --nproc_per_node 2 umec_worker.py OUT_DIR

Each rank trains a DMP-sharded wrapped DLRM on its own data with UMEC attached and records what UMEC
decided (s, y, z, the removed groups and every mask), the FLOPs left, and the fused Adagrad state of the
closed embedding columns of the tables it holds, in OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.distributed.planner import ParameterConstraints
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_prune.distributed.dmp import ShardingConfig, init_distributed, shard
from torchrec_prune.masks import MaskedEmbeddingBagCollection, masked_modules, wrap
from torchrec_prune.masks.surgery import fused_state_blocks
from torchrec_prune.models.dlrm import DLRMConfig, build_dlrm
from torchrec_prune.pruners.umec import UMECConfig, UMECPruner
from torchrec_prune.train.flops import fc_flops
from torchrec_prune.train.hooks import StepContext

CONFIG = DLRMConfig(
    num_sparse=4, num_embeddings=40, embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 8, 1]
)
CONSTRAINTS = {  # a data-parallel table, a column-wise one across both ranks, two placed freely
    "t_cat_0": ParameterConstraints(sharding_types=["data_parallel"]),
    "t_cat_1": ParameterConstraints(sharding_types=["column_wise"], min_partition=4),
}
BUDGET = 0.35
STEPS = 8


def make_batch(generator: torch.Generator, batch_size: int = 16) -> Batch:
    lengths = torch.randint(1, 3, (CONFIG.num_sparse * batch_size,), generator=generator)
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=generator)
    return Batch(
        dense_features=torch.randn(batch_size, CONFIG.num_dense, generator=generator),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(CONFIG.feature_names, values, lengths),
        labels=torch.randint(0, 2, (batch_size,), generator=generator).float(),
    )


def run(out: dict[str, Any]) -> None:
    device = init_distributed(backend="gloo")
    torch.manual_seed(0)
    sharding = ShardingConfig(
        fused_optimizer="adagrad", dense_optimizer="adagrad", lr=0.05, batch_size=16, constraints=CONSTRAINTS
    )
    sharded = shard(wrap(build_dlrm(CONFIG, device="meta")), device, sharding)
    model = sharded.model
    # the common-dimension groups need at least as many steps to show; keep the phase short
    pruner = UMECPruner(model, UMECConfig(budget=BUDGET, phase_steps=STEPS, eta4=100.0, record_every=1))
    ctx = StepContext(model=model, optimizers=[sharded.optimizer])
    generator = torch.Generator().manual_seed(1000 + dist.get_rank())  # different data on each rank
    for _ in range(STEPS):
        loss, _ = model(make_batch(generator))
        loss.backward()
        sharded.optimizer.step()
        sharded.optimizer.zero_grad()
        pruner.after_step(ctx)
    assert pruner.finalized
    out["s"] = pruner.s.tolist()
    out["y"] = pruner.y.tolist()
    out["z"] = pruner.z.tolist()
    out["history"] = pruner.history
    out["removed"] = pruner.removed
    out["masks"] = {}
    out["fused_state_of_closed_columns"] = []
    for fqn, module in masked_modules(model):
        name = fqn.split("model.", 1)[-1]
        if isinstance(module, MaskedEmbeddingBagCollection):
            out["masks"][f"{name}.feature_gate"] = module.feature_gate.tolist()
            for table in module.table_names:
                out["masks"][f"{name}.dim_masks.{table}"] = module.dim_mask(table).tolist()
            for table, _, block, col0 in fused_state_blocks(module):
                closed = ~module.dim_mask(table)[col0 : col0 + block.shape[1]]
                out["fused_state_of_closed_columns"].append(float(block[:, closed].abs().sum()))
        else:
            out["masks"][f"{name}.neuron_mask"] = module.neuron_mask.tolist()
            out["masks"][f"{name}.input_mask"] = module.input_mask.tolist()
    flops = fc_flops(model)
    out["flops_fraction"] = flops.forward / flops.dense_forward
    out["losses_finite"] = bool(torch.isfinite(model(make_batch(generator))[0]))


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    out_dir = Path(sys.argv[1])
    out: dict[str, Any] = {}
    try:
        run(out)
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
