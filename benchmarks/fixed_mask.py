"""Pruning with a fixed mask: AUX against MP, TP and MoP (SPEC 4; D2S paper section 6.1, Figure 5).

Per dataset and seed: the reference DLRM trains densely on the first rows of the stream; from there,
copies of it (weights and Adagrad state) run a short pruning phase and then incremental training with
the mask fixed, while the dense model trains on over the same rows. Every window is scored before it is
learned (look-ahead), and each pruned run's CE is taken relative to the dense model's on the same
samples. For each target sparsity AUX's lambda is found by a search over pruning phases on the same
stretch (``LambdaSearch``), and MP/TP/MoP are then given the overall sparsity AUX reached, the same in
every layer, so that methods compare at equal density.

Writes docs/results/fixed_mask.{md,json} and fixed_mask_<dataset>.png, fixed_mask_sweep.png.

    .venv/bin/python benchmarks/fixed_mask.py              # ~15 min on 2 cores (2 worker processes)
    .venv/bin/python benchmarks/fixed_mask.py --datasets synthetic --seeds 0,1,2,3,4 --syn-rows 122880
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pruning_common import (  # noqa: E402
    RESULTS,
    TALKINGDATA,
    layer_label,
    markdown_table,
    pretrain,
    reference_model,
    setup_process,
    synthetic_stream,
)
from tqdm import tqdm  # noqa: E402

from torchrec_prune.data import open_stream  # noqa: E402
from torchrec_prune.data.stream import Stream  # noqa: E402
from torchrec_prune.metrics import relative_ce  # noqa: E402
from torchrec_prune.pruners.run import LambdaSearch, PruneConfig, PruneResult, prune_and_train  # noqa: E402
from torchrec_prune.train.trainer import TrainConfig  # noqa: E402

BASELINES = ("mp", "tp", "mop")
PAPER_RATIO = 0.65  # D2S Table 1: AUX's last-window increase is at most ~0.65x the best baseline's


def _list(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=_list(str), default=["synthetic", "talkingdata"])
    p.add_argument("--seeds", type=_list(int), default=[0, 1, 2])
    p.add_argument("--sparsities", type=_list(float), default=[0.8, 0.9, 0.95, 0.98])
    p.add_argument("--methods", type=_list(str), default=["aux", *BASELINES])
    p.add_argument("--syn-pretrain-rows", type=int, default=102_400)
    p.add_argument("--syn-rows", type=int, default=61_440, help="rows after pre-training (phase included)")
    p.add_argument("--syn-prune-rows", type=int, default=15_360)
    p.add_argument("--drift-per-100k", type=float, default=0.25, help="synthetic: rotations per 100k rows")
    p.add_argument("--td-pretrain-rows", type=int, default=51_200)
    p.add_argument("--td-rows", type=int, default=46_080)
    p.add_argument("--td-prune-rows", type=int, default=10_240)
    p.add_argument("--talkingdata", type=Path, default=TALKINGDATA)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--window", type=int, default=5_120)
    p.add_argument("--latent-budget", type=float, default=10.0, help="AUX eps x phase steps")
    p.add_argument("--lambda-tol", type=float, default=0.1, help="AUX: accepted relative error of density")
    p.add_argument("--workers", type=int, default=2, help="processes, one (dataset, seed) task each")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replot", action="store_true", help="rewrite the .md and plots from the .json in --out")
    return p.parse_args()


def _plan(dataset: str, args: argparse.Namespace) -> tuple[int, int, int]:
    if dataset == "synthetic":
        return args.syn_pretrain_rows, args.syn_rows, args.syn_prune_rows
    return args.td_pretrain_rows, args.td_rows, args.td_prune_rows


def _stream(dataset: str, args: argparse.Namespace, seed: int) -> Stream:
    pre, rows, _ = _plan(dataset, args)
    if dataset == "synthetic":
        return synthetic_stream(pre + rows, args.drift_per_100k, seed)
    return open_stream(f"talkingdata:{args.talkingdata}", max_rows=pre + rows)


def _increase(arm: list[float], dense: list[float]) -> float:
    return sum(arm) / sum(dense) - 1.0


def _arm(result: PruneResult, dense: PruneResult, **extra: object) -> dict:
    ce, ref = [r.ce for r in result.records], [r.ce for r in dense.records]
    tail = max(1, len(ce) // 4)
    return {
        **extra,
        "sparsity": result.sparsity,
        "layers": {layer_label(f): s.sparsity for f, s in result.stats.items()},
        "phase_steps": result.phase_steps,
        "relative_ce": relative_ce(result.records, dense.records),
        "last_window": _increase(ce[-1:], ref[-1:]),
        "last_quarter": _increase(ce[-tail:], ref[-tail:]),
    }


def run_task(dataset: str, seed: int, args: argparse.Namespace) -> dict:
    """Pre-train, then the dense reference and every (sparsity, method) arm on one stream and seed."""
    setup_process()
    pre, rows, prune_rows = _plan(dataset, args)
    stream = _stream(dataset, args, seed)
    train = TrainConfig(
        batch_size=args.batch_size, lr=args.lr, window=args.window, increment_rows=args.window, progress=False
    )
    started = time.perf_counter()
    _, state, pretrain_ne = pretrain(stream, pre, train, seed)
    start, stop = pre, pre + rows

    def run(prune: PruneConfig | None, end: int = stop) -> PruneResult:
        model = reference_model(stream, seed)
        optimizer = state.restore(model, train)
        return prune_and_train(
            model, stream, train, prune, start_row=start, stop_row=end, optimizers=[optimizer]
        )

    dense = run(None)
    steps = stream.num_batches(args.batch_size, start_row=start, num_rows=prune_rows)
    eps = args.latent_budget / steps

    def aux(lam: float) -> PruneConfig:
        return PruneConfig("aux", lam=lam, eps=eps, prune_rows=prune_rows)

    search = LambdaSearch(lambda lam: run(aux(lam), end=start + prune_rows).sparsity, rel_tol=args.lambda_tol)
    arms = []
    for target in args.sparsities:
        lam, _ = search.find(target)
        result = run(aux(lam))
        arms.append(_arm(result, dense, method="aux", target=target, lam=lam))
        for method in (m for m in args.methods if m in BASELINES):
            other = run(PruneConfig(method, sparsity=result.sparsity, prune_rows=prune_rows))
            arms.append(_arm(other, dense, method=method, target=target))
        tqdm.write(f"{dataset} seed {seed}: sparsity {target} done ({time.perf_counter() - started:.0f} s)")
    return {
        "dataset": dataset,
        "seed": seed,
        "pretrain_rows": pre,
        "rows": rows,
        "prune_rows": prune_rows,
        "phase_steps": steps,
        "eps": eps,
        "pretrain_last_window_ne": pretrain_ne,
        "lambda_search": {str(k): v for k, v in sorted(search.runs.items())},
        "windows_end": [r.samples_end for r in dense.records],
        "dense_ce": [r.ce for r in dense.records],
        "dense_ne": [r.ne for r in dense.records],
        "mean_ctr": statistics.mean(r.ctr for r in dense.records),  # per-window CTRs are not kept
        "arms": arms,
        "wall_seconds": time.perf_counter() - started,
    }


def _run_task(job: tuple[str, int, argparse.Namespace]) -> dict:
    return run_task(*job)


def main() -> None:
    args = parse_args()
    if args.replot:
        report = json.loads((args.out / "fixed_mask.json").read_text())
        settings = argparse.Namespace(**{**report["settings"], "out": args.out})
        report["summary"] = summarize(report["tasks"], settings)
        (args.out / "fixed_mask.json").write_text(json.dumps(report, indent=2))
        write_plots(report["tasks"], report["summary"], settings)
        write_markdown(report, settings)
        return
    datasets = list(args.datasets)
    if "talkingdata" in datasets and not args.talkingdata.is_file():
        print(f"TalkingData not found at {args.talkingdata} (see ../shared/data/README.md): skipping it")
        datasets.remove("talkingdata")
    for d in datasets:
        pre, rows, prune = _plan(d, args)
        print(
            f"{d}: dense pre-training {pre} rows, then {rows} rows ({prune} pruning, {rows - prune} with the "
            f"fixed mask), window {args.window}, batch {args.batch_size}; seeds {args.seeds}; "
            f"sparsities {args.sparsities}"
        )
    jobs = [(d, s, args) for d in datasets for s in args.seeds]
    started = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            tasks = list(tqdm(pool.imap_unordered(_run_task, jobs), total=len(jobs), desc="tasks"))
    else:
        tasks = [_run_task(job) for job in tqdm(jobs, desc="tasks")]
    tasks.sort(key=lambda t: (t["dataset"], t["seed"]))
    report = {
        "argv": " ".join(sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_seconds": time.perf_counter() - started,
        "tasks": tasks,
        "summary": summarize(tasks, args),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fixed_mask.json").write_text(json.dumps(report, indent=2))
    write_plots(tasks, report["summary"], args)
    write_markdown(report, args)
    print((args.out / "fixed_mask.md").read_text())


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


METRICS = ("last_window", "last_quarter", "after_phase")


def _after_phase(task: dict, arm: dict, windows: int = 2) -> float:
    """Increase over the first ``windows`` windows after the pruning phase: how hard freezing the mask hit
    (the paper's Figure 5 shows AUX settling sooner than MP)."""
    after = [i for i, end in enumerate(task["windows_end"]) if end > task["prune_rows"]][:windows]
    dense = [task["dense_ce"][i] for i in after]
    pruned = [(1 + arm["relative_ce"][i]) * d for i, d in zip(after, dense, strict=True)]
    return _increase(pruned, dense)


def summarize(tasks: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per dataset, sparsity and method: mean and std over seeds. Per dataset and sparsity: AUX against the
    best baseline (lowest mean) and against each baseline, with per-seed paired differences."""
    rows = []
    for dataset in sorted({t["dataset"] for t in tasks}):
        mine = [t for t in tasks if t["dataset"] == dataset]
        for target in args.sparsities:
            entry: dict = {"dataset": dataset, "target": target, "methods": {}}
            for method in args.methods:
                arms = [
                    (t, a) for t in mine for a in t["arms"] if a["target"] == target and a["method"] == method
                ]
                if not arms:
                    continue
                values = {
                    key: [a[key] for _, a in arms] for key in ("sparsity", "last_window", "last_quarter")
                }
                values["after_phase"] = [_after_phase(t, a) for t, a in arms]
                entry["methods"][method] = {key: _stats(v) for key, v in values.items()}
                if method == "aux":
                    entry["methods"][method]["lam"] = _stats([a["lam"] for _, a in arms])
            baselines = {m: v for m, v in entry["methods"].items() if m != "aux"}
            if "aux" in entry["methods"] and baselines:
                aux = entry["methods"]["aux"]
                for key in METRICS:
                    best = min(baselines, key=lambda m: baselines[m][key]["mean"])
                    ref = baselines[best][key]
                    positive = ref["mean"] > 0 and aux[key]["mean"] > 0
                    entry[f"{key}_vs_best"] = {
                        "best": best,
                        "aux": aux[key]["mean"],
                        "best_mean": ref["mean"],
                        "ratio": aux[key]["mean"] / ref["mean"] if positive else None,
                    }
                    entry[f"{key}_vs"] = {
                        m: _paired(aux[key]["values"], b[key]["values"]) for m, b in baselines.items()
                    }
            rows.append(entry)
    return rows


def _paired(aux: list[float], other: list[float]) -> dict:
    diffs = [a - b for a, b in zip(aux, other, strict=True)]
    return {**_stats(diffs), "aux_lower": sum(d < 0 for d in diffs), "seeds": len(diffs)}


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:+.2f} ± {100 * s['std']:.2f}"


def _ratio(vs: dict) -> str:
    best = vs["best"].upper()
    if vs["best_mean"] <= 0:
        return f"n/a: {best} below dense"
    if vs["aux"] <= 0:
        return f"n/a: AUX below dense ({best} {100 * vs['best_mean']:+.2f}%)"
    return f"{vs['ratio']:.2f} ({best})"


def _targets(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values) or "none"


def findings(tasks: list[dict], summary: list[dict], dataset: str, args: argparse.Namespace) -> list[str]:
    """Bullet points computed from the numbers: the paper's criterion, seed counts, disruption, noise."""
    entries = [e for e in summary if e["dataset"] == dataset and "last_window_vs" in e]
    if not entries:
        return []
    lines = []
    met = [
        e["target"]
        for e in entries
        if (r := e["last_window_vs_best"]["ratio"]) is not None and r <= PAPER_RATIO
    ]
    missed = [
        e["target"]
        for e in entries
        if (r := e["last_window_vs_best"]["ratio"]) is not None and r > PAPER_RATIO
    ]
    undefined = [e["target"] for e in entries if e["last_window_vs_best"]["ratio"] is None]
    lines.append(
        f"- Paper's criterion (AUX's last-window increase <= {PAPER_RATIO} x the best baseline's): met at "
        f"sparsity {_targets(met)}; missed at {_targets(missed)}; undefined at {_targets(undefined)} (a "
        "mean at or below 0: pruned no worse than dense)."
    )
    if all("mp" in e["methods"] and "aux" in e["methods"] for e in entries):
        ratios = []
        for e in entries:
            aux, mp_ = e["methods"]["aux"]["last_window"]["mean"], e["methods"]["mp"]["last_window"]["mean"]
            ratio = f"{aux / mp_:.2f}" if aux > 0 and mp_ > 0 else "n/a (a mean <= 0)"
            ratios.append(f"{e['target']:g}: {ratio}")
        lines.append(
            "- Against MP, the paper's strongest baseline, AUX's last-window ratio is "
            + ", ".join(ratios)
            + "."
        )
    counts = []
    for m in (m for m in args.methods if m != "aux"):
        lower = sum(e["last_quarter_vs"][m]["aux_lower"] for e in entries)
        total = sum(e["last_quarter_vs"][m]["seeds"] for e in entries)
        counts.append(f"{m.upper()} in {lower}/{total}")
    lines.append(
        "- AUX's last-quarter increase is below the baseline's, over every (sparsity, seed) pair: "
        + ", ".join(counts)
        + "."
    )
    after = {
        m: statistics.mean(e["methods"][m]["after_phase"]["mean"] for e in entries)
        for m in args.methods
        if all(m in e["methods"] for e in entries)
    }
    lines.append(
        "- Right after the mask is frozen (two windows), mean increase over the sparsities: "
        + ", ".join(f"{m.upper()} {100 * v:+.2f}%" for m, v in after.items())
        + " (how much freezing the mask disrupts training; the paper's Figure 5 shows AUX settling first)."
    )
    first = entries[0]
    spread = max(v["last_quarter"]["std"] for v in first["methods"].values())
    means = [v["last_quarter"]["mean"] for v in first["methods"].values()]
    lines.append(
        f"- Noise: at sparsity {first['target']:g} the methods' mean last-quarter increases span "
        f"{100 * min(means):+.2f}% to {100 * max(means):+.2f}%; the seed std reaches {100 * spread:.2f}%."
    )
    mine = [t for t in tasks if t["dataset"] == dataset]
    below = sum(v["last_quarter"]["mean"] < 0 for e in entries for m, v in e["methods"].items())
    cells = sum(len(e["methods"]) for e in entries)
    if below > cells / 2:
        change = [t["dense_ce"][-1] / t["dense_ce"][0] - 1 for t in mine]
        lines.append(
            f"- {below} of {cells} (sparsity, method) cells are below the dense model on average: the dense "
            f"model's own look-ahead CE moved by {100 * min(change):+.0f}% to {100 * max(change):+.0f}% over "
            "the run, so here relative CE mostly measures how much pruning regularises it, not accuracy lost."
        )
    return lines


def write_markdown(report: dict, args: argparse.Namespace) -> None:
    tasks, summary = report["tasks"], report["summary"]
    command = f"python benchmarks/fixed_mask.py {report.get('argv', '')}".strip()
    parts = [
        "# Pruning with a fixed mask: AUX vs MP / TP / MoP (D2S paper 6.1)",
        "",
        f"Produced by `{command}` ({report['wall_seconds'] / 60:.1f} min, {args.workers} worker processes). "
        "Raw numbers: `fixed_mask.json`.",
        "",
        "**Setup.** Reference DLRM (embedding dim 4, bottom MLP 256-128-64-4, top MLP 256-128-1; on "
        "TalkingData 6 dense and 7 categorical inputs), Adagrad lr "
        f"{args.lr}, batch {args.batch_size}, look-ahead window {args.window} samples. Per dataset and seed "
        "the model trains densely, then copies of it (weights and Adagrad state) are pruned on the next "
        "rows and train on with the mask fixed, while the dense model trains on over the same rows. "
        "Relative CE = CE(pruned) / CE(dense) - 1 on the same look-ahead samples; *last window* is the "
        "final window, *last quarter* the final quarter of the windows (all after the pruning phase), "
        "*after phase* the two windows right after the mask is frozen. "
        "AUX: w1 = w2 = 0.5, a0 = 1, eps = "
        f"{args.latent_budget:g} / phase steps, lambda searched per seed and target on the pruning phase "
        f"(density within {100 * args.lambda_tol:g}% of the target). MP/TP/MoP ramp linearly to the "
        "sparsity AUX reached (same in every layer); MoP w1 = w2 = 0.5, decay 0.99. The output layer is "
        "never pruned.",
        "",
    ]
    for dataset in sorted({t["dataset"] for t in tasks}):
        mine = [t for t in tasks if t["dataset"] == dataset]
        t0 = mine[0]
        dense_ce = statistics.mean(t["dense_ce"][-1] for t in mine)
        dense_ne = statistics.mean(t["dense_ne"][-1] for t in mine)
        drift = [t["dense_ce"][-1] / t["dense_ce"][0] - 1 for t in mine]
        positives = statistics.mean(t["mean_ctr"] for t in mine) * args.window
        what = (
            f"synthetic stream, drift {args.drift_per_100k} rotations per 100k rows, stream seed = seed"
            if dataset == "synthetic"
            else "TalkingData sample in click-time order (same rows for every seed; the seed sets the model)"
        )
        entries = [e for e in summary if e["dataset"] == dataset]
        table = []
        for entry in entries:
            for method, v in entry["methods"].items():
                lam = f"{v['lam']['mean']:.2f} ± {v['lam']['std']:.2f}" if "lam" in v else ""
                table.append(
                    [f"{entry['target']:g}", method.upper(), f"{v['sparsity']['mean']:.4f}", lam]
                    + [_pct(v[key]) for key in METRICS]
                )
        verdicts = [
            [f"{e['target']:g}", *(_ratio(e[f"{key}_vs_best"]) for key in METRICS)]
            for e in entries
            if "last_window_vs" in e
        ]
        baselines = [m for m in args.methods if m != "aux"]
        paired = []
        for e in (e for e in entries if "last_quarter_vs" in e):
            cells = []
            for m in baselines:
                d = e["last_quarter_vs"][m]
                cells.append(f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} ({d['aux_lower']}/{d['seeds']})")
            paired.append([f"{e['target']:g}", *cells])
        parts += [
            f"## {dataset}",
            "",
            f"{what}. Dense pre-training {t0['pretrain_rows']} rows, then {t0['rows']} rows: pruning phase "
            f"{t0['prune_rows']} rows ({t0['phase_steps']} steps), fixed mask for the rest; "
            f"{len(t0['windows_end'])} windows of about {positives:.0f} positives each. Seeds "
            f"{[t['seed'] for t in mine]}. Dense model's last window: CE {dense_ce:.4f}, NE {dense_ne:.4f} "
            "(mean over seeds); its CE changed by "
            + ", ".join(f"{100 * d:+.1f}%" for d in drift)
            + " from the first to the last window (per seed).",
            "",
            "Relative look-ahead CE in %, mean ± std over seeds (lower is better):",
            "",
            markdown_table(
                [
                    "target",
                    "method",
                    "sparsity",
                    "AUX lambda",
                    "last window %",
                    "last quarter %",
                    "after phase %",
                ],
                table,
            ),
            "",
            "Ratio of AUX's mean increase to the best baseline's (lowest mean; paper's target: <= "
            f"{PAPER_RATIO}, on the last window):",
            "",
            markdown_table(["target", "last window", "last quarter", "after phase"], verdicts),
            "",
            "Last-quarter paired difference AUX - baseline in % points, mean ± std over seeds (seeds where "
            "AUX is lower / seeds):",
            "",
            markdown_table(["target", *(f"AUX - {m.upper()}" for m in baselines)], paired),
            "",
            f"Figure: `fixed_mask_{dataset}.png` (relative CE over the stream per method, one panel per "
            "sparsity; shaded: ± std over seeds; dotted line: end of the pruning phase).",
            "",
        ]
        parts += ["Findings (computed from the tables):", "", *findings(tasks, summary, dataset, args), ""]
        aux_layers = _aux_layers(tasks, dataset, args)
        if aux_layers:
            names = list(next(iter(aux_layers.values())))
            parts += [
                "Per-layer sparsity AUX learned (mean over seeds); the baselines use the overall value in "
                "every layer:",
                "",
                markdown_table(
                    ["target", *names],
                    [[f"{t:g}", *(f"{layers[n]:.3f}" for n in names)] for t, layers in aux_layers.items()],
                ),
                "",
            ]
    parts += [
        "Sweep: `fixed_mask_sweep.png` (last-quarter relative CE against sparsity, ± std over seeds).",
        "",
    ]
    (args.out / "fixed_mask.md").write_text("\n".join(parts))


def _aux_layers(tasks: list[dict], dataset: str, args: argparse.Namespace) -> dict[float, dict[str, float]]:
    out = {}
    for target in args.sparsities:
        arms = [a for t in tasks if t["dataset"] == dataset for a in t["arms"] if a["method"] == "aux"]
        arms = [a for a in arms if a["target"] == target]
        if arms:
            out[target] = {n: statistics.mean(a["layers"][n] for a in arms) for n in arms[0]["layers"]}
    return out


def write_plots(tasks: list[dict], summary: list[dict], args: argparse.Namespace) -> None:
    datasets = sorted({t["dataset"] for t in tasks})
    for dataset in datasets:
        mine = [t for t in tasks if t["dataset"] == dataset]
        fig, axes = plt.subplots(
            1, len(args.sparsities), figsize=(4 * len(args.sparsities), 3.6), sharey=False
        )
        for ax, target in zip(list(getattr(axes, "flat", [axes])), args.sparsities, strict=True):
            xs = mine[0]["windows_end"]
            for method in args.methods:
                curves = [
                    a["relative_ce"]
                    for t in mine
                    for a in t["arms"]
                    if a["method"] == method and a["target"] == target
                ]
                if not curves:
                    continue
                mean = [100 * statistics.mean(c[i] for c in curves) for i in range(len(xs))]
                std = [
                    100 * (statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0)
                    for i in range(len(xs))
                ]
                ax.plot(xs, mean, label=method.upper())
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(xs, low, high, alpha=0.2)
            ax.axvline(mine[0]["prune_rows"], color="grey", linestyle=":")
            ax.axhline(0, color="black", linewidth=0.5)
            ax.set_title(f"{dataset}, sparsity {target:g}")
            ax.set_xlabel("samples after pre-training")
            ax.grid(alpha=0.3)
        first = list(getattr(axes, "flat", [axes]))[0]
        first.set_ylabel("relative look-ahead CE (%)")
        first.legend()
        fig.tight_layout()
        fig.savefig(args.out / f"fixed_mask_{dataset}.png", dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8))
    for ax, dataset in zip(list(getattr(axes, "flat", [axes])), datasets, strict=True):
        entries = [e for e in summary if e["dataset"] == dataset]
        for method in args.methods:
            points = [
                (e["methods"][method]["sparsity"]["mean"], e["methods"][method]["last_quarter"])
                for e in entries
                if method in e["methods"]
            ]
            ax.errorbar(
                [p[0] for p in points],
                [100 * p[1]["mean"] for p in points],
                yerr=[100 * p[1]["std"] for p in points],
                label=method.upper(),
                marker="o",
                capsize=3,
            )
        ax.set_title(dataset)
        ax.set_xlabel("overall sparsity of the pruned Linears")
        ax.set_ylabel("last-quarter relative CE (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fixed_mask_sweep.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
