"""Powered D2S under drift: serving gap of D2S against the single fixed-mask model (D2S paper 6.2, Fig. 6).

Per seed, one ``D2SController`` pass starts from the converged dense checkpoint of ``fidelity_common``
(the one ``fidelity_fixed_mask.py`` uses: same stream, drift and pre-training) with its optimizer state.
Lines: ``fixed`` (D2S: a new AUX model every ``r`` increments, pruned from the dense snapshot ``p``
increments back), ``fixed_mask`` (one AUX model, mask frozen) and ``adaptation`` (one AUX model whose mask
keeps learning). Every line is scored look-ahead on the same samples as the dense model; a line's serving
gap is the mean over serving windows of ``(CE_line - CE_dense) / CE_dense``. The paper's claim is tested
per seed as d = gap(D2S) - 0.5 * gap(fixed mask): met when the 95% t-interval of d is below 0.

The Criteo head spans minutes of traffic (no drift) and is too short for increments of this size, so D2S
is measured on the synthetic drifting stream only.

Writes docs/results/fidelity_d2s.{md,json} and fidelity_d2s.png.

    .venv/bin/python benchmarks/fidelity_d2s.py --workers 1    # ~14 min on a shared core
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from fidelity_common import (  # noqa: E402
    OffsetStream,
    StreamSpec,
    dense_checkpoint,
    fmt_ci,
    run_tasks,
    t_interval,
    verdict,
)
from pruning_common import RESULTS, markdown_table, setup_process  # noqa: E402

from torchrec_prune.pruners.aux import LATENT_BUDGET, AuxConfig  # noqa: E402
from torchrec_prune.schedules import D2SConfig, D2SController  # noqa: E402
from torchrec_prune.train.replica import Replica  # noqa: E402
from torchrec_prune.train.trainer import TrainConfig  # noqa: E402

LINES = ("fixed", "fixed_mask", "adaptation")
LABELS = {"fixed": "D2S", "fixed_mask": "AUX fixed mask", "adaptation": "AUX adaptation mask"}
TARGET = 0.5
PRETRAIN, BATCH = 819_200, 512  # the fixed-mask benchmark's checkpoint


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--drift-per-100k", type=float, default=0.5)
    p.add_argument("--increment-rows", type=int, default=25_600)
    p.add_argument("--increments", type=int, default=6, help="increments after the checkpoint (warm-up too)")
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--p", type=int, default=2)
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=1.75)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replot", action="store_true")
    return p.parse_args()


def run_task(job: tuple[int, argparse.Namespace]) -> dict:
    seed, args = job
    setup_process()
    started = time.perf_counter()
    rows = args.increments * args.increment_rows
    spec = StreamSpec("synthetic", seed, PRETRAIN, PRETRAIN + rows, args.drift_per_100k)
    ckpt_train = TrainConfig(
        batch_size=BATCH, lr=args.lr, window=51_200, increment_rows=51_200, progress=False
    )
    ckpt = dense_checkpoint(spec, ckpt_train)
    train = TrainConfig(
        batch_size=BATCH,
        lr=args.lr,
        window=args.increment_rows,
        increment_rows=args.increment_rows,
        progress=False,
    )
    model, optimizer = ckpt.load(train)
    config = D2SConfig(
        r=args.r, p=args.p, prune_fraction=args.prune_fraction, aux=AuxConfig(lam=args.lam), lines=LINES
    )
    stream = OffsetStream(spec.stream(), PRETRAIN)
    result = D2SController(Replica(model, [optimizer]), stream, train, config).run()
    since = result.warmup_rows
    serving = [i for i, r in enumerate(result.dense) if r.samples_end > since]
    dense = [result.dense[i].ce for i in serving]
    lines = {}
    for name, line in result.lines.items():
        ce = [line.records[i].ce for i in serving]
        lines[name] = {
            "relative": [c / d - 1 for c, d in zip(ce, dense, strict=True)],
            "births": line.births,
            "sparsity": statistics.fmean(line.sparsity),
        }
    return {
        "seed": seed,
        "warmup_rows": since,
        "phase_steps": round(args.prune_fraction * args.p * args.increment_rows / BATCH),
        "windows_end": [result.dense[i].samples_end for i in serving],
        "dense_ce": dense,
        "dense_ne": [result.dense[i].ne for i in serving],
        "pretrain_flatness": ckpt.flatness(),
        "lines": lines,
        "seconds": time.perf_counter() - started,
    }


def _refreshed(task: dict) -> list[int]:
    """Serving windows after D2S's first refresh: before it, D2S serves the fixed-mask line's model."""
    births = task["lines"]["fixed"]["births"]
    increment = task["windows_end"][0] - task["warmup_rows"]  # one window per increment
    first = births[1] * increment if len(births) > 1 else float("inf")
    return [i for i, end in enumerate(task["windows_end"]) if end > first]


def summarize(tasks: list[dict]) -> dict:
    """Per line: t-intervals over seeds of the mean and last-quarter serving gap; the claim's d."""
    gap = {n: [statistics.fmean(t["lines"][n]["relative"]) for t in tasks] for n in LINES}
    tail = max(1, len(tasks[0]["dense_ce"]) // 4)
    last = {n: [statistics.fmean(t["lines"][n]["relative"][-tail:]) for t in tasks] for n in LINES}
    refreshed = {n: [statistics.fmean(t["lines"][n]["relative"][i] for i in _refreshed(t)) for t in tasks]
                 for n in LINES}  # fmt: skip
    periods = (("serving", gap), ("last_quarter", last), ("after_refresh", refreshed))
    claim = {
        key: t_interval([a - TARGET * b for a, b in zip(v["fixed"], v["fixed_mask"], strict=True)])
        for key, v in periods
    }
    return {
        "gap": {n: t_interval(v) for n, v in gap.items()},
        "last_quarter": {n: t_interval(v) for n, v in last.items()},
        "after_refresh": {n: t_interval(v) for n, v in refreshed.items()},
        "d2s_minus_fixed_mask": t_interval(
            [a - b for a, b in zip(gap["fixed"], gap["fixed_mask"], strict=True)]
        ),
        "ratio": statistics.fmean(gap["fixed"]) / statistics.fmean(gap["fixed_mask"]),
        "claim": claim,
        "claim_verdict": {
            k: {"below 0": "met", "above 0": "not met"}.get(verdict(c), "inconclusive")
            for k, c in claim.items()
        },
    }


def write_markdown(report: dict, args: argparse.Namespace) -> None:
    tasks, s = report["tasks"], report["summary"]
    t0 = tasks[0]
    rows = [
        [LABELS[n], f"{statistics.fmean(t['lines'][n]['sparsity'] for t in tasks):.3f}", fmt_ci(s["gap"][n]),
         fmt_ci(s["last_quarter"][n]), fmt_ci(s["after_refresh"][n])]
        for n in LINES
    ]  # fmt: skip
    claims = [
        [key, f"{s[k2]['fixed']['mean'] / s[k2]['fixed_mask']['mean']:.2f}", fmt_ci(s["claim"][key]),
         s["claim_verdict"][key]]
        for key, k2 in (("serving", "gap"), ("last_quarter", "last_quarter"), ("after_refresh",) * 2)
    ]  # fmt: skip
    parts = [
        "# Powered D2S under drift (D2S paper 6.2, Fig. 6)",
        "",
        f"Produced by `python benchmarks/fidelity_d2s.py {report['argv']}` "
        f"({report['wall_seconds'] / 60:.1f} min, {report.get('workers', args.workers)} processes). Raw: "
        "`fidelity_d2s.json`.",
        "",
        f"**Protocol.** Synthetic stream, drift {args.drift_per_100k} rotations per 100k rows; every seed "
        f"starts from its converged dense checkpoint ({PRETRAIN:,} rows of dense pre-training, shared with "
        "`fidelity_fixed_mask.md`; look-ahead NE change over its last quarter: "
        + ", ".join(f"{100 * t['pretrain_flatness']:+.2f}%" for t in tasks)
        + f"). Increments of {args.increment_rows:,} rows (window = increment, batch {BATCH}), r = {args.r}, "
        f"p = {args.p}, AUX lambda {args.lam}, eps = {LATENT_BUDGET:g} / phase steps, phase = "
        f"{args.prune_fraction:g} of the p increments ({t0['phase_steps']} steps). "
        f"{len(t0['windows_end'])} serving windows per seed after a warm-up of {t0['warmup_rows']:,} rows; "
        f"{len(tasks)} seeds ({[t['seed'] for t in tasks]}). Serving gap = mean over serving windows of "
        "(CE_line - CE_dense) / CE_dense on the same samples; ± is the 95% t-interval over seeds.",
        "",
        markdown_table(
            ["line", "mean sparsity", "serving gap %", "last-quarter gap %", "after D2S's first refresh %"],
            rows,
        ),
        "",
        "Until its first refresh D2S serves the same model as the fixed-mask line (both are pruned from the "
        "dense snapshot at the end of the warm-up), so the whole-period gap mixes r increments where the "
        "two are identical by construction with those where D2S serves a model of its own.",
        "",
        f"Paired D2S - fixed mask, serving gap: {fmt_ci(s['d2s_minus_fixed_mask'])} % points "
        f"({verdict(s['d2s_minus_fixed_mask'])}).",
        "",
        f"Claim: D2S's gap <= {TARGET} x the fixed-mask model's (per seed d = D2S - {TARGET} x fixed mask, % "
        "points; met when the CI of d is below 0):",
        "",
        markdown_table(["over", "ratio of means", "d", "claim"], claims),
        "",
        "Figure: `fidelity_d2s.png` (relative look-ahead CE per serving window, mean over seeds; ticks: "
        "births of D2S's sparse models).",
        "",
    ]
    (args.out / "fidelity_d2s.md").write_text("\n".join(parts))


def write_plot(tasks: list[dict], args: argparse.Namespace) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [e / 1e3 for e in tasks[0]["windows_end"]]
    for n in LINES:
        mean = [100 * statistics.fmean(t["lines"][n]["relative"][i] for t in tasks) for i in range(len(xs))]
        ax.plot(xs, mean, marker="o", label=LABELS[n])
    for birth in tasks[0]["lines"]["fixed"]["births"]:
        ax.axvline(birth * args.increment_rows / 1e3, color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("thousand samples after the dense checkpoint")
    ax.set_ylabel("look-ahead CE relative to dense (%)")
    ax.set_title(f"D2S under drift {args.drift_per_100k}/100k rows (mean of {len(tasks)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fidelity_d2s.png", dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    path = args.out / "fidelity_d2s.json"
    if args.replot:
        report = json.loads(path.read_text())
    else:
        report = run_tasks(run_task, [(s, args) for s in args.seeds], args.workers)
        report["tasks"].sort(key=lambda t: t["seed"])
    report["summary"] = summarize(report["tasks"])
    path.write_text(json.dumps(report, indent=1))
    write_plot(report["tasks"], args)
    write_markdown(report, args)
    print((args.out / "fidelity_d2s.md").read_text())


if __name__ == "__main__":
    main()
