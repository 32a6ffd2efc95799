"""One torchrun rank of the incremental-trainer test: trains with DMP and records which rows it saw.

Usage: trainer_worker.py RUN_DIR ROWS BATCH_SIZE WINDOW
"""

import hashlib
import json
import sys

import torch.distributed as dist

from torchrec_prune.models import DLRMConfig
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
    result = run_job(config, hooks=[recorder])
    seen: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(seen, recorder.rows)
    if dist.get_rank() == 0:
        out = {
            "rows_per_rank": [len(r) for r in seen],
            "distinct": len(set().union(*map(set, seen))),
            "overlap": len(set(seen[0]) & set(seen[1])),
            "ce": [r.ce for r in result.records],
        }
        with open(f"{run_dir}/ranks.json", "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
