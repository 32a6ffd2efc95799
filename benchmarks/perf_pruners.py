"""What a pruner costs per training step while its pruning phase runs.

Arms train the reference DLRM side by side, interleaved round by round, each with the job's replica (one
DMP rank, fused tables) and ``IncrementalTrainer``:
- ``none``: no pruner (the baseline);
- ``aux``: ``AuxPruner`` (latent scores, linear straight-through mask, Taylor + magnitude importance,
  a new element mask every step);
- ``taylor``: TP, ``taylor_pruner`` (``|g * theta|`` accumulated every step, top-k on its ramp);
- ``magnitude``: MP, ``magnitude_pruner`` on the same ramp (scores only at mask updates).
Every pruner's phase is longer than the measurement, so each round is in the middle of it. The cost of
a pruner is its arm's time over ``none``'s in the same round (median and min-max over rounds).

Writes docs/results/perf_pruners.json.

    .venv/bin/python benchmarks/perf_pruners.py [--rounds 7] [--steps 30]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
from perf_common import interleave, job_replica, ratio, reference_batches, reference_config, write_results
from perf_trainer import LR

from torchrec_prune.data.stream import BatchStream
from torchrec_prune.distributed.dmp import one_process_group
from torchrec_prune.pruners import AuxConfig, AuxPruner, GradualConfig, magnitude_pruner, taylor_pruner
from torchrec_prune.train.hooks import TrainHook
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

PHASE = 100_000  # steps: longer than any measurement, so every round runs inside the pruning phase
ARMS = ("none", "aux", "taylor", "magnitude")


def arm(
    name: str, stream: BatchStream, train: TrainConfig, steps: int, update_every: int
) -> Callable[[], None]:
    torch.manual_seed(0)
    replica = job_replica(stream, train)
    gradual = GradualConfig(sparsity=0.8, phase_steps=PHASE, update_every=update_every)
    hooks: list[TrainHook] = {
        "none": [],
        "aux": [AuxPruner(replica.model, AuxConfig(lam=1.75, phase_steps=PHASE))],
        "taylor": [taylor_pruner(replica.model, gradual)],
        "magnitude": [magnitude_pruner(replica.model, gradual)],
    }[name]
    trainer = IncrementalTrainer(replica.model, train, optimizers=replica.optimizers, hooks=hooks)
    source = itertools.cycle(list(stream.batches(train.batch_size)))

    def run() -> None:
        for _ in range(steps):
            trainer.step(next(source))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--update-every", type=int, default=10, help="TP/MP: steps between mask updates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with one_process_group():
        stream = BatchStream(
            reference_batches(args.batch_size, 50), num_embeddings=reference_config().num_embeddings
        )
        train = TrainConfig(batch_size=args.batch_size, lr=LR, window=5_000, progress=False)
        timings = interleave(
            {name: arm(name, stream, train, args.steps, args.update_every) for name in ARMS}, args.rounds
        )
    ratios = {name: ratio(timings, name, "none") for name in ARMS[1:]}
    ms = {name: 1e3 * sorted(t.cpu)[len(t.cpu) // 2] / args.steps for name, t in timings.items()}
    for name in ARMS[1:]:
        r = ratios[name]
        print(
            f"{name}: {r['median']:.3f}x a step without a pruner ({r['min']:.3f}-{r['max']:.3f}), "
            f"{ms[name]:.2f} ms"
        )
    results = {"args": vars(args), "ratios_cpu": ratios, "ms_per_step_cpu": ms}
    print(f"wrote {write_results('perf_pruners', results)}")


if __name__ == "__main__":
    main()
