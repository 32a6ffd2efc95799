"""UMEC's own cost per training step, and inference time of the exported model against the dense one.

Both are measured side by side and interleaved: two models with the same weights (one with UMEC's hook
attached, its phase longer than the run so it never removes anything; one without) take turns of
``steps`` training steps on the same batches, round after round, the order alternating, so that load
from other jobs on the machine falls on both alike. Inference likewise alternates the plain dense DLRM
and the model exported after UMEC at budget 0.5, in eval mode without gradients.

Per line the overhead is UMEC's share of the total step time over all rounds, with a 95% interval from
resampling the rounds in pairs, beside the median, quartiles and min-max of the per-round ratios; the
host's load averages and the UTC time are recorded with it. Writes
``docs/results/umec_overhead.{md,json}`` (the page's hand-written ``## Reading of this run`` section is
kept).

Usage: python benchmarks/umec_overhead.py [--rounds 60] [--steps 20]   (the results page: --rounds 100)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time

import torch
from pruning_common import RESULTS, markdown_table, setup_process
from torch import nn
from umec_common import conditions, write_page

import torchrec_prune as tp
from torchrec_prune.data import SyntheticStream
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners.umec import UMECConfig, UMECPruner
from torchrec_prune.train.flops import fc_flops
from torchrec_prune.train.job import model_config_for
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

MODEL = DLRMConfig()  # the reference DLRM: emb dim 4, bottom 256-128-64-4, top 256-128-1, 10k rows per table


def timed_steps(trainer: IncrementalTrainer, batches) -> float:
    started = time.perf_counter()
    for batch in batches:
        trainer.step(batch)
    return (time.perf_counter() - started) / len(batches)


def total_overhead(umec: list[float], base: list[float], resamples: int = 4000) -> tuple[float, float, float]:
    """UMEC's share of the total step time over all rounds, and a 95% interval from resampling the
    rounds (pairs kept): one slow round moves a median of per-round ratios far more than this."""
    rng = random.Random(0)
    pairs = list(zip(umec, base, strict=True))
    draws = []
    for _ in range(resamples):
        sample = rng.choices(pairs, k=len(pairs))
        draws.append(sum(u for u, _ in sample) / sum(b for _, b in sample) - 1)
    draws.sort()
    return sum(umec) / sum(base) - 1, draws[int(0.025 * resamples)], draws[int(0.975 * resamples)]


def step_overhead(stream: SyntheticStream, rounds: int, steps: int, **umec: object) -> dict[str, object]:
    """Per-step seconds without and with UMEC (interleaved rounds) and the per-round ratio."""
    torch.manual_seed(0)
    base = tp.wrap(build_dlrm(model_config_for(stream, MODEL)))
    with_umec = copy.deepcopy(base)
    train = TrainConfig(batch_size=128, window=10**6, increment_rows=10**6, progress=False)
    plain = IncrementalTrainer(base, train)
    config = UMECConfig(budget=0.5, phase_steps=10**9, eta4=100.0, **umec)
    pruner = UMECPruner(with_umec, config)
    umec_trainer = IncrementalTrainer(with_umec, train, hooks=[pruner])
    batches = list(stream.batches(128))
    for trainer in (plain, umec_trainer):  # warm-up
        timed_steps(trainer, batches[:steps])
    base_times, umec_times = [], []
    for r in range(rounds):
        chunk = batches[(r * steps) % (len(batches) - steps) :][:steps]
        pair = [(plain, base_times), (umec_trainer, umec_times)]
        for trainer, times in pair if r % 2 == 0 else pair[::-1]:
            times.append(timed_steps(trainer, chunk))
    ratios = [u / b - 1 for u, b in zip(umec_times, base_times, strict=True)]
    return {
        "groups": {layer.name: layer.size for layer in pruner.layers},
        "overhead_total": total_overhead(umec_times, base_times),
        "base_round_ms": [1000 * t for t in base_times],
        "umec_round_ms": [1000 * t for t in umec_times],
        "base_ms": 1000 * statistics.median(base_times),
        "umec_ms": 1000 * statistics.median(umec_times),
        "overhead_median": statistics.median(ratios),
        "overhead_min": min(ratios),
        "overhead_quartiles": statistics.quantiles(ratios, n=4)[::2],
        "overhead_max": max(ratios),
        "overhead_per_round": ratios,
        "rounds": rounds,
        "steps_per_round": steps,
    }


def inference(stream: SyntheticStream, rounds: int, reps: int) -> dict[str, object]:
    """Seconds per batch of 512 for the plain dense DLRM and the one exported after UMEC at 0.5."""
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(model_config_for(stream, MODEL)))
    dense = tp.unwrap(copy.deepcopy(model))
    train = TrainConfig(batch_size=128, window=10**6, increment_rows=10**6, progress=False)
    batches = list(stream.batches(128))
    pruner = UMECPruner(model, UMECConfig(budget=0.5, phase_steps=len(batches), eta4=100.0))
    trainer = IncrementalTrainer(model, train, hooks=[pruner])
    for batch in batches:
        trainer.step(batch)
    exported, _ = tp.export(model)
    models: dict[str, nn.Module] = {"dense": dense.eval(), "exported": exported.eval()}
    batch = next(iter(stream.batches(512)))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(batch)
        for r in range(rounds):
            for name in list(models) if r % 2 == 0 else list(models)[::-1]:
                started = time.perf_counter()
                for _ in range(reps):
                    models[name](batch)
                times[name].append((time.perf_counter() - started) / reps)
    ratios = [e / d for e, d in zip(times["exported"], times["dense"], strict=True)]
    flops = {name: fc_flops(m).forward for name, m in models.items()}
    return {
        "dense_ms": 1000 * statistics.median(times["dense"]),
        "exported_ms": 1000 * statistics.median(times["exported"]),
        "time_ratio_median": statistics.median(ratios),
        "time_ratio_min": min(ratios),
        "time_ratio_max": max(ratios),
        "flops_ratio": flops["exported"] / flops["dense"],
        "allocation": {name: list(v) for name, v in pruner.allocation().items()},
        "rounds": rounds,
        "reps": reps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    setup_process()
    stream = SyntheticStream(40_000, drift=0.0, seed=0)
    before = conditions()
    lines = {
        "all groups, every step": step_overhead(stream, args.rounds, args.steps),
        "no embedding-dimension groups, every step": step_overhead(
            stream, args.rounds, args.steps, embedding_dims=False
        ),
        "all groups, every 4th step (update_every=4)": step_overhead(
            stream, args.rounds, args.steps, update_every=4
        ),
    }
    infer = inference(stream, args.rounds, 20)
    after = conditions()
    machine = (
        f"{platform.processor() or platform.machine()}, 1 intra-op thread, {os.cpu_count()}-core host "
        "(other jobs: see the load averages)"
    )
    out = {
        "machine": machine,
        "torch": torch.__version__,
        "started": before,
        "ended": after,
        "step": lines,
        "inference": infer,
    }
    (RESULTS / "umec_overhead.json").write_text(json.dumps(out, indent=1))
    rows = [
        [
            label,
            f"{r['base_ms']:.2f}",
            f"{r['umec_ms']:.2f}",
            "{:+.1f}% ({:+.1f}% .. {:+.1f}%)".format(*(100 * x for x in r["overhead_total"])),
            f"{100 * r['overhead_median']:+.1f}%",
            f"{100 * r['overhead_quartiles'][0]:+.1f}% .. {100 * r['overhead_quartiles'][1]:+.1f}%",
            f"{100 * r['overhead_min']:+.1f}% .. {100 * r['overhead_max']:+.1f}%",
        ]
        for label, r in lines.items()
    ]
    md = [
        "# UMEC step overhead and exported-model inference time",
        "",
        f"Produced by `benchmarks/umec_overhead.py` on {machine}. Reference DLRM (embedding dim 4, 26 tables",
        "of 10k rows, bottom 256-128-64-4, top 256-128-1), synthetic stream, batch 128 for training.",
        f"Interleaved: {args.rounds} rounds of {args.steps} steps each, the order alternating per round.",
        f"Run from {before['utc']} to {after['utc']}; load averages (1, 5, 15 min) {before['load_average']}",
        f"at the start, {after['load_average']} at the end.",
        "",
        "## Training step with UMEC's update vs without",
        "",
        markdown_table(
            [
                "UMEC groups",
                "step, no UMEC (ms)",
                "step, UMEC (ms)",
                "overhead of the total time (95% CI over rounds)",
                "overhead (median over rounds)",
                "middle half of rounds",
                "overhead (min .. max over rounds)",
            ],
            rows,
        ),
        "",
        "The embedding-dimension groups read every row of every table at each UMEC iteration (their L2",
        "norms; the proximal step writes only the shrunk columns); the second line leaves them out. The",
        "third runs one UMEC iteration per 4 weight steps (`update_every=4`, several SGD steps per ADMM",
        "iteration; the paper's Algorithm 1, and the default, is one per step). The overhead of the total",
        "time sums every round's steps with and without UMEC; its interval resamples the rounds in pairs.",
        "",
        "## Inference, batch 512, eval mode: exported after UMEC (budget 0.5) vs the dense DLRM",
        "",
        markdown_table(
            ["dense (ms)", "exported (ms)", "time ratio (median, min .. max)", "FC FLOPs ratio"],
            [
                [
                    f"{infer['dense_ms']:.2f}",
                    f"{infer['exported_ms']:.2f}",
                    f"{infer['time_ratio_median']:.3f} ({infer['time_ratio_min']:.3f} .. "
                    f"{infer['time_ratio_max']:.3f})",
                    f"{infer['flops_ratio']:.3f}",
                ]
            ],
        ),
        "",
        "Embedding lookups and the interaction are not FC FLOPs: they shrink only with the dropped",
        "features and embedding columns.",
        "",
    ]
    write_page(RESULTS / "umec_overhead.md", md)
    print((RESULTS / "umec_overhead.md").read_text())


if __name__ == "__main__":
    main()
