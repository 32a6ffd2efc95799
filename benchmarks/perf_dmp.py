"""Trainer + wrappers against the same plain TorchRec DMP loop on 2 ranks (gloo, one thread each).

Arms, interleaved round by round on both ranks in lockstep (their collectives pair them):
- ``plain_dmp``: the unwrapped reference DLRM sharded by DMP (fused Adagrad tables, dense Adagrad),
  a bare zero_grad / forward / backward / step loop;
- ``wrapped_dmp``: the same loop over ``wrap(model)`` sharded alike;
- ``trainer``: ``IncrementalTrainer.step`` over the wrapped model (look-ahead window, FLOPs meter, hooks).

Rank 0 writes docs/results/perf_dmp.json (its own thread CPU time and wall time per round).

    .venv/bin/python benchmarks/perf_dmp.py [--rounds 7] [--steps 30] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from perf_common import interleave, ratio, reference_batches, reference_config, write_results
from perf_trainer import LR, loop, trainer_loop

from torchrec_prune.distributed.dmp import ShardingConfig, shard
from torchrec_prune.masks import wrap
from torchrec_prune.models import build_dlrm
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        config = reference_config()
        batches = reference_batches(args.batch_size, 40)[rank::2]
        sharding = ShardingConfig(lr=LR, batch_size=args.batch_size)
        device = torch.device("cpu")
        torch.manual_seed(0)
        plain = shard(build_dlrm(config, device="meta"), device, sharding)
        wrapped = shard(wrap(build_dlrm(config, device="meta")), device, sharding)
        trained = shard(wrap(build_dlrm(config, device="meta")), device, sharding)
        train = TrainConfig(batch_size=args.batch_size, lr=LR, window=5_000, progress=False)
        trainer = IncrementalTrainer(trained.model, train, optimizers=[trained.optimizer])
        arms = {
            "plain_dmp": loop(plain.model, plain.optimizer, batches, args.steps),
            "wrapped_dmp": loop(wrapped.model, wrapped.optimizer, batches, args.steps),
            "trainer": trainer_loop(trainer, batches, args.steps),
        }
        timings = interleave(arms, args.rounds)
        if rank == 0:
            samples = 2 * args.batch_size * args.steps
            result = {
                "global_samples_per_cpu_second": {
                    n: samples / statistics.median(t.cpu) for n, t in timings.items()
                },
                "wrappers_over_plain": ratio(timings, "wrapped_dmp", "plain_dmp"),
                "trainer_over_plain": ratio(timings, "trainer", "plain_dmp"),
                "trainer_over_plain_wall": ratio(timings, "trainer", "plain_dmp", kind="wall"),
                "trainer_over_wrapped": ratio(timings, "trainer", "wrapped_dmp"),
                "rounds": {n: {"cpu": t.cpu, "wall": t.wall} for n, t in timings.items()},
            }
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(_free_port(), args, out), nprocs=2, join=True)
        with open(out) as f:
            result = json.load(f)
    path = write_results("perf_dmp", {"args": vars(args), **result})
    for key in (
        "wrappers_over_plain",
        "trainer_over_plain",
        "trainer_over_plain_wall",
        "trainer_over_wrapped",
    ):
        r = result[key]
        print(
            f"{key}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}); "
            f"total {r['total']:.3f} (95% CI {r['low']:.3f}-{r['high']:.3f})"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
