"""D2S under drift: the serving model's look-ahead CE relative to dense (SPEC 6; D2S paper 6.2, Fig. 6).

Per dataset, drift rate and seed, one ``D2SController`` pass: a dense DLRM trains on every increment; the
serving lines are D2S with a fixed period ``r`` (``fixed``), D2S that also re-prunes early when its CE on
an increment is more than ``threshold`` above the dense model's (``adaptive``), a single AUX model with a
fixed mask (``fixed_mask``) and the single AUX model whose mask keeps learning (``adaptation``). All lines
share the dense model and the first sparse model (pruned from the dense snapshot after the warm-up), and
every window is scored look-ahead on the same samples, so relative CE compares like with like. Headline:
pooled relative CE over the serving period and over its last quarter, mean and spread over seeds.

Synthetic drift is given in rotations of the click model per 100k rows, so it does not depend on the
stream length; drift 0 is the stationary control. TalkingData (real, four days, sorted by click time) is
used when ../shared/data is present.

Writes docs/results/d2s_drift.{md,json} and d2s_drift_<dataset>.png.

    .venv/bin/python benchmarks/d2s_drift.py        # ~15 min on 2 cores (2 worker processes)
    .venv/bin/python benchmarks/d2s_drift.py --rows 300000 --seeds 0,1,2,3,4 --drifts 0,0.5,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from torchrec_prune.data import SyntheticStream, open_stream  # noqa: E402
from torchrec_prune.data.stream import Stream  # noqa: E402
from torchrec_prune.masks import wrap  # noqa: E402
from torchrec_prune.metrics import relative_ce  # noqa: E402
from torchrec_prune.models import DLRMConfig, build_dlrm  # noqa: E402
from torchrec_prune.numerics import enable_ftz_daz  # noqa: E402
from torchrec_prune.pruners.aux import AuxConfig  # noqa: E402
from torchrec_prune.schedules import D2SConfig, D2SController, last_quarter_relative_ce, pooled_relative  # noqa: E402
from torchrec_prune.train.job import model_config_for  # noqa: E402
from torchrec_prune.train.trainer import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
TALKINGDATA = REPO.parent / "shared" / "data" / "talkingdata" / "train_sample.csv"
LINES = ("fixed", "adaptive", "fixed_mask", "adaptation")
TARGET_RATIO = 0.5  # D2S's last-quarter relative CE should be at most half the fixed-mask model's
SIGNIFICANT = 1e-3  # |relative CE| above 0.1% is a significant difference (SPEC 2)


def _list(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=_list(str), default=["synthetic", "talkingdata"])
    p.add_argument("--drifts", type=_list(float), default=[0.0, 0.5, 2.0], help="rotations per 100k rows")
    p.add_argument("--seeds", type=_list(int), default=[0, 1, 2])
    p.add_argument("--rows", type=int, default=100_000, help="synthetic stream length")
    p.add_argument("--increment-rows", type=int, default=10_000)
    p.add_argument("--window", type=int, default=5_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad learning rate")
    p.add_argument("--r", type=int, default=3, help="increments each D2S sparse model serves")
    p.add_argument("--p", type=int, default=1, help="increments between the dense snapshot and serving")
    p.add_argument("--warmup", type=int, default=3, help="increments of dense training before serving")
    p.add_argument("--threshold", type=float, default=0.02, help="adaptive: relative CE gap that re-prunes")
    p.add_argument("--lam", type=float, default=1.75, help="AUX lambda")
    p.add_argument("--eps", type=float, default=0.2, help="AUX latent-score step")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one intra-op thread each)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.d2s = D2SConfig(  # validates r, p, threshold, warmup before anything runs
        r=args.r,
        p=args.p,
        warmup=args.warmup,
        threshold=args.threshold,
        aux=AuxConfig(lam=args.lam, eps=args.eps),
        lines=LINES,
    )
    args.train = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adagrad",
        window=args.window,
        increment_rows=args.increment_rows,
        progress=False,
    )
    return args


def _stream(dataset: str, drift: float, seed: int, rows: int) -> Stream:
    if dataset == "talkingdata":
        return open_stream(f"talkingdata:{TALKINGDATA}", num_embeddings=10_000)
    return SyntheticStream(rows, drift=drift * rows / 100_000, seed=seed)


def run_one(task: tuple[str, float, int, argparse.Namespace]) -> dict:
    """One D2S pass; returns plain numbers (picklable) for aggregation."""
    dataset, drift, seed, args = task
    torch.set_num_threads(1)
    enable_ftz_daz()
    stream = _stream(dataset, drift, seed, args.rows)
    torch.manual_seed(seed)
    model = wrap(build_dlrm(model_config_for(stream, DLRMConfig())))
    started = time.perf_counter()
    result = D2SController(model, stream, args.train, args.d2s).run()
    since = result.warmup_rows
    tail = [r for r in result.dense if r.samples_end > since]
    out = {
        "dataset": dataset,
        "drift": drift,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "warmup_rows": since,
        "dense_ne_last_quarter": statistics.fmean(
            r.ne for r in tail[-max(1, len(tail) // 4) :] if math.isfinite(r.ne)
        ),
        "samples_end": [r.samples_end for r in result.dense],
        "lines": {},
    }
    for name, line in result.lines.items():
        out["lines"][name] = {
            "relative_ce": pooled_relative(line.records, result.dense, since=since),
            "last_quarter_relative_ce": last_quarter_relative_ce(line.records, result.dense, since=since),
            "per_window": relative_ce(line.records, result.dense),
            "births": line.births,
            "sparsity": statistics.fmean(line.sparsity),
            "max_age": line.max_age,
            "seconds": line.serving_seconds + line.pruning_seconds,
        }
    return out


def _drift_label(dataset: str, drift: float) -> str:
    return "real" if dataset == "talkingdata" else f"{drift:g}"


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2%}"
    return f"{statistics.fmean(values):+.2%} ± {statistics.stdev(values):.2%}"


def summarize(runs: list[dict], args: argparse.Namespace) -> tuple[str, dict]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["drift"]), []).append(run)
    lines = [
        "# D2S under drift: serving-model look-ahead CE relative to dense",
        "",
        f"Stream: synthetic {args.rows} rows (drift in rotations per 100k rows; 0 = stationary control) and "
        f"TalkingData `train_sample.csv` (100k clicks, time order) when present. Increments of "
        f"{args.increment_rows} rows, look-ahead windows of {args.window}, Adagrad lr {args.lr}, batch "
        f"{args.batch_size}, DLRM emb dim 4, bottom 256-128-64-4, top 256-128-1. "
        f"D2S: r={args.r}, p={args.p}, warm-up {args.warmup} increments, adaptive threshold "
        f"{args.threshold:.0%}; AUX lambda {args.lam}, "
        f"eps {args.eps}, half of the p increments pruning, half fine-tuning. Seeds {args.seeds} (stream and "
        "model; TalkingData: model only). Relative CE is pooled over the serving period (after the warm-up); "
        "mean ± standard deviation over seeds. Modest row counts so the default run takes ~15 min on 2 "
        "cores; timings are on a machine shared with other jobs.",
        "",
        "| dataset | drift | line | rel CE (serving period) | last-quarter rel CE | sparsity | births "
        "(seed 0) | oldest age |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("d2s", "train", "out")}}
    summary["groups"] = []
    verdicts = []
    for (dataset, drift), group in sorted(groups.items()):
        entry = {"dataset": dataset, "drift": drift, "seeds": [g["seed"] for g in group], "lines": {}}
        for name in LINES:
            rel = [g["lines"][name]["relative_ce"] for g in group]
            last = [g["lines"][name]["last_quarter_relative_ce"] for g in group]
            sparsity = statistics.fmean(g["lines"][name]["sparsity"] for g in group)
            first = min(group, key=lambda g: g["seed"])["lines"][name]
            drift_label = _drift_label(dataset, drift)
            lines.append(
                f"| {dataset} | {drift_label} | {name} | {_spread(rel)} | {_spread(last)} | {sparsity:.1%} | "
                f"{first['births']} | {max(g['lines'][name]['max_age'] for g in group)} |"
            )
            entry["lines"][name] = {
                "relative_ce": rel,
                "last_quarter_relative_ce": last,
                "sparsity": sparsity,
            }
        mean_fixed = statistics.fmean(entry["lines"]["fixed_mask"]["last_quarter_relative_ce"])
        for mode in ("fixed", "adaptive"):
            mean_d2s = statistics.fmean(entry["lines"][mode]["last_quarter_relative_ce"])
            if mean_fixed <= SIGNIFICANT:
                verdict, met = "not applicable (the fixed-mask model is not worse than dense by > 0.1%)", None
            else:
                met = mean_d2s <= TARGET_RATIO * mean_fixed
                verdict = f"ratio {mean_d2s / mean_fixed:.2f}, target {'met' if met else 'NOT met'}"
            entry[f"{mode}_vs_fixed_mask_last_quarter"] = {
                "d2s": mean_d2s,
                "fixed_mask": mean_fixed,
                "met": met,
            }
            verdicts.append(
                f"- {dataset}, drift {drift_label}, D2S {mode}: last-quarter rel CE {mean_d2s:+.2%} vs "
                f"fixed mask {mean_fixed:+.2%}: {verdict}"
            )
        entry["dense_ne_last_quarter"] = [g["dense_ne_last_quarter"] for g in group]
        entry["seconds"] = [g["seconds"] for g in group]
        summary["groups"].append(entry)
    lines += [
        "",
        "Target: D2S last-quarter relative CE at most half of the fixed-mask model's (means over seeds).",
        "",
    ]
    lines += verdicts
    lines += [
        "",
        "Dense model NE over the last quarter (that the model learns): "
        + "; ".join(
            f"{e['dataset']} drift {_drift_label(e['dataset'], e['drift'])}: "
            f"{statistics.fmean(e['dense_ne_last_quarter']):.3f}"
            for e in summary["groups"]
        ),
    ]
    return "\n".join(lines) + "\n", summary


def plot(runs: list[dict], out: Path) -> list[Path]:
    paths = []
    for dataset in sorted({r["dataset"] for r in runs}):
        mine = [r for r in runs if r["dataset"] == dataset]
        drifts = sorted({r["drift"] for r in mine})
        fig, axes = plt.subplots(1, len(drifts), figsize=(5.5 * len(drifts), 4), squeeze=False)
        for ax, drift in zip(axes[0], drifts, strict=True):
            group = [r for r in mine if r["drift"] == drift]
            xs = group[0]["samples_end"]
            for name in LINES:
                series = [r["lines"][name]["per_window"] for r in group]
                mean = [100 * statistics.fmean(v) for v in zip(*series, strict=True)]
                ax.plot(xs, mean, label=name)
                if len(series) > 1:
                    lo = [100 * min(v) for v in zip(*series, strict=True)]
                    hi = [100 * max(v) for v in zip(*series, strict=True)]
                    ax.fill_between(xs, lo, hi, alpha=0.15)
            ax.axvline(group[0]["warmup_rows"], color="grey", lw=0.8, ls="--")
            ax.axhline(0, color="black", lw=0.6)
            ax.set_title(f"{dataset}, drift {_drift_label(dataset, drift)}")
            ax.set_xlabel("samples seen")
            ax.set_ylabel("relative look-ahead CE vs dense (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.tight_layout()
        path = out / f"d2s_drift_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    args = parse_args()
    tasks = []
    for dataset in args.datasets:
        if dataset == "talkingdata" and not TALKINGDATA.is_file():
            print(f"skipping talkingdata: {TALKINGDATA} not found (see ../shared/data/README.md)")
            continue
        if dataset not in ("synthetic", "talkingdata"):
            raise SystemExit(f"unknown dataset {dataset!r}: expected synthetic or talkingdata")
        drifts = [0.0] if dataset == "talkingdata" else args.drifts
        tasks += [(dataset, drift, seed, args) for drift in drifts for seed in args.seeds]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        runs = list(tqdm(pool.imap_unordered(run_one, tasks), total=len(tasks), desc="d2s runs"))
    table, summary = summarize(runs, args)
    summary["runs"] = runs
    summary["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "d2s_drift.md").write_text(table)
    (args.out / "d2s_drift.json").write_text(json.dumps(summary, indent=1))
    paths = plot(runs, args.out)
    print(table)
    print(
        f"wrote {args.out / 'd2s_drift.md'}, d2s_drift.json, {', '.join(p.name for p in paths)} "
        f"in {summary['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
