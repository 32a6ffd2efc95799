"""UMEC against magnitude and Taylor neuron pruning at the same compression ratio (UMEC paper Fig. 2),
the budget sweep, and the learned allocation per layer over the UMEC phase (paper Fig. 6).

Protocol, per dataset and seed: a DLRM trains densely on the first ``pretrain`` rows; from there each
method runs a phase of ``phase`` rows (UMEC: minimax under the budget, then removal; magnitude / Taylor:
neuron importance gathered over the phase, then the same fraction ``beta`` of neurons of every hidden
layer pruned at its end), and the compressed model fine-tunes with fixed masks to the end of the stream.
The score is the look-ahead CE over the fine-tuning rows (every batch scored before it is learned),
next to the dense model trained on the same rows. Compression ratio CR = 1 - FLOPs(exported) /
FLOPs(dense), counted on the exported plain model. The baselines' beta is the smallest (on a 0.005
grid) whose CR reaches UMEC's, so they compress at least as much.

Writes ``docs/results/umec.{md,json}``, ``umec_cr_ce.png``, ``umec_budget.png``, ``umec_allocation.png``.

Usage: python benchmarks/umec_compress.py [--seeds 0 1 2] [--budgets 0.1 0.3 0.5 0.7 0.9]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from pruning_common import RESULTS, markdown_table, setup_process  # noqa: E402
from torch import nn  # noqa: E402
from umec_common import write_page  # noqa: E402

import torchrec_prune as tp  # noqa: E402
from torchrec_prune.data import open_stream  # noqa: E402
from torchrec_prune.data.stream import Stream  # noqa: E402
from torchrec_prune.importance import NeuronTaylor  # noqa: E402
from torchrec_prune.models import DLRMConfig, build_dlrm  # noqa: E402
from torchrec_prune.pruners import neuron_successors, prune_neurons  # noqa: E402
from torchrec_prune.pruners.run import TrainedState, stretch_increments  # noqa: E402
from torchrec_prune.pruners.umec import UMECConfig, UMECPruner  # noqa: E402
from torchrec_prune.train.flops import fc_flops  # noqa: E402
from torchrec_prune.train.hooks import BaseHook, StepContext  # noqa: E402
from torchrec_prune.train.job import model_config_for  # noqa: E402
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, make_optimizer  # noqa: E402

CRITEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "kaggle_head_train.tsv"
MODEL = DLRMConfig(embedding_dim=8, dense_arch=[64, 32, 8], over_arch=[128, 64, 1], num_embeddings=2000)
DATASETS = {  # rows: pretrain, phase, fine-tune
    "synthetic": dict(rows=(10_000, 15_000, 10_000), window=1000, batch=64),
    "criteo": dict(rows=(3_600, 1_800, 1_800), window=600, batch=32),
}
METHODS = ("umec", "magnitude", "taylor")


def make_stream(name: str, seed: int) -> Stream:
    rows = sum(DATASETS[name]["rows"])
    if name == "synthetic":
        return open_stream(
            "synthetic", num_rows=rows, drift=0.4, seed=seed, num_embeddings=MODEL.num_embeddings
        )
    return open_stream(f"criteo:{CRITEO}", num_embeddings=MODEL.num_embeddings, max_rows=rows)


class NeuronBaseline(BaseHook):
    """Gather neuron importance over ``steps`` steps, then prune ``beta`` of every hidden layer once."""

    def __init__(self, model: nn.Module, beta: float, steps: int, kind: str) -> None:
        modules = dict(model.named_modules())
        self.model, self.beta, self.steps, self.kind = model, beta, steps, kind
        self.layers = {fqn: modules[fqn] for fqn in neuron_successors(model)}
        self.scorer = NeuronTaylor()
        self.seen = 0

    def before_step(self, ctx: StepContext) -> None:
        if self.seen < self.steps and self.kind == "taylor":
            self.scorer.observe(self.layers)

    def after_step(self, ctx: StepContext) -> None:
        self.seen += 1
        if self.seen != self.steps:
            return
        if self.kind == "taylor":
            importances = self.scorer.scores(self.layers)
        else:
            importances = {f: m.weight.detach().norm(dim=1) for f, m in self.layers.items()}
        prune_neurons(self.model, self.beta, importances, ctx.optimizers)


def cr_of_beta(template: nn.Module, beta: float) -> float:
    model = copy.deepcopy(template)
    prune_neurons(
        model, beta, {f: torch.rand(model.get_submodule(f).out_features) for f in neuron_successors(model)}
    )
    flops = fc_flops(model)
    return 1.0 - flops.forward / flops.dense_forward


def beta_for(template: nn.Module, cr: float) -> float | None:
    """Smallest beta on a 0.005 grid whose uniform neuron pruning reaches compression ``cr``."""
    for i in range(1, 200):
        beta = i * 0.005
        if cr_of_beta(template, beta) >= cr - 1e-9:
            return beta
    return None


def finetune_ce(records, offset: int) -> float:
    """Mean look-ahead CE of the windows that lie in the fine-tuning rows (after ``offset`` samples)."""
    inside = [r for r in records if r.samples_end - r.n >= offset]
    return sum(r.ce * r.n for r in inside) / sum(r.n for r in inside)


def run_method(
    stream: Stream, state: TrainedState, dataset: str, method: str, knob: float | None
) -> dict[str, object]:
    """One method from the pretrained state; returns CR, fine-tuning CE, allocation and timings."""
    spec = DATASETS[dataset]
    pretrain, phase, _ = spec["rows"]
    train = TrainConfig(
        batch_size=spec["batch"], window=spec["window"], increment_rows=spec["window"], progress=False
    )
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(model_config_for(stream, MODEL)))
    optimizer = state.restore(model, train)
    dense_flops = fc_flops(model).dense_forward
    steps = stream.num_batches(train.batch_size, start_row=pretrain, num_rows=phase)
    hook: BaseHook | None = None
    if method == "umec":
        # s may cross each layer about four times over the phase, however short the phase is
        umec = UMECConfig(
            budget=knob, phase_steps=steps, eta2=max(0.01, 4 / steps), eta4=100.0, record_every=5
        )
        hook = UMECPruner(model, umec)
    elif method in ("magnitude", "taylor"):
        hook = NeuronBaseline(model, knob, steps, method)
    trainer = IncrementalTrainer(model, train, optimizers=[optimizer], hooks=[hook] if hook else [])
    started = time.perf_counter()
    for increment in stretch_increments(
        stream, pretrain, stream.num_rows, train.increment_rows, train.batch_size
    ):
        trainer.train_increment(increment)
    seconds = time.perf_counter() - started
    exported = tp.export(model)[0] if method != "dense" else model
    out = {
        "method": method,
        "knob": knob,
        "cr": 1.0 - fc_flops(exported).forward / dense_flops,
        "ce": finetune_ce(trainer.result.records, phase),
        "seconds": seconds,
    }
    if isinstance(hook, UMECPruner):
        out["allocation"] = {name: list(v) for name, v in hook.allocation().items()}
        out["history"] = hook.history
    return out


def pretrained(stream: Stream, dataset: str, seed: int) -> TrainedState:
    spec = DATASETS[dataset]
    train = TrainConfig(
        batch_size=spec["batch"], window=spec["window"], increment_rows=spec["window"], progress=False
    )
    torch.manual_seed(seed)
    model = tp.wrap(build_dlrm(model_config_for(stream, MODEL)))
    optimizer = make_optimizer(model.parameters(), train)
    trainer = IncrementalTrainer(model, train, optimizers=[optimizer])
    for increment in stretch_increments(stream, 0, spec["rows"][0], train.increment_rows, train.batch_size):
        trainer.train_increment(increment)
    return TrainedState.capture(model, optimizer)


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std and the 95% t-interval half-width over seeds."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(n, 1.96)
    return {"mean": mean, "std": std, "ci95": t95 * std / math.sqrt(n) if n > 1 else 0.0, "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--compare-budgets", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()
    setup_process()
    started = time.perf_counter()
    runs: list[dict[str, object]] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            stream = make_stream(dataset, seed)
            state = pretrained(stream, dataset, seed)
            template = tp.wrap(build_dlrm(model_config_for(stream, MODEL)))
            runs.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "budget": None,
                    **run_method(stream, state, dataset, "dense", None),
                }
            )
            for budget in args.budgets:
                umec = run_method(stream, state, dataset, "umec", budget)
                runs.append({"dataset": dataset, "seed": seed, "budget": budget, **umec})
                if budget not in args.compare_budgets:
                    continue
                beta = beta_for(template, umec["cr"])
                for method in ("magnitude", "taylor"):
                    if beta is None:
                        runs.append(
                            {"dataset": dataset, "seed": seed, "budget": budget, "method": method, "cr": None}
                        )
                        continue
                    runs.append(
                        {
                            "dataset": dataset,
                            "seed": seed,
                            "budget": budget,
                            **run_method(stream, state, dataset, method, beta),
                        }
                    )
                print(
                    dataset,
                    seed,
                    budget,
                    [(r["method"], r.get("cr"), r.get("ce")) for r in runs[-3:]],
                    flush=True,
                )
    write(runs, args, time.perf_counter() - started)


def write(runs: list[dict[str, object]], args: argparse.Namespace, seconds: float) -> None:
    summary: dict[str, object] = {}
    rows = []
    for dataset in args.datasets:
        dense = spread([r["ce"] for r in runs if r["dataset"] == dataset and r["method"] == "dense"])
        summary[f"{dataset}/dense"] = {"ce": dense}
        for budget in args.budgets:
            for method in METHODS:
                sel = [
                    r
                    for r in runs
                    if r["dataset"] == dataset and r["budget"] == budget and r["method"] == method
                ]
                done = [r for r in sel if r.get("cr") is not None]
                if not sel:
                    continue
                if not done:
                    rows.append([dataset, budget, method, "unreachable", "", "", ""])
                    continue
                cr, ce = spread([r["cr"] for r in done]), spread([r["ce"] for r in done])
                rel = spread([relative_ce(runs, r) for r in done])
                summary[f"{dataset}/{budget}/{method}"] = {"cr": cr, "ce": ce, "relative_ce": rel}
                rows.append(
                    [
                        dataset,
                        budget,
                        method,
                        f"{cr['mean']:.3f}",
                        f"{ce['mean']:.4f} ± {ce['std']:.4f}",
                        f"{100 * rel['mean']:+.2f}% ± {100 * rel['ci95']:.2f}",
                        f"{len(done)}",
                    ]
                )
    budget_rows = []
    for dataset in args.datasets:
        for budget in args.budgets:
            fr = [
                1 - r["cr"]
                for r in runs
                if r["dataset"] == dataset and r["budget"] == budget and r["method"] == "umec"
            ]
            budget_rows.append([dataset, budget, f"{max(fr):.4f}", "yes" if max(fr) <= budget else "NO"])
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} intra-op thread, 2-core host shared with other jobs"
    meta = {
        "seeds": args.seeds,
        "budgets": args.budgets,
        "model": MODEL.__dict__,
        "datasets": DATASETS,
        "machine": machine,
        "torch": torch.__version__,
        "seconds": seconds,
    }
    (RESULTS / "umec.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1, default=str)
    )
    plot_cr_ce(runs, args)
    plot_budget(runs, args)
    plot_allocation(runs)
    md = [
        "# UMEC: FLOPs budget, CR vs CE against neuron pruning, learned allocation",
        "",
        f"Produced by `benchmarks/umec_compress.py` (seeds {args.seeds}, {seconds / 60:.1f} min on",
        f"{machine}).",
        "DLRM: embedding dim 8, bottom MLP 64-32-8, top MLP 128-64-1, 2000 rows per table. Per seed:",
        "dense pre-training, then a compression phase, then fine-tuning with fixed masks; CE is the",
        "look-ahead CE over the fine-tuning rows (batch 64 synthetic, 32 Criteo). Synthetic stream:",
        "10k/15k/10k rows, drift 0.4 per 100k rows. Criteo Kaggle head (`../shared/data`): 3.6k/1.8k/1.8k",
        "rows. CR counted on the exported plain model. Magnitude and Taylor prune the same fraction of",
        "neurons in every hidden layer (the smallest beta whose CR reaches UMEC's), at budgets",
        f"{args.compare_budgets}; UMEC also removes features and the common embedding dimension. UMEC's",
        "eta2 is max(0.01, 4 / phase steps). The synthetic stream's seed is also the seed of its click",
        "model, so absolute CE differs between seeds; compare relative CE.",
        "",
        "## Budget sweep: exported FLOPs / dense FLOPs (worst seed)",
        "",
        markdown_table(["data", "budget", "max exported fraction", "within budget"], budget_rows),
        "",
        "## CR vs look-ahead CE (mean ± std over seeds; relative CE vs dense on the same rows, ± 95% CI)",
        "",
        markdown_table(["data", "budget", "method", "CR", "CE", "relative CE", "seeds"], rows),
        "",
        "![CR vs CE](umec_cr_ce.png)",
        "",
        "![budget](umec_budget.png)",
        "",
        f"## Learned allocation over the UMEC phase (budget 0.5, seed {args.seeds[0]})",
        "",
        "![allocation](umec_allocation.png)",
        "",
    ]
    write_page(RESULTS / "umec.md", md)


def relative_ce(runs, run) -> float:
    """CE of ``run`` over the dense model's on the same dataset and seed, minus 1."""
    dense = next(
        d
        for d in runs
        if d["dataset"] == run["dataset"] and d["seed"] == run["seed"] and d["method"] == "dense"
    )
    return run["ce"] / dense["ce"] - 1


def plot_cr_ce(runs, args) -> None:
    """Relative look-ahead CE (mean and 95% CI over seeds) against CR, per dataset (paper Fig. 2)."""
    fig, axes = plt.subplots(1, len(args.datasets), figsize=(5.5 * len(args.datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], args.datasets, strict=True):
        ax.axhline(0.0, color="m", ls=":", label="dense")
        for method in METHODS:
            xs, ys, es = [], [], []
            for budget in args.budgets:
                done = [
                    r
                    for r in runs
                    if r["dataset"] == dataset
                    and r["budget"] == budget
                    and r["method"] == method
                    and r.get("cr") is not None
                ]
                if done:
                    xs.append(statistics.fmean(r["cr"] for r in done))
                    rel = spread([100 * relative_ce(runs, r) for r in done])
                    ys.append(rel["mean"])
                    es.append(rel["ci95"])
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xlabel("compression ratio (FC FLOPs)")
        ax.set_ylabel("look-ahead CE vs dense (%), 95% CI")
        ax.set_title(dataset)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "umec_cr_ce.png", dpi=110)
    plt.close(fig)


def plot_budget(runs, args) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for dataset in args.datasets:
        pts = [(r["budget"], 1 - r["cr"]) for r in runs if r["dataset"] == dataset and r["method"] == "umec"]
        ax.scatter(*zip(*pts, strict=True), label=dataset, alpha=0.7)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="budget")
    ax.set_xlabel("budget (fraction of dense FLOPs)")
    ax.set_ylabel("exported model FLOPs / dense")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "umec_budget.png", dpi=110)
    plt.close(fig)


def plot_allocation(runs) -> None:
    run = next((r for r in runs if r["method"] == "umec" and r["budget"] == 0.5), None)
    if run is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    history: list[dict] = run["history"]
    sizes = {name: n for name, (_, n) in run["allocation"].items()}
    for name in sizes:
        steps = [h["step"] for h in history]
        ax.plot(
            steps, [100 * h["removed"][name] / sizes[name] for h in history], label=_label(name, sizes[name])
        )
    flops = ax.twinx()
    flops.plot([h["step"] for h in history], [h["flops"] for h in history], "k:", label="R: FLOPs / dense")
    flops.set_ylabel("R(ceil(s)): FC FLOPs / dense (dotted)")
    flops.set_ylim(0, 1.05)
    ax.set_xlabel("UMEC step")
    ax.set_ylabel("groups removed (% of layer)")
    ax.set_title(f"{run['dataset']}, budget 0.5 (last point: after removal)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "umec_allocation.png", dpi=110)
    plt.close(fig)


def _label(name: str, size: int) -> str:
    kind, _, fqn = name.partition(":")
    if kind != "neurons":
        return f"{kind} ({size})"
    parts = fqn.split(".")
    arch = "bottom" if "dense_arch" in parts else "top"
    return f"{arch}{parts[parts.index('_mlp') + 1]} neurons ({size})"


if __name__ == "__main__":
    main()
