"""End to end: does alternate grow/prune train the whole stream faster than plain dense TorchRec?

The growth paper's point is that pruning pays when the whole job gets faster. Four arms train the same
reference DLRM over the same stream (a ``BatchStream`` over batches made before timing, read by every
arm in the timed pass), one whole pass per round,
interleaved round by round (A B C D, A B C D, ...):
- ``plain_dense``: plain TorchRec, tables in a ``FusedEmbeddingBagCollection`` (exact Adagrad in the
  backward), torch's fused Adagrad for the MLPs (as the jobs' replicas), a bare loop;
- ``dense``: this library's one-process job replica (tables in a ``FusedEmbeddingBagCollection``,
  wrapped layers) and trainer with
  ``PhasePlan.dense()`` (look-ahead windows, FLOPs, the schedule hook);
- ``alternate``: the same with alternate grow/prune (dense-sparse-dense-sparse-dense, 20% each) at
  ``beta``, sparse phases compacted (the default);
- ``alternate_masked``: the same with ``compact=False`` (the masked gather/scatter forward).
Times are the wall and CPU seconds of the whole pass (phase transitions included). A ratio is the
median over rounds of the per-round ratio, with min-max, and the ratio of total times with its 95%
interval from resampling the rounds in pairs (``perf_common.ratio``).

Writes docs/results/perf_grow_prune.json (``perf_grow_prune_b<batch>.json`` for another batch size).

    .venv/bin/python benchmarks/perf_grow_prune.py [--rounds 5] [--steps 400] [--beta 0.7]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from perf_common import Timing, job_replica, ratio, reference_batches, reference_config, write_results
from perf_trainer import LR, dense_adagrad, fused_dlrm

from torchrec_prune.data.stream import BatchStream
from torchrec_prune.distributed.dmp import one_process_group
from torchrec_prune.schedules import GrowPruneConfig, PhasePlan, run_grow_prune
from torchrec_prune.train.trainer import TrainConfig

ARMS = ("plain_dense", "dense", "alternate", "alternate_masked")


def plain_pass(stream: BatchStream, batch_size: int) -> Callable[[], None]:
    """A fresh plain TorchRec model; the returned call trains it over the stream once."""
    torch.manual_seed(0)
    model = fused_dlrm(reference_config())
    optimizer = dense_adagrad(model)  # the fastest dense Adagrad, as the jobs use

    def run() -> None:
        for batch in stream.batches(batch_size):  # read as the trainer reads it
            optimizer.zero_grad(set_to_none=True)
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()

    return run


def schedule_pass(
    stream: BatchStream, train: TrainConfig, plan: PhasePlan, beta: float, compact: bool
) -> Callable[[], None]:
    """A fresh job replica; the returned call runs the schedule over the stream once."""
    torch.manual_seed(0)
    replica = job_replica(stream, train)
    config = GrowPruneConfig(plan, beta=beta, window_steps=20, compact=compact)

    def run() -> None:
        run_grow_prune(replica.model, stream, train, config, optimizers=replica.optimizers)

    return run


def measure(args: argparse.Namespace) -> dict[str, object]:
    batches = reference_batches(args.batch_size, args.steps)
    stream = BatchStream(batches, num_embeddings=reference_config().num_embeddings)
    train = TrainConfig(
        batch_size=args.batch_size, lr=LR, window=args.batch_size * 50, increment_rows=stream.num_rows,
        progress=False,
    )  # fmt: skip
    alternate = PhasePlan.every(0.2)
    builders: dict[str, Callable[[], Callable[[], None]]] = {
        "plain_dense": lambda: plain_pass(stream, args.batch_size),
        "dense": lambda: schedule_pass(stream, train, PhasePlan.dense(), args.beta, True),
        "alternate": lambda: schedule_pass(stream, train, alternate, args.beta, True),
        "alternate_masked": lambda: schedule_pass(stream, train, alternate, args.beta, False),
    }
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds + 1):  # round 0 warms up
        for arm in ARMS:
            run = builders[arm]()
            started, started_cpu = time.perf_counter(), time.thread_time()
            run()
            if r:
                wall[arm].append(time.perf_counter() - started)
                cpu[arm].append(time.thread_time() - started_cpu)
        print(f"round {r}: " + ", ".join(f"{a} {wall[a][-1]:.2f}s" for a in ARMS if r), flush=True)

    timings = {arm: Timing(cpu=cpu[arm], wall=wall[arm]) for arm in ARMS}
    pairs = [(a, "plain_dense") for a in ARMS[1:]]
    pairs += [("alternate", "dense"), ("alternate", "alternate_masked")]
    return {
        "args": vars(args),
        "rows": stream.num_rows,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "ratios_wall": {f"{a}_over_{b}": ratio(timings, a, b, "wall") for a, b in pairs},
        "ratios_cpu": {f"{a}_over_{b}": ratio(timings, a, b) for a, b in pairs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400, help="batches in the stream (5 phases)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with one_process_group():
        results = measure(args)
    for kind in ("wall", "cpu"):
        for name, r in results[f"ratios_{kind}"].items():  # type: ignore[union-attr]
            print(
                f"{kind} {name}: {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}); "
                f"total {r['total']:.3f} (95% CI {r['low']:.3f}-{r['high']:.3f})"
            )
    name = "perf_grow_prune" if args.batch_size == 128 else f"perf_grow_prune_b{args.batch_size}"
    print(f"wrote {write_results(name, results)}")


if __name__ == "__main__":
    main()
