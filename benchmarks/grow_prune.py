"""Alternate grow/prune: sparsity sweep and the four schemes (SPEC 5; growth paper Tables I and II).

Per seed, on one synthetic stream: the dense reference; alternate grow/prune (dense, sparse, dense,
sparse, dense, every 20% of the stream) at beta in {0.1, 0.3, 0.5, 0.7, 0.9}; and prune-only (dense 60%,
sparse 40%), grow-only (sparse 40% from a seeded random mask, then grown) and dense-sparse-dense (30/40/30)
at beta 0.7. Every run starts from the same initial weights as the dense run of its seed and sees the same
samples, so accuracy and CE are compared window by window (look-ahead: each batch is scored before it is
learned, the one-pass analogue of the paper's training accuracy). Training FLOPs of the FC layers are
counted from the live masks and integrated over the phases; wall and CPU time of the training steps are
measured per phase.

The paper's claims checked: -31.8% training FLOPs at beta 0.7 with |relative accuracy| <= 0.1%, and the
alternate scheme the most accurate of the four at equal FLOPs.

Writes docs/results/grow_prune.{md,json}, grow_prune_sweep.png, grow_prune_schemes.png,
grow_prune_flops.png and grow_prune_fc_params.png.

    .venv/bin/python benchmarks/grow_prune.py       # ~10 min on 2 cores (2 worker processes)
    .venv/bin/python benchmarks/grow_prune.py --rows 500000 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from torchrec_prune.data import SyntheticStream  # noqa: E402
from torchrec_prune.masks import wrap  # noqa: E402
from torchrec_prune.metrics import relative_ce  # noqa: E402
from torchrec_prune.models import DLRMConfig, build_dlrm  # noqa: E402
from torchrec_prune.numerics import enable_ftz_daz  # noqa: E402
from torchrec_prune.pruners import neuron_successors, prune_neurons  # noqa: E402
from torchrec_prune.schedules import (  # noqa: E402
    SCHEMES,
    GrowPruneConfig,
    GrowPruneResult,
    PhasePlan,
    run_grow_prune,
    scheme,
)
from torchrec_prune.schedules.report import ComparisonRow, grow_prune_rows, plot_phase_curves  # noqa: E402
from torchrec_prune.train.flops import fc_flops  # noqa: E402
from torchrec_prune.train.job import model_config_for  # noqa: E402
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
BETAS = (0.1, 0.3, 0.5, 0.7, 0.9)
SCHEME_BETA = 0.7
PAPER_FLOPS = -0.318  # Table I, beta 0.7
SIGNIFICANT = 1e-3  # |relative accuracy| above 0.1% is significant (SPEC 2)


def _list(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=_list(int), default=[0, 1, 2])
    p.add_argument("--betas", type=_list(float), default=list(BETAS))
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--drift", type=float, default=0.5, help="rotations of the click model per 100k rows")
    p.add_argument("--increment-rows", type=int, default=10_000)
    p.add_argument("--window", type=int, default=5_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.03, help="Adagrad learning rate")
    p.add_argument("--window-steps", type=int, default=50, help="batches of importance before each pruning")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one intra-op thread each)")
    p.add_argument("--timing-steps", type=int, default=300, help="interleaved steps per beta for step time")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.train = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adagrad",
        window=args.window,
        increment_rows=args.increment_rows,
        progress=False,
    )
    for name, beta in _runs(args):  # every plan and beta is checked before anything trains
        GrowPruneConfig(_plan(name), beta=beta, window_steps=args.window_steps)
        _plan(name).sample_bounds(args.rows, args.increment_rows, args.batch_size)
    return args


def _runs(args: argparse.Namespace) -> list[tuple[str, float]]:
    runs = [("dense", SCHEME_BETA)] + [("alternate", beta) for beta in args.betas]
    return runs + [(name, SCHEME_BETA) for name in SCHEMES if name != "alternate"]


def _plan(name: str) -> PhasePlan:
    return PhasePlan.dense() if name == "dense" else scheme(name)


def _key(name: str, beta: float) -> str:
    return name if name == "dense" else f"{name}@{beta:g}"


def init_worker(args: argparse.Namespace) -> None:
    """One intra-op thread, FTZ/DAZ, and a short throwaway run so that first-call costs (allocator, kernel
    set-up) are not charged to whichever timed run a worker happens to start with."""
    torch.set_num_threads(1)
    enable_ftz_daz()
    rows = 20 * args.batch_size
    stream = SyntheticStream(rows, seed=12345)
    model = wrap(build_dlrm(model_config_for(stream, DLRMConfig())))
    train = replace(args.train, increment_rows=rows, window=rows)
    run_grow_prune(model, stream, train, GrowPruneConfig(PhasePlan.every(1 / 3), window_steps=2))


def run_one(task: tuple[str, float, int, argparse.Namespace]) -> tuple[int, str, GrowPruneResult]:
    name, beta, seed, args = task
    stream = SyntheticStream(args.rows, drift=args.drift * args.rows / 100_000, seed=seed)
    torch.manual_seed(seed)
    model = wrap(build_dlrm(model_config_for(stream, DLRMConfig())))
    config = GrowPruneConfig(_plan(name), beta=beta, window_steps=args.window_steps, seed=seed)
    return seed, _key(name, beta), run_grow_prune(model, stream, args.train, config)


def interleaved_step_times(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Step time of a model pruned at each beta against the same dense model, steps interleaved.

    Timed runs in separate processes see different load from other jobs on the machine; here a dense and a
    pruned copy of one trained model take turns on the same batches, so load drifts hit both alike. The
    median per-step ratio (wall and process CPU time) is what the compacted forward of the pruned neurons
    really saves in a full training step (forward, backward, optimizer step, look-ahead window).
    """
    init_worker(args)
    rows = args.timing_steps * args.batch_size
    stream = SyntheticStream(rows, seed=0)
    batches = list(stream.batches(args.batch_size))
    train = replace(args.train, increment_rows=rows, window=rows)
    out: dict[str, dict[str, float]] = {}
    for beta in args.betas:
        torch.manual_seed(0)
        dense = wrap(build_dlrm(model_config_for(stream, DLRMConfig())))
        sparse = copy.deepcopy(dense)
        trainers = [IncrementalTrainer(m, train) for m in (dense, sparse)]
        successors = neuron_successors(sparse)
        modules = dict(sparse.named_modules())
        scores = {f: torch.rand(modules[f].out_features) for f in successors}
        prune_neurons(sparse, beta, scores, trainers[1].optimizers)
        wall: list[list[float]] = [[], []]
        cpu: list[list[float]] = [[], []]
        for batch in batches:
            for i, trainer in enumerate(trainers):
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.step(batch)
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
        skip = len(batches) // 10  # first steps pay one-off costs
        wall_pairs = list(zip(wall[0][skip:], wall[1][skip:], strict=True))
        cpu_pairs = [(c0, c1) for c0, c1 in zip(cpu[0][skip:], cpu[1][skip:], strict=True) if c0 > 0]
        out[f"{beta:g}"] = {
            "dense_ms": 1e3 * statistics.median(wall[0][skip:]),
            "sparse_ms": 1e3 * statistics.median(wall[1][skip:]),
            "wall_ratio": statistics.median(w1 / w0 for w0, w1 in wall_pairs) - 1,
            "cpu_ratio": statistics.median(c1 / c0 for c0, c1 in cpu_pairs) - 1,
            "flops_ratio": fc_flops(sparse).training / fc_flops(dense).training - 1,
        }
    return out


def _accuracy(result: GrowPruneResult) -> float:
    records = result.run.records
    return sum(r.accuracy * r.n for r in records) / sum(r.n for r in records)


def _mean_sd(values: list[float], pct: bool = True) -> str:
    if any(v != v for v in values):  # NaN: not defined for this run (e.g. the dense run's sparse steps)
        return "-"
    mean, sd = ("{:+.2%}", "{:.2%}") if pct else ("{:.4f}", "{:.4f}")
    if len(values) == 1:
        return mean.format(values[0])
    return f"{mean.format(statistics.fmean(values))} ± {sd.format(statistics.stdev(values))}"


def aggregate(results: dict[int, dict[str, GrowPruneResult]]) -> dict[str, dict[str, list[float]]]:
    """Per run key, per figure: one value per seed."""
    table: dict[str, dict[str, list[float]]] = {}
    for runs in results.values():
        rows: list[ComparisonRow] = grow_prune_rows(runs)
        for row in rows:
            entry = table.setdefault(row.name, {})
            for field, value in asdict(row).items():
                if isinstance(value, float):
                    entry.setdefault(field, []).append(value)
            entry.setdefault("accuracy", []).append(_accuracy(runs[row.name]))
    return table


def markdown(
    table: dict[str, dict[str, list[float]]],
    timing: dict[str, dict[str, float]],
    args: argparse.Namespace,
    seconds: float,
) -> str:
    def line(key: str) -> str:
        t = table[key]
        return (
            f"| {key} | {_mean_sd(t['accuracy'], pct=False)} | {_mean_sd(t['relative_accuracy'])} | "
            f"{_mean_sd(t['relative_ce'])} | {_mean_sd(t['last_quarter_relative_ce'])} | "
            f"{statistics.fmean(t['flops_vs_dense']):+.1%} | {_mean_sd(t['time_vs_dense'])} | "
            f"{_mean_sd(t['cpu_time_vs_dense'])} | {_mean_sd(t['sparse_step_vs_dense_step'])} |"
        )

    header = [
        "| run | look-ahead accuracy | rel accuracy | rel CE | last-quarter rel CE | train FLOPs vs dense | "
        "wall time vs dense | CPU time vs dense | sparse vs dense step (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sweep = [line("dense")] + [line(_key("alternate", b)) for b in args.betas]
    schemes = [line("dense")] + [line(_key(n, SCHEME_BETA)) for n in SCHEMES]
    alt = table[_key("alternate", SCHEME_BETA)] if SCHEME_BETA in args.betas else None
    lines = [
        "# Alternate grow/prune against dense and the other schemes",
        "",
        " ".join(
            [
                f"Synthetic stream, {args.rows} rows, drift {args.drift} rotations per 100k rows;",
                f"increments of {args.increment_rows}, look-ahead windows of {args.window};",
                "DLRM emb dim 4, bottom 256-128-64-4, top 256-128-1;",
                f"Adagrad lr {args.lr}, batch {args.batch_size}",
                "(the paper's SGD lr 0.1 barely learns this stream in so few rows, and Adagrad 0.05",
                "overshoots in the first window, which flatters grow-only's smaller start);",
                f"Taylor importance over the {args.window_steps} batches before each pruning.",
                f"Seeds {args.seeds}: mean ± standard deviation over seeds, every figure relative to the",
                "dense run of the same seed on the same samples. Accuracy is look-ahead (progressive",
                "validation) over the whole stream. FLOPs are counted (structured sparsity: pruned neurons",
                "remove rows and the next layer's inputs), identical across seeds. Time: wall and process",
                "CPU time of the training steps; the machine is shared with other jobs, so time is noisy.",
                f"Modest row counts (default run ~10 min on 2 cores); this run took {seconds / 60:.1f} min.",
            ]
        ),
        "",
        "## Sparsity sweep (alternate, phases every 20%)",
        "",
        *header,
        *sweep,
        "",
        f"## Four schemes at beta {SCHEME_BETA} (each 40% of the stream sparse)",
        "",
        *header,
        *schemes,
        "",
        f"## Step time of a pruned model, interleaved with the dense one ({args.timing_steps} steps each)",
        "",
        "Median over steps; a dense and a pruned copy of one model (random neurons pruned at each beta)",
        "alternate on the same batches, so load from other jobs hits both alike. Full training step:",
        "forward, backward, Adagrad step over all parameters (embedding tables included), look-ahead window.",
        "",
        "| beta | FC training FLOPs vs dense | dense step (ms) | pruned step (ms) | wall vs dense "
        "| CPU vs dense |",
        "|---|---|---|---|---|---|",
        *(
            f"| {beta} | {t['flops_ratio']:+.1%} | {t['dense_ms']:.2f} | {t['sparse_ms']:.2f} | "
            f"{t['wall_ratio']:+.1%} | {t['cpu_ratio']:+.1%} |"
            for beta, t in timing.items()
        ),
        "",
        "## Paper claims",
        "",
    ]
    if alt is not None:
        flops = statistics.fmean(alt["flops_vs_dense"])
        rel_acc = alt["relative_accuracy"]
        lines.append(f"- Training FLOPs at beta {SCHEME_BETA}: {flops:+.1%} (paper {PAPER_FLOPS:+.1%}).")
        worse = sum(x < -SIGNIFICANT for x in rel_acc)
        lines.append(
            f"- Relative accuracy at beta {SCHEME_BETA}: {_mean_sd(rel_acc)} (per seed "
            f"{', '.join(f'{x:+.2%}' for x in rel_acc)}); worse than dense by more than 0.1% in {worse} of "
            f"{len(rel_acc)} seeds (paper: -0.02%, neutral)."
        )
    ranking = sorted(
        SCHEMES, key=lambda n: -statistics.fmean(table[_key(n, SCHEME_BETA)]["relative_accuracy"])
    )
    by_ce = sorted(SCHEMES, key=lambda n: statistics.fmean(table[_key(n, SCHEME_BETA)]["relative_ce"]))
    lines.append(
        f"- Schemes by mean relative accuracy (best first): {', '.join(ranking)}; by mean relative CE: "
        f"{', '.join(by_ce)} (paper: alternate best). Differences smaller than the seed spread above are not "
        "resolved by this run."
    )
    return "\n".join(lines) + "\n"


def plots(
    table: dict, results: dict[int, dict[str, GrowPruneResult]], args: argparse.Namespace
) -> list[Path]:
    out = args.out
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    betas = list(args.betas)
    keys = [_key("alternate", b) for b in betas]
    for field, ax, label in (
        ("relative_accuracy", axes[0], "relative accuracy vs dense (%)"),
        ("relative_ce", axes[1], "relative look-ahead CE vs dense (%)"),
    ):
        means = [100 * statistics.fmean(table[k][field]) for k in keys]
        errs = [100 * (statistics.stdev(table[k][field]) if len(args.seeds) > 1 else 0) for k in keys]
        ax.errorbar(betas, means, yerr=errs, marker="o", capsize=3, label="alternate (mean ± sd over seeds)")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("beta (fraction of neurons pruned in sparse phases)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    twin = axes[0].twinx()
    twin.plot(betas, [100 * statistics.fmean(table[k]["flops_vs_dense"]) for k in keys], "s--", color="grey")
    twin.set_ylabel("training FLOPs vs dense (%)", color="grey")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    sweep = out / "grow_prune_sweep.png"
    fig.savefig(sweep, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    seed0 = results[min(results)]
    dense = seed0["dense"].run.records
    for name in SCHEMES:
        per_seed = [
            relative_ce(runs[_key(name, SCHEME_BETA)].run.records, runs["dense"].run.records)
            for runs in results.values()
        ]
        mean = [100 * statistics.fmean(v) for v in zip(*per_seed, strict=True)]
        ax.plot([r.samples_end for r in dense], mean, label=name)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("relative look-ahead CE vs dense (%), mean over seeds")
    ax.set_title(f"four schemes at beta {SCHEME_BETA}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    schemes_png = out / "grow_prune_schemes.png"
    fig.savefig(schemes_png, dpi=110)
    plt.close(fig)
    curves = {"dense": seed0["dense"]} | {n: seed0[_key(n, SCHEME_BETA)] for n in SCHEMES}
    return [sweep, schemes_png, *plot_phase_curves(curves, out, prefix="grow_prune_")]


def main() -> None:
    args = parse_args()
    tasks = [(name, beta, seed, args) for seed in args.seeds for name, beta in _runs(args)]
    started = time.perf_counter()
    results: dict[int, dict[str, GrowPruneResult]] = {}
    with mp.get_context("spawn").Pool(args.jobs, initializer=init_worker, initargs=(args,)) as pool:
        for seed, key, result in tqdm(pool.imap_unordered(run_one, tasks), total=len(tasks), desc="runs"):
            results.setdefault(seed, {})[key] = result
    seconds = time.perf_counter() - started
    timing = interleaved_step_times(args)
    results = {seed: {"dense": runs.pop("dense"), **runs} for seed, runs in sorted(results.items())}
    table = aggregate(results)
    text = markdown(table, timing, args, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grow_prune.md").write_text(text)
    raw = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("train", "out")},
        "table": table,
        "interleaved_step_time": timing,
        "phases": {
            str(seed): {key: [p.summary() for p in result.phases] for key, result in runs.items()}
            for seed, runs in results.items()
        },
        "wall_seconds": seconds,
    }
    (args.out / "grow_prune.json").write_text(json.dumps(raw, indent=1))
    paths = plots(table, results, args)
    print(text)
    print(f"wrote {args.out / 'grow_prune.md'}, grow_prune.json, {', '.join(p.name for p in paths)}")


if __name__ == "__main__":
    main()
