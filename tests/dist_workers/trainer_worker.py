"""One torchrun rank of the incremental-trainer test: trains with DMP, prunes, and records what it saw.

Usage: trainer_worker.py RUN_DIR ROWS BATCH_SIZE WINDOW
"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from torchrec_prune.masks.surgery import embedding_weight_blocks
from torchrec_prune.models import DLRMConfig
from torchrec_prune.pruners import AuxConfig, AuxPruner, GradualConfig, Targets, taylor_pruner
from torchrec_prune.train.hooks import BaseHook, StepContext
from torchrec_prune.train.job import JobConfig, run_job
from torchrec_prune.train.trainer import TrainConfig


class RowRecorder(BaseHook):
    """Fingerprints of every row this rank trained on (the synthetic stream's dense rows are unique)."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def before_step(self, ctx: StepContext) -> None:
        for row in ctx.batch.dense_features:
            self.rows.append(hashlib.sha1(row.numpy().tobytes()).hexdigest())


def gather(value: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main() -> None:
    run_dir, rows, batch_size, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    config = JobConfig(
        data="synthetic",
        rows=rows,
        drift=0.5,
        model=DLRMConfig(num_embeddings=500, dense_arch=[32, 16, 4], over_arch=[32, 1]),
        train=TrainConfig(batch_size=batch_size, window=window, increment_rows=window, progress=False),
        run_dir=run_dir,
        checkpoint=False,
    )
    recorder = RowRecorder()
    pruners = []

    def hooks(replica):
        model = replica.model
        # Under DMP: AUX on the top MLP, Taylor on the bottom MLP and the embedding dimensions. Each rank
        # sees different rows; reduced statistics must give every rank the same masks.
        aux = AuxConfig(lam=1.5, eps=0.05, phase_steps=20, targets=Targets(["*over_arch*"]))
        taylor = GradualConfig(
            sparsity=0.5,
            phase_steps=20,
            embedding_sparsity=0.25,
            targets=Targets(["*dense_arch*", "*embedding_bag_collection"]),
        )
        pruners.extend([AuxPruner(model, aux), taylor_pruner(model, taylor)])
        return [recorder, *pruners]

    result = run_job(config, hooks=hooks)
    masks = {f"{fqn}.mask": layer.weight_mask.clone() for p in pruners for fqn, layer in p.linears.items()}
    (ebc,) = pruners[1].embeddings.values()
    masks.update({f"dim_masks.{name}": buf.clone() for name, buf in ebc.dim_masks.named_buffers()})
    zero_columns = all(
        bool(torch.all(block[:, ~ebc.dim_mask(table)[col0 : col0 + block.shape[1]]] == 0))
        for table, block, col0, _ in embedding_weight_blocks(ebc)
    )
    seen, all_masks, all_zero = gather(recorder.rows), gather(masks), gather(zero_columns)
    if dist.get_rank() == 0:
        out = {
            "rows_per_rank": [len(r) for r in seen],
            "distinct": len(set().union(*map(set, seen))),
            "overlap": len(set(seen[0]) & set(seen[1])),
            "ce": [r.ce for r in result.records],
            "masks_identical": all(torch.equal(masks[k], other[k]) for other in all_masks for k in masks),
            "mask_sparsity": {k: 1 - v.float().mean().item() for k, v in masks.items()},
            "pruned_columns_zero": all(all_zero),
        }
        with open(f"{run_dir}/ranks.json", "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
