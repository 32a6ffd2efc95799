"""One-process speed of the trainer against plain TorchRec loops on the reference DLRM, arms interleaved.

Arms (same batches, batch 128 by default, one intra-op thread; every dense Adagrad is torch's fused one,
as the jobs' replicas use):
- ``plain_fused``: TorchRec ``DLRMTrain`` over a ``FusedEmbeddingBagCollection`` (exact Adagrad in the
  backward), a dense Adagrad for the MLPs: the best plain TorchRec path in one process;
- ``plain_dmp1``: the unwrapped DLRM under TorchRec's ``DistributedModelParallel`` on a one-rank group
  (default DDP wrapper, fused exact Adagrad tables, dense Adagrad): plain DMP on one rank;
- ``shard_plain``: the unwrapped DLRM through the project's ``shard()`` on the one-rank group (as
  ``plain_dmp1`` but without DDP): what TorchRec's sharded collection costs over ``plain_fused``;
- ``wrapped_fused``: the ``plain_fused`` loop over ``wrap(model)`` (what the mask wrappers cost);
- ``trainer``: ``IncrementalTrainer.step`` over the job's replica (``build_replica``, what ``train`` runs
  in one process: the wrapped DLRM with its tables in a ``FusedEmbeddingBagCollection``).

The best plain TorchRec path is whichever of ``plain_fused`` and ``plain_dmp1`` is faster in the run.

Writes docs/results/perf_trainer.json; ``--profile ARM`` prints that arm's top operators instead,
``--profile-python ARM`` its top Python functions (cProfile, by own time) over two rounds.

    .venv/bin/python benchmarks/perf_trainer.py [--rounds 7] [--steps 40] [--batch-size 128] [--arms ...]
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist
from perf_common import interleave, job_replica, ratio, reference_batches, reference_config, write_results
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_prune.data.stream import BatchStream
from torchrec_prune.distributed.dmp import (
    ShardingConfig,
    dense_parameters,
    make_sharders,
    one_process_group,
    plan_sharding,
    shard,
)
from torchrec_prune.masks import wrap
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

LR = 0.05


def fused_dlrm(config: DLRMConfig) -> DLRMTrain:
    """``build_dlrm`` with the tables in a ``FusedEmbeddingBagCollection`` (exact Adagrad)."""
    ebc = build_dlrm(config).model.sparse_arch.embedding_bag_collection
    fused = FusedEmbeddingBagCollection(
        tables=ebc.embedding_bag_configs(),
        optimizer_type=torch.optim.Adagrad,
        optimizer_kwargs={"lr": LR},
        device=torch.device("cpu"),
    )
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=fused,
            dense_in_features=config.num_dense,
            dense_arch_layer_sizes=list(config.dense_arch),
            over_arch_layer_sizes=list(config.over_arch),
        )
    )


def dense_adagrad(model: nn.Module) -> torch.optim.Optimizer:
    """Torch's fused Adagrad over the parameters no fused collection updates."""
    return torch.optim.Adagrad(list(dense_parameters(model).values()), lr=LR, fused=True)


def plain_dmp(config: DLRMConfig, batch_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The unwrapped DLRM as TorchRec's own DMP shards it on the current group (DDP for the MLPs)."""
    sharding = ShardingConfig(fused_optimizer="adagrad", lr=LR, batch_size=batch_size)
    model = build_dlrm(config, device="meta")
    plan = plan_sharding(model, sharding, world_size=dist.get_world_size())
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=make_sharders(sharding),
    )
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    return dmp, KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adagrad(params, lr=LR, fused=True))


def loop(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], steps: int
) -> Callable[[], None]:
    """A plain TorchRec training loop of ``steps`` steps per call."""
    source = itertools.cycle(batches)

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = model(next(source))
            loss.backward()
            optimizer.step()

    return run


def trainer_loop(trainer: IncrementalTrainer, batches: list[Batch], steps: int) -> Callable[[], None]:
    source = itertools.cycle(batches)

    def run() -> None:
        for _ in range(steps):
            trainer.step(next(source))

    return run


ARMS = ("plain_fused", "plain_dmp1", "shard_plain", "wrapped_fused", "trainer")


def build_arms(batch_size: int, steps: int) -> dict[str, Callable[[], None]]:
    config = reference_config()
    batches = reference_batches(batch_size, 50)
    torch.manual_seed(0)
    fused = fused_dlrm(config)
    wrapped = wrap(fused_dlrm(config))
    train = TrainConfig(batch_size=batch_size, lr=LR, window=5_000, progress=False)
    replica = job_replica(BatchStream(batches, num_embeddings=config.num_embeddings), train)
    trainer = IncrementalTrainer(replica.model, train, optimizers=replica.optimizers)
    dmp, dmp_optimizer = plain_dmp(config, batch_size)
    sharding = ShardingConfig(fused_optimizer="adagrad", lr=LR, batch_size=batch_size)
    sharded = shard(build_dlrm(config, device="meta"), torch.device("cpu"), sharding)
    return {
        "plain_fused": loop(fused, dense_adagrad(fused), batches, steps),
        "plain_dmp1": loop(dmp, dmp_optimizer, batches, steps),
        "shard_plain": loop(sharded.model, sharded.optimizer, batches, steps),
        "wrapped_fused": loop(wrapped, dense_adagrad(wrapped), batches, steps),
        "trainer": trainer_loop(trainer, batches, steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--arms", nargs="+", choices=ARMS, default=list(ARMS), help="the arms to time (default: all)"
    )
    parser.add_argument("--profile", default=None, help="print the top operators of this arm")
    parser.add_argument("--profile-python", default=None, help="print the top Python functions of this arm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with one_process_group():  # the trainer and plain_dmp1 run on a one-rank group
        measure(args)


def measure(args: argparse.Namespace) -> None:
    arms = {name: arm for name, arm in build_arms(args.batch_size, args.steps).items() if name in args.arms}
    if args.profile:
        arms[args.profile]()
        with torch.profiler.profile() as prof:
            arms[args.profile]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    if args.profile_python:
        arms[args.profile_python]()
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [arms[args.profile_python]() for _ in range(2)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(int(os.environ.get("PERF_TOP", "30")))
        return
    timings = interleave(arms, args.rounds)
    samples = args.batch_size * args.steps
    rates = {name: samples / statistics.median(t.cpu) for name, t in timings.items()}
    plain = [n for n in ("plain_fused", "plain_dmp1") if n in timings]
    best = min(plain, key=lambda n: statistics.median(timings[n].cpu)) if plain else None
    pairs = {  # time ratios (arm / base): > 1 is slower
        "wrappers_over_plain": ("wrapped_fused", "plain_fused", "cpu"),
        "trainer_over_wrapped": ("trainer", "wrapped_fused", "cpu"),
        "trainer_over_best_plain": ("trainer", best, "cpu"),
        "trainer_over_best_plain_wall": ("trainer", best, "wall"),
        "trainer_over_plain_fused": ("trainer", "plain_fused", "cpu"),
        "trainer_over_plain_dmp1": ("trainer", "plain_dmp1", "cpu"),
        "plain_dmp1_over_plain_fused": ("plain_dmp1", "plain_fused", "cpu"),
        "shard_plain_over_plain_fused": ("shard_plain", "plain_fused", "cpu"),
    }
    results = {
        "samples_per_cpu_second": rates,
        "samples_per_wall_second": {n: samples / statistics.median(t.wall) for n, t in timings.items()},
        "best_plain": best,
        **{
            key: ratio(timings, arm, base, kind=kind)
            for key, (arm, base, kind) in pairs.items()
            if arm in timings and base in timings
        },
        "rounds": {n: {"cpu": t.cpu, "wall": t.wall} for n, t in timings.items()},
    }
    path = write_results("perf_trainer", {"args": vars(args), **results})
    for name, rate in rates.items():
        print(f"{name:12s} {rate:8.0f} samples/cpu-s")
    print(f"best plain TorchRec path: {best}")
    for key in (key for key in pairs if key in results):
        r = results[key]
        print(
            f"{key}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}); "
            f"total {r['total']:.3f} (95% CI {r['low']:.3f}-{r['high']:.3f})"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
