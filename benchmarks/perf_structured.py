"""How much of the FLOPs saving of neuron pruning turns into time, on the reference DLRM's two MLPs.

For each batch size and beta (fraction of every hidden layer's neurons pruned; output layers kept) four
arms train the bottom MLP (13-256-128-64-4) and the top MLP (355-256-128-1) side by side, interleaved:
- ``dense``: ``MaskedLinear`` layers with every mask open (the baseline);
- ``masked``: the same with the neurons closed by ``prune_`` (gather/scatter forward, the fallback);
- ``compacted``: the masked layers after ``compact_`` (what a sparse phase of grow/prune trains);
- ``plain_kept``: plain ``nn.Linear`` layers of the kept sizes (the limit a compacted phase can reach).
A step is forward, backward and a (fused) Adagrad step. ``realized = time saving / FLOPs saving``.

Writes docs/results/perf_structured.json and docs/results/perf_structured.png. ``--profile`` prints
instead, for the first batch size and beta given, each operator's thread CPU time per step in the dense
and the compacted arm side by side: which costs shrink with the layers and which do not.

    .venv/bin/python benchmarks/perf_structured.py [--rounds 5] [--betas 0.3 0.5 0.7 0.9]
    .venv/bin/python benchmarks/perf_structured.py --profile --batches 128 --betas 0.7
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from perf_common import OUT, interleave, write_results
from torch import nn

from torchrec_prune.masks import MaskedLinear, prune_
from torchrec_prune.masks.compact import compact_
from torchrec_prune.train.flops import fc_flops

BOTTOM = [13, 256, 128, 64, 4]
TOP = [355, 256, 128, 1]


def mlp(sizes: list[int], layer: type[nn.Linear]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        mods.append(layer(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def kept(sizes: list[int], beta: float) -> list[int]:
    """Layer sizes with a fraction ``beta`` of every hidden layer removed (at least one neuron kept)."""
    return [sizes[0], *(max(1, round(n * (1 - beta))) for n in sizes[1:-1]), sizes[-1]]


@torch.no_grad()
def prune_neurons(model: nn.Sequential, sizes: list[int], beta: float) -> None:
    linears = [m for m in model if isinstance(m, MaskedLinear)]
    for layer, nxt, n in zip(linears, linears[1:], kept(sizes, beta)[1:-1], strict=False):
        keep = torch.zeros(layer.out_features, dtype=torch.bool)
        keep[:n] = True
        prune_(layer, neuron_mask=keep)
        prune_(nxt, input_mask=keep)


def step_fn(models: list[nn.Sequential], batch: int, steps: int) -> Callable[[], None]:
    params = [p for m in models for p in m.parameters()]
    optimizer = torch.optim.Adagrad(params, lr=0.01, fused=True)  # as the jobs' DMP replicas
    xs = [torch.randn(batch, m[0].in_features) for m in models]

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = sum(m(x).square().mean() for m, x in zip(models, xs, strict=True))
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()

    return run


def arms(batch: int, beta: float, steps: int) -> tuple[dict[str, Callable[[], None]], float]:
    """The four arms' rounds of ``steps`` steps, and the FLOPs saving of the pruned ones."""
    torch.manual_seed(0)
    dense = [mlp(BOTTOM, MaskedLinear), mlp(TOP, MaskedLinear)]
    masked = [mlp(BOTTOM, MaskedLinear), mlp(TOP, MaskedLinear)]
    for model, sizes in zip(masked, (BOTTOM, TOP), strict=True):
        prune_neurons(model, sizes, beta)
    compacted = [mlp(BOTTOM, MaskedLinear), mlp(TOP, MaskedLinear)]
    for model, sizes in zip(compacted, (BOTTOM, TOP), strict=True):
        prune_neurons(model, sizes, beta)
        compact_(model)  # before its optimizer exists: the optimizer state starts at the kept sizes
    plain = [mlp(kept(BOTTOM, beta), nn.Linear), mlp(kept(TOP, beta), nn.Linear)]
    flops_dense = sum(fc_flops(m).training for m in dense)
    flops_saving = 1 - sum(fc_flops(m).training for m in masked) / flops_dense
    rounds = {
        "dense": step_fn(dense, batch, steps),
        "masked": step_fn(masked, batch, steps),
        "compacted": step_fn(compacted, batch, steps),
        "plain_kept": step_fn(plain, batch, steps),
    }
    return rounds, flops_saving


def measure(batch: int, beta: float, rounds: int) -> dict[str, float]:
    arm_rounds, flops_saving = arms(batch, beta, max(2, 8192 // batch))
    timings = interleave(arm_rounds, rounds)
    out: dict[str, float] = {"batch": batch, "beta": beta, "flops_saving": flops_saving}
    for arm in ("masked", "compacted", "plain_kept"):
        per_round = [1 - a / d for a, d in zip(timings[arm].cpu, timings["dense"].cpu, strict=True)]
        saving = statistics.median(per_round)
        out[f"{arm}_time_saving"] = saving
        out[f"{arm}_time_saving_min"] = min(per_round)
        out[f"{arm}_time_saving_max"] = max(per_round)
        out[f"{arm}_realized"] = saving / flops_saving
    return out


def profile(batch: int, beta: float, steps: int = 200) -> None:
    """Thread CPU time per step of every operator (self time) in the dense and compacted arms."""
    arm_rounds, flops_saving = arms(batch, beta, steps)
    per_op: dict[str, dict[str, float]] = {}
    totals = {}
    for name in ("dense", "compacted"):
        arm_rounds[name]()  # warm-up
        with torch.profiler.profile() as prof:
            arm_rounds[name]()
        for event in prof.key_averages():
            per_op.setdefault(event.key, {})[name] = event.self_cpu_time_total / steps
        totals[name] = sum(v.get(name, 0.0) for v in per_op.values())
    print(f"batch {batch}, beta {beta}: FLOPs saving {flops_saving:.3f}; us per step (self CPU time)")
    print(f"{'operator':45s} {'dense':>9s} {'compacted':>9s} {'saved':>9s}")
    for key, t in sorted(per_op.items(), key=lambda kv: -kv[1].get("dense", 0.0))[:25]:
        dense, compact = t.get("dense", 0.0), t.get("compacted", 0.0)
        print(f"{key[:45]:45s} {dense:9.1f} {compact:9.1f} {dense - compact:9.1f}")
    saving = 1 - totals["compacted"] / totals["dense"]
    print(f"{'total':45s} {totals['dense']:9.1f} {totals['compacted']:9.1f}  time saving {saving:.3f}")


def plot(rows: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, batch in zip(axes, sorted({r["batch"] for r in rows}), strict=False):
        mine = [r for r in rows if r["batch"] == batch]
        betas = [r["beta"] for r in mine]
        for arm, label in (
            ("masked", "masked (gather/scatter)"),
            ("compacted", "compacted (grow/prune's sparse phases)"),
            ("plain_kept", "plain layers, kept sizes"),
        ):
            ax.plot(betas, [r[f"{arm}_realized"] for r in mine], marker="o", label=label)
        ax.axhline(0.7, color="grey", linestyle="--", label="target 0.7")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_title(f"batch {int(batch)}")
        ax.set_xlabel("beta (fraction of hidden neurons pruned)")
    axes[0].set_ylabel("time saving / FLOPs saving")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "perf_structured.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--profile", action="store_true", help="print per-operator times instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        profile(args.batches[0], args.betas[0])
        return
    rows = []
    for batch in args.batches:
        for beta in args.betas:
            row = measure(batch, beta, args.rounds)
            rows.append(row)
            print(
                f"batch {batch} beta {beta}: FLOPs saving {row['flops_saving']:.3f}, realized masked "
                f"{row['masked_realized']:.2f}, compacted {row['compacted_realized']:.2f}, "
                f"plain kept {row['plain_kept_realized']:.2f}"
            )
    path = write_results("perf_structured", {"args": vars(args), "rows": rows})
    plot(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
