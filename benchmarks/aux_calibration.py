"""AUX lambda calibration on the reference DLRM (SPEC 4; D2S paper section 6.3, Figures 7 and 8).

A dense reference DLRM trains on the synthetic drifting stream. At several stretch starts (the dense
model trained up to each, as D2S would prune it) an AUX pruning phase runs for each lambda, and the
overall and per-layer sparsity it reaches are tabulated: how lambda sets the overall sparsity, how the
layers end up with different sparsities, and whether one lambda gives the same sparsity on different
stretches of the stream. A second table runs the phase at other lengths with the same latent step.

Writes docs/results/aux_calibration.{md,json} and aux_calibration_{depth,size}.png.

    .venv/bin/python benchmarks/aux_calibration.py            # ~5 min on 2 cores
    .venv/bin/python benchmarks/aux_calibration.py --pretrain-rows 409600 --prune-rows 51200
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pruning_common import (  # noqa: E402
    RESULTS,
    layer_label,
    layer_shapes,
    markdown_table,
    pretrain,
    reference_model,
    setup_process,
    synthetic_stream,
)
from tqdm import tqdm  # noqa: E402

from torchrec_prune.pruners.run import PruneConfig, TrainedState, prune_and_train  # noqa: E402
from torchrec_prune.train.trainer import TrainConfig  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-rows", type=int, default=102_400, help="dense training before stretch 1")
    p.add_argument("--stretches", type=int, default=3, help="stretches (start rows) to prune on")
    p.add_argument("--gap", type=int, default=51_200, help="rows between stretch starts (dense trains on)")
    p.add_argument("--prune-rows", type=int, default=25_600, help="rows of each AUX pruning phase")
    p.add_argument("--lams", type=_floats, default=_floats("0.5,0.75,1,1.25,1.5,1.75,1.875,2,2.5,3,4"))
    p.add_argument("--length-lams", type=_floats, default=_floats("1,1.75,2.5"), help="phase-length check")
    p.add_argument("--length-factors", type=_floats, default=_floats("0.5,2"), help="x --prune-rows")
    p.add_argument("--eps", type=float, default=0.1, help="AUX latent step (eps x phase steps >> a0 = 1)")
    p.add_argument("--drift-per-100k", type=float, default=0.25, help="rotations of the click model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--window", type=int, default=5_120)
    p.add_argument("--increment-rows", type=int, default=25_600)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replot", action="store_true", help="rewrite the .md and plots from the .json in --out")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.replot:
        report = json.loads((args.out / "aux_calibration.json").read_text())
        settings = argparse.Namespace(**{**report["settings"], "out": args.out})
        write_markdown(report, settings, args.out / "aux_calibration.md")
        write_plots(report, settings, args.out)
        return
    setup_process()
    starts = [args.pretrain_rows + i * args.gap for i in range(args.stretches)]
    longest = max([1.0, *args.length_factors]) * args.prune_rows
    rows = max(starts[-1] + args.prune_rows, int(starts[0] + longest))
    stream = synthetic_stream(rows, args.drift_per_100k, args.seed)
    train = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        window=args.window,
        increment_rows=args.increment_rows,
        progress=False,
    )
    steps = stream.num_batches(args.batch_size, start_row=starts[0], num_rows=args.prune_rows)
    print(
        f"synthetic stream {rows} rows (drift {args.drift_per_100k} / 100k rows, seed {args.seed}); "
        f"dense pre-training {args.pretrain_rows} rows; stretches at {starts}; AUX phase {args.prune_rows} "
        f"rows = {steps} steps of {args.batch_size}, eps {args.eps} (eps x steps = {args.eps * steps:g})"
    )
    started = time.perf_counter()

    # The dense model trains on; each stretch prunes a snapshot of it taken at the stretch start.
    model, state, ne = pretrain(stream, args.pretrain_rows, train, args.seed)
    snapshots, dense_ne = [state], [ne]
    for start in starts[1:]:
        optimizer = state.restore(model, train)
        result = prune_and_train(
            model, stream, train, None, start_row=start - args.gap, stop_row=start, optimizers=[optimizer]
        )
        state = TrainedState.capture(model, optimizer)
        snapshots.append(state)
        dense_ne.append(result.records[-1].ne)

    def phase(snapshot: TrainedState, start: int, lam: float, prune_rows: int) -> dict:
        pruned = reference_model(stream, args.seed)
        optimizer = snapshot.restore(pruned, train)
        config = PruneConfig("aux", lam=lam, eps=args.eps, prune_rows=prune_rows)
        result = prune_and_train(
            pruned,
            stream,
            train,
            config,
            start_row=start,
            stop_row=start + prune_rows,
            optimizers=[optimizer],
        )
        return {
            "start_row": start,
            "lam": lam,
            "prune_rows": prune_rows,
            "steps": result.phase_steps,
            "sparsity": result.sparsity,
            "layers": {layer_label(f): s.sparsity for f, s in result.stats.items()},
            "weights": {layer_label(f): s.total for f, s in result.stats.items()},
            "fqns": {layer_label(f): f for f in result.stats},
        }

    jobs = [(i, lam, args.prune_rows) for i in range(len(starts)) for lam in args.lams]
    jobs += [(0, lam, int(f * args.prune_rows)) for lam in args.length_lams for f in args.length_factors]
    runs = []
    for i, lam, prune_rows in tqdm(jobs, desc="AUX phases", unit="phase"):
        runs.append({"stretch": i, **phase(snapshots[i], starts[i], lam, prune_rows)})
    first = runs[0]
    shapes = layer_shapes(model, list(first["fqns"].values()))
    layers = {
        label: {"fqn": f, "shape": shapes[f], "weights": first["weights"][label]}
        for label, f in first["fqns"].items()
    }
    report = {
        "argv": " ".join(sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "stream_rows": rows,
        "stretch_starts": starts,
        "phase_steps": steps,
        "dense_ne_at_stretch_start": dense_ne,
        "train": asdict(train),
        "layers": layers,
        "runs": [{k: v for k, v in r.items() if k not in ("weights", "fqns")} for r in runs],
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aux_calibration.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, args, args.out / "aux_calibration.md")
    write_plots(report, args, args.out)
    print((args.out / "aux_calibration.md").read_text())


def _main_runs(report: dict, args: argparse.Namespace) -> dict[float, list[dict]]:
    by_lam: dict[float, list[dict]] = {}
    for r in report["runs"]:
        if r["prune_rows"] == args.prune_rows:
            by_lam.setdefault(r["lam"], []).append(r)
    return by_lam


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def write_markdown(report: dict, args: argparse.Namespace, path: Path) -> None:
    by_lam = _main_runs(report, args)
    layers = report["layers"]
    starts = report["stretch_starts"]
    overall_rows = []
    spreads = []
    for lam, runs in by_lam.items():
        values = [r["sparsity"] for r in sorted(runs, key=lambda r: r["stretch"])]
        spreads.append(max(values) - min(values))
        overall_rows.append([f"{lam:g}", *(f"{v:.3f}" for v in values), _mean_std(values)])
    layer_rows = []
    widest = []
    correlations = {}
    for lam, runs in by_lam.items():
        means = {name: statistics.mean(r["layers"][name] for r in runs) for name in layers}
        widest.append(max(means.values()) - min(means.values()))
        sizes = [layers[n]["weights"] for n in layers]
        correlations[lam] = size_rank_correlation(sizes, [means[n] for n in layers])
        layer_rows.append([f"{lam:g}", *(f"{means[name]:.3f}" for name in layers)])
    length_rows = []
    for lam in args.length_lams:
        base = next(r for r in by_lam.get(lam, []) if r["stretch"] == 0) if lam in by_lam else None
        others = [r for r in report["runs"] if r["lam"] == lam and r["prune_rows"] != args.prune_rows]
        for r in sorted([*([base] if base else []), *others], key=lambda r: r["prune_rows"]):
            length_rows.append(
                [
                    f"{lam:g}",
                    r["prune_rows"],
                    r["steps"],
                    f"{args.eps * r['steps']:g}",
                    f"{r['sparsity']:.3f}",
                ]
            )
    dense_ne = ", ".join(f"{v:.3f}" for v in report["dense_ne_at_stretch_start"])
    command = f"python benchmarks/aux_calibration.py {report.get('argv', '')}".strip()
    rho = ", ".join(f"{lam:g}: {c:+.2f}" for lam, c in correlations.items())
    overall = markdown_table(
        ["lambda", *(f"stretch {i + 1} (row {s})" for i, s in enumerate(starts)), "mean ± std"], overall_rows
    )
    per_layer = markdown_table(
        ["lambda", *(f"{n} ({v['shape']}, {v['weights']} w)" for n, v in layers.items())], layer_rows
    )
    text = f"""# AUX lambda calibration (reference DLRM, synthetic drifting stream)

Produced by `{command}` ({report["wall_seconds"] / 60:.1f} min on this machine). Raw numbers:
`aux_calibration.json`.

**Setup.** Reference DLRM (`DLRMConfig` defaults: embedding dim 4, bottom MLP 256-128-64-4, top MLP
256-128-1), Adagrad lr {args.lr}, batch {args.batch_size}. Synthetic stream of {report["stream_rows"]} rows,
drift {args.drift_per_100k} rotations of the click model per 100k rows, seed {args.seed}. The dense model
trains on rows 0..{starts[0]} ({args.pretrain_rows} rows) and on through the stream; at each stretch start
({", ".join(str(s) for s in starts)}) a copy of it (weights and Adagrad state) runs one AUX pruning phase of
{args.prune_rows} rows = {report["phase_steps"]} steps, eps {args.eps} (eps x steps =
{args.eps * report["phase_steps"]:g}), w1 = w2 = 0.5, a0 = 1, every Linear but the output layer pruned.
Look-ahead NE of the dense model at the stretch starts: {dense_ne}.

Sparsity is the fraction of pruned weights over the pruned Linears (the mask `a > 0` frozen at the end of
the phase).

## Overall sparsity per lambda, on each stretch

{overall}

Largest difference between stretches for one lambda: {max(spreads):.3f} (mean {statistics.mean(spreads):.3f}).

## Per-layer sparsity (mean over stretches), D2S Figures 7-8

{per_layer}

Layers reach different sparsities under one lambda: the widest gap between the sparsest and the densest
layer is {max(widest):.3f} (lambda {list(by_lam)[widest.index(max(widest))]:g}). Spearman rank correlation
between a layer's size and its sparsity, per lambda: {rho} (negative: smaller layers are pruned harder, as in
the paper's Figure 7). Plots:
`aux_calibration_depth.png` (sparsity against layer depth, Figure 8) and `aux_calibration_size.png`
(sparsity against layer size relative to the smallest layer, Figure 7).

## Phase length (stretch 1, same eps)

{markdown_table(["lambda", "phase rows", "steps", "eps x steps", "sparsity"], length_rows)}

A weight is pruned when its mean rescaled importance over the phase stays below about
`lambda - a0 / (eps x steps)`, so with a fixed eps a shorter phase prunes less; once eps x steps is well
above a0 = 1, lambda alone sets the sparsity.
"""
    path.write_text(text)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2  # ties share their mean rank
        i = j + 1
    return ranks


def size_rank_correlation(sizes: list[float], sparsities: list[float]) -> float:
    """Spearman rank correlation between layer size and sparsity (negative: smaller layers sparser); NaN
    when every layer has the same sparsity."""
    if len(set(sparsities)) < 2:
        return math.nan
    return statistics.correlation(_ranks(sizes), _ranks(sparsities))


def write_plots(report: dict, args: argparse.Namespace, out: Path) -> None:
    by_lam = _main_runs(report, args)
    layers = report["layers"]
    names = list(layers)
    chosen = [lam for lam in by_lam if lam in (1.0, 1.75, 2.5)] or list(by_lam)[:3]
    smallest = min(v["weights"] for v in layers.values())
    fig_depth, ax_depth = plt.subplots(figsize=(7, 4))
    fig_size, ax_size = plt.subplots(figsize=(7, 4))
    for lam in chosen:
        means = [statistics.mean(r["layers"][n] for r in by_lam[lam]) for n in names]
        ax_depth.plot(range(len(names)), means, marker="o", label=f"lambda {lam:g}")
        ax_size.scatter([layers[n]["weights"] / smallest for n in names], means, label=f"lambda {lam:g}")
    first = [statistics.mean(r["layers"][n] for r in by_lam[chosen[0]]) for n in names]
    for n, y in zip(names, first, strict=True):
        x = layers[n]["weights"] / smallest
        ax_size.annotate(n, (x, y), xytext=(6, -3), textcoords="offset points", fontsize=8)
    ax_depth.set_xticks(range(len(names)), [f"{n}\n{layers[n]['shape']}" for n in names])
    ax_depth.set_xlabel("layer (bottom MLP, then top MLP)")
    ax_size.set_xscale("log")
    ax_size.set_xlabel("layer weights relative to the smallest pruned layer (log)")
    for ax, fig, name, title in (
        (ax_depth, fig_depth, "depth", "AUX: layer-wise sparsity vs depth (cf. D2S Figure 8)"),
        (ax_size, fig_size, "size", "AUX: layer-wise sparsity vs layer size (cf. D2S Figure 7)"),
    ):
        ax.set_ylabel("sparsity after the AUX phase")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"aux_calibration_{name}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
