"""Powered fixed-mask comparison: AUX vs MP / TP / MoP (D2S paper 6.1, Table 1, Fig. 5).

Per dataset and seed, every arm starts from the same converged dense checkpoint (``fidelity_common``):
a pruning phase, then a stretch with the mask fixed, while the dense model trains on over the same rows.
Each arm's CE is compared with the dense model's *on the same samples* (synthetic: look-ahead windows,
by default 25,600 samples after a 100-step phase, the planned powered sizes with the flags below;
Criteo head: the 800 held-out dev+test rows after training, as the head is replayed for epochs),
averaged over the fixed-mask windows per seed, and the
differences are summarised by a 95% t-interval over seeds. AUX's lambda is searched per seed and target;
the baselines ramp to the sparsity AUX reached, the same in every layer.

The paper's claim is tested per seed: d = increase(AUX) - 0.65 * increase(best baseline); the claim is
met when the t-interval of d lies below 0, missed when above, inconclusive otherwise.

Writes docs/results/fidelity_fixed_mask.{md,json} and fidelity_fixed_mask_<dataset>.png.

    .venv/bin/python benchmarks/fidelity_fixed_mask.py          # ~15 min on 2 shared cores
    .venv/bin/python benchmarks/fidelity_fixed_mask.py --replot
    .venv/bin/python benchmarks/fidelity_fixed_mask.py --datasets synthetic --drift-per-100k 0 \
        --stem fidelity_fixed_mask_stationary                        # the stationary control
    .venv/bin/python benchmarks/fidelity_fixed_mask.py --datasets synthetic --seeds 0,1,2,3,4,5,6,7,8,9 \
        --phase-rows 153600 --fixed-rows 102400 --window 51200 \
        --stem fidelity_fixed_mask_powered                           # 300-step phases, 51.2k windows: 21 min
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
    StreamSpec,
    criteo_heldout,
    dense_checkpoint,
    fmt_ci,
    paired_mean,
    per_sample_ce,
    run_tasks,
    t_interval,
    verdict,
)
from pruning_common import RESULTS, layer_label, markdown_table, setup_process  # noqa: E402

from torchrec_prune.pruners.aux import LATENT_BUDGET  # noqa: E402
from torchrec_prune.pruners.run import LambdaSearch, PruneConfig, PruneResult, prune_and_train  # noqa: E402
from torchrec_prune.train.trainer import TrainConfig  # noqa: E402

PAPER_RATIO = 0.65
# name -> (method, w1, w2); MoP's w1 weighs magnitude, w2 momentum (paper's MoP (w1, w2)).
BASELINES = {"MP": ("mp", 0.5, 0.5), "TP": ("tp", 0.5, 0.5), "MoP(.5,.5)": ("mop", 0.5, 0.5),
             "MoP(.8,.2)": ("mop", 0.8, 0.2)}  # fmt: skip
# dataset -> (pretrain rows, phase rows, fixed-mask rows, window, batch size)
PLANS = {
    "synthetic": (819_200, 51_200, 51_200, 25_600, 512),
    "criteo": (21_600, 7_200, 7_200, 7_200, 128),  # epochs of the 7,200-row head
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=lambda s: s.split(","), default=["synthetic", "criteo"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",")], default=[0.8, 0.95])
    p.add_argument("--drift-per-100k", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad")
    p.add_argument("--lambda-tol", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replot", action="store_true")
    p.add_argument(
        "--stem", default="fidelity_fixed_mask", help="output file stem, e.g. for a drift-0 control"
    )
    p.add_argument("--phase-rows", type=int, help="synthetic pruning phase (default 51,200: 100 steps)")
    p.add_argument("--fixed-rows", type=int, help="synthetic rows with the mask fixed (default 51,200)")
    p.add_argument("--window", type=int, help="synthetic look-ahead window (default 25,600)")
    return p.parse_args()


def plan_of(dataset: str, args: argparse.Namespace) -> tuple[int, int, int, int, int]:
    """``PLANS[dataset]`` with the synthetic phase, fixed stretch and window the flags name."""
    pre, phase, fixed, window, batch = PLANS[dataset]
    if dataset == "synthetic":
        phase, fixed = args.phase_rows or phase, args.fixed_rows or fixed
        window = args.window or window
    return pre, phase, fixed, window, batch


def spec_of(dataset: str, seed: int, args: argparse.Namespace) -> StreamSpec:
    pre, phase, fixed, _, _ = plan_of(dataset, args)
    drift = args.drift_per_100k if dataset == "synthetic" else 0.0
    return StreamSpec(dataset, seed, pre, pre + phase + fixed, drift)


def train_of(dataset: str, args: argparse.Namespace) -> TrainConfig:
    window, batch = plan_of(dataset, args)[3:]
    return TrainConfig(batch_size=batch, lr=args.lr, window=window, increment_rows=window, progress=False)


def run_task(job: tuple[str, int, argparse.Namespace]) -> dict:
    """Dense reference and every (target, method) arm from one checkpoint."""
    dataset, seed, args = job
    setup_process()
    started = time.perf_counter()
    spec, train = spec_of(dataset, seed, args), train_of(dataset, args)
    ckpt = dense_checkpoint(spec, train)
    stream = spec.stream()
    pre, phase, fixed, _, _ = plan_of(dataset, args)
    heldout = criteo_heldout() if dataset == "criteo" else None

    def run(prune: PruneConfig | None, stop: int = spec.total_rows) -> tuple[PruneResult, list[float]]:
        model, optimizer = ckpt.load(train)
        result = prune_and_train(
            model, stream, train, prune, start_row=pre, stop_row=stop, optimizers=[optimizer]
        )
        return result, (per_sample_ce(model, heldout).tolist() if heldout is not None else [])

    dense, dense_heldout = run(None)
    steps = stream.num_batches(train.batch_size, start_row=pre, num_rows=phase)

    def aux(lam: float, rows: int = phase) -> PruneConfig:
        return PruneConfig("aux", lam=lam, prune_rows=rows)

    # eps = latent budget / phase steps makes lambda's sparsity independent of the phase length, so lambda
    # is searched on quarter-length phases (a quarter of the cost) and used on the full phase.
    short = phase // 4
    search = LambdaSearch(
        lambda lam: run(aux(lam, short), stop=pre + short)[0].sparsity, rel_tol=args.lambda_tol
    )
    arms = []
    for target in args.sparsities:
        lam, _ = search.find(target)
        result, held = run(aux(lam))
        arms.append(_arm(result, held, method="AUX", target=target, lam=lam))
        for name, (method, w1, w2) in BASELINES.items():
            prune = PruneConfig(method, sparsity=result.sparsity, prune_rows=phase, w1=w1, w2=w2)
            other, held = run(prune)
            arms.append(_arm(other, held, method=name, target=target))
        print(
            f"{dataset} seed {seed}: target {target} done ({time.perf_counter() - started:.0f} s)", flush=True
        )
    return {
        "dataset": dataset,
        "seed": seed,
        "pretrain_rows": pre,
        "phase_rows": phase,
        "window": train.window,
        "fixed_rows": fixed,
        "phase_steps": steps,
        "pretrain_ne": ckpt.ne,
        "pretrain_flatness": ckpt.flatness(),
        "windows_end": [r.samples_end for r in dense.records],
        "dense_ce": [r.ce for r in dense.records],
        "dense_ne": [r.ne for r in dense.records],
        "positives": [r.ctr * r.n for r in dense.records],
        "dense_heldout": dense_heldout,
        "lambda_search": {str(k): v for k, v in sorted(search.runs.items())},
        "lambda_search_rows": short,
        "arms": arms,
        "seconds": time.perf_counter() - started,
    }


def _arm(result: PruneResult, heldout: list[float], **extra: object) -> dict:
    return {
        **extra,
        "sparsity": result.sparsity,
        "layers": {layer_label(f): s.sparsity for f, s in result.stats.items()},
        "ce": [r.ce for r in result.records],
        "heldout": heldout,
    }


def increases(task: dict, arm: dict) -> dict[str, float]:
    """Per-seed paired increases of CE over dense on the same samples: mean over the fixed-mask windows
    (``fixed``), the last window (``last``), or the held-out rows (``heldout``, Criteo)."""
    ends, dense = task["windows_end"], task["dense_ce"]
    after = [i for i, e in enumerate(ends) if e > task["phase_rows"]]
    out = {
        "fixed": paired_mean(
            [arm["ce"][i] for i in after], [dense[i] for i in after], [dense[i] for i in after]
        ),
        "last": arm["ce"][-1] / dense[-1] - 1,
    }
    if arm["heldout"]:
        out["heldout"] = statistics.fmean(arm["heldout"]) / statistics.fmean(task["dense_heldout"]) - 1
    return out


def summarize(tasks: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    for dataset in sorted({t["dataset"] for t in tasks}):
        mine = sorted((t for t in tasks if t["dataset"] == dataset), key=lambda t: t["seed"])
        metric = "heldout" if dataset == "criteo" else "fixed"
        for target in args.sparsities:
            per: dict[str, list[dict]] = {}
            for t in mine:
                for a in t["arms"]:
                    if a["target"] == target:
                        per.setdefault(a["method"], []).append({**increases(t, a), "sparsity": a["sparsity"]})
            methods = {m: {k: t_interval([v[k] for v in vals]) for k in vals[0]} for m, vals in per.items()}
            base = [m for m in per if m != "AUX"]
            best = min(base, key=lambda m: methods[m][metric]["mean"])
            aux = [v[metric] for v in per["AUX"]]
            claim = t_interval([a - PAPER_RATIO * b[metric] for a, b in zip(aux, per[best], strict=True)])
            rows.append({
                "dataset": dataset,
                "target": target,
                "metric": metric,
                "methods": methods,
                "vs": {m: _diff(per["AUX"], per[m], metric) for m in base},
                "mop_vs_mp": {m: _diff(per[m], per["MP"], metric) for m in base if m.startswith("MoP")},
                "best": best,
                "ratio": methods["AUX"][metric]["mean"] / methods[best][metric]["mean"]
                if methods[best][metric]["mean"] > 0 else None,
                "claim": claim,
                "claim_verdict": _claim_verdict(claim, methods[best][metric]["mean"]),
                "aux_layers": {k: statistics.fmean(a["layers"][k] for t in mine for a in t["arms"]
                                                   if a["method"] == "AUX" and a["target"] == target)
                               for k in mine[0]["arms"][0]["layers"]},
            })  # fmt: skip
    return rows


def _claim_verdict(claim: dict, best_mean: float) -> str:
    """met / not met / inconclusive from the CI of d; undefined when the best baseline is no worse than
    dense (a ratio of increases means nothing when pruning lowers CE, e.g. a dense model that overfits)."""
    if best_mean <= 0:
        return "undefined (best baseline below dense)"
    return {"below 0": "met", "above 0": "not met"}.get(verdict(claim), "inconclusive")


def _diff(a: list[dict], b: list[dict], metric: str) -> dict:
    """t-interval over seeds of the paired difference ``a - b`` of ``metric``."""
    return t_interval([x[metric] - y[metric] for x, y in zip(a, b, strict=True)])


def _lower(ci: dict) -> str:
    """Seeds where the difference is below 0, of all seeds."""
    return f"{sum(v < 0 for v in ci['values'])}/{ci['n']}"


def _ratio(ratio: float | None) -> str:
    return f"{ratio:.2f}" if ratio is not None else "n/a (best <= 0)"


def write_markdown(report: dict, args: argparse.Namespace) -> None:
    tasks, summary = report["tasks"], report["summary"]
    parts = [
        "# Powered fixed-mask comparison: AUX vs MP / TP / MoP (D2S paper 6.1, Table 1)",
        "",
        f"Produced by `python benchmarks/fidelity_fixed_mask.py {report['argv']}` "
        f"({report['wall_seconds'] / 60:.1f} min, {args.workers} processes, one thread each). Raw: "
        f"`{args.stem}.json`.",
        "",
        "**Protocol.** Reference DLRM (embedding dim 4, bottom 256-128-64-4, top 256-128-1), Adagrad lr "
        f"{args.lr}. Per dataset and seed one dense checkpoint is pre-trained and cached; every arm (dense "
        "reference, AUX and each baseline at each target) starts from it with its optimizer state. AUX: "
        f"w1 = w2 = 0.5, eps = latent budget {LATENT_BUDGET:g} / phase steps, min_layer_density 0.01, "
        "lambda searched per seed and target on quarter-length pruning phases (density within "
        f"{100 * args.lambda_tol:g}%; the budget makes lambda's sparsity independent of the phase length, "
        "and the sparsity column shows what the full phase reached). MP/TP/MoP ramp to the sparsity AUX "
        "reached in every layer; MoP's EMA "
        "decay 0.99; MoP(w1, w2) weighs magnitude by w1 and momentum by w2 as in the paper. Each "
        "difference is *paired*: same samples and seed, CE relative to the dense model's CE on those "
        "samples; ± is the 95% t-interval over seeds of the per-seed value.",
        "",
    ]
    for dataset in sorted({t["dataset"] for t in tasks}):
        mine = [t for t in tasks if t["dataset"] == dataset]
        t0 = mine[0]
        seeds = [t["seed"] for t in mine]
        if dataset == "synthetic":
            pos = statistics.fmean(p for t in mine for p in t["positives"])
            window = t0.get("window", PLANS[dataset][3])
            what = (
                f"Synthetic stream, drift {args.drift_per_100k} rotations per 100k rows (stream seed = "
                f"seed). Dense pre-training {t0['pretrain_rows']:,} rows (batch {PLANS[dataset][4]}); its "
                "look-ahead NE changed by "
                + ", ".join(f"{100 * t['pretrain_flatness']:+.2f}%" for t in mine)
                + " from the second-last to the last quarter of pre-training (per seed). Then pruning "
                f"phase {t0['phase_rows']:,} rows ({t0['phase_steps']} steps) and {t0['fixed_rows']:,} "
                f"rows with the mask fixed: {t0['fixed_rows'] // window} "
                f"fixed-mask windows of {window:,} samples (about {pos:.0f} positives each). "
                "Metric: mean over the fixed-mask windows of the paired CE increase."
            )
        else:
            what = (
                "Criteo Kaggle head (7,200 training rows replayed in order for epochs: the growth paper's "
                "multi-epoch regime; the head spans minutes, so there is no drift). Dense pre-training "
                f"{t0['pretrain_rows'] // 7200} epochs (batch {PLANS[dataset][4]}), pruning phase "
                f"{t0['phase_rows'] // 7200} epochs ({t0['phase_steps']} steps), {t0['fixed_rows'] // 7200} "
                "epochs with the mask fixed. Metric: CE increase on the 800 held-out dev+test rows (about "
                "180 positives) after training; look-ahead windows would re-score rows already learned."
            )
        parts += [f"## {dataset} ({len(seeds)} seeds: {seeds})", "", what, ""]
        table = []
        for e in (e for e in summary if e["dataset"] == dataset):
            for m, v in e["methods"].items():
                table.append([f"{e['target']:g}", m, f"{v['sparsity']['mean']:.4f}", fmt_ci(v[e["metric"]]),
                              fmt_ci(v["last"]) if dataset == "synthetic" else ""])  # fmt: skip
        parts += [
            "CE increase over dense in %, mean ± 95% CI over seeds:",
            "",
            markdown_table(["target", "method", "sparsity", "increase %", "last window %"], table),
            "",
            "Paired differences in % points (AUX - baseline; MoP - MP), 95% CI over seeds:",
            "",
        ]
        rows = []
        for e in (e for e in summary if e["dataset"] == dataset):
            for m, ci in e["vs"].items():
                rows.append([f"{e['target']:g}", f"AUX - {m}", fmt_ci(ci), verdict(ci), _lower(ci)])
            for m, ci in e["mop_vs_mp"].items():
                rows.append([f"{e['target']:g}", f"{m} - MP", fmt_ci(ci), verdict(ci), _lower(ci)])
        parts += [markdown_table(["target", "difference", "% points", "CI vs 0", "seeds < 0"], rows), ""]
        claims = [
            [f"{e['target']:g}", e["best"], _ratio(e["ratio"]), fmt_ci(e["claim"]), e["claim_verdict"]]
            for e in summary if e["dataset"] == dataset
        ]  # fmt: skip
        parts += [
            f"Claim: AUX's increase <= {PAPER_RATIO} x the best baseline's (per seed d = AUX - "
            f"{PAPER_RATIO} x best; met when the CI of d is below 0):",
            "",
            markdown_table(["target", "best baseline", "ratio of means", "d in % points", "claim"], claims),
            "",
        ]
        layers = [e for e in summary if e["dataset"] == dataset]
        names = list(layers[0]["aux_layers"])
        parts += [
            "Per-layer sparsity AUX learned (mean over seeds):",
            "",
            markdown_table(
                ["target", *names],
                [[f"{e['target']:g}", *(f"{e['aux_layers'][n]:.3f}" for n in names)] for e in layers],
            ),  # fmt: skip
            "",
            f"Figure: `{args.stem}_{dataset}.png`.",
            "",
        ]
    (args.out / f"{args.stem}.md").write_text("\n".join(parts))


def write_plots(tasks: list[dict], args: argparse.Namespace) -> None:
    for dataset in sorted({t["dataset"] for t in tasks}):
        mine = [t for t in tasks if t["dataset"] == dataset]
        fig, axes = plt.subplots(1, len(args.sparsities), figsize=(5 * len(args.sparsities), 3.8))
        for ax, target in zip(list(getattr(axes, "flat", [axes])), args.sparsities, strict=True):
            xs = [e / 1e3 for e in mine[0]["windows_end"]]
            for method in ["AUX", *BASELINES]:
                arms = [
                    (t, a) for t in mine for a in t["arms"] if a["method"] == method and a["target"] == target
                ]
                curves = [[c / d - 1 for c, d in zip(a["ce"], t["dense_ce"], strict=True)] for t, a in arms]
                mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(len(xs))]
                ax.plot(xs, mean, marker="o", label=method)
            ax.axvline(mine[0]["phase_rows"] / 1e3, color="grey", linestyle=":")
            ax.axhline(0, color="black", linewidth=0.5)
            ax.set_title(f"{dataset}, sparsity {target:g} (mean of {len(mine)} seeds)")
            ax.set_xlabel("thousand samples after the checkpoint")
            ax.set_ylabel(
                "look-ahead CE relative to dense (%)"
                if dataset == "synthetic"
                else "CE on replayed training rows, rel. to dense (%)"
            )
            ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / f"{args.stem}_{dataset}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    args = parse_args()
    path = args.out / f"{args.stem}.json"
    if args.replot:
        report = json.loads(path.read_text())
    else:
        jobs = [(d, s, args) for d in args.datasets for s in args.seeds]
        report = run_tasks(run_task, jobs, args.workers)
    report["summary"] = summarize(report["tasks"], args)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    write_plots(report["tasks"], args)
    write_markdown(report, args)
    print((args.out / f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()
