"""Why MoP lags MP: mask churn during the pruning ramp, from the powered protocol's dense checkpoint.

MP's ramp only ever closes weights (a closed weight is zero, so it never outranks an open one). MoP
(``TopK(regrow=True)``) re-ranks every weight at every mask update on ``w1 |theta| / mean|theta| + w2 |s|
/ mean|s|``: a weight it closes is zeroed, and one it re-opens comes back at zero with fresh optimizer
state (under Adagrad its first steps move it by about the learning rate). This script counts, per
method and target, how many weights each ramp closed and re-opened, how many of the weights kept at the
end came back that way, and how far each final mask is from MP's (Jaccard overlap of the kept sets).

Writes docs/results/fidelity_mop_churn.{md,json}.

    .venv/bin/python benchmarks/fidelity_mop_churn.py      # ~2 min of CPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from fidelity_common import StreamSpec, dense_checkpoint
from pruning_common import RESULTS, markdown_table, setup_process

from torchrec_prune.pruners.run import PruneConfig, make_pruner, stretch_increments
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

PRETRAIN = 819_200
ARMS = {"MP": ("mp", 0.5, 0.5), "MoP(.5,.5)": ("mop", 0.5, 0.5), "MoP(.8,.2)": ("mop", 0.8, 0.2)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase-rows", type=int, default=51_200)
    p.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.8, 0.95])
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def ramp(args: argparse.Namespace, method: str, w1: float, w2: float, target: float) -> dict:
    """One pruning ramp from the checkpoint; counts of closed and re-opened weights and the final masks."""
    train = TrainConfig(batch_size=512, lr=0.05, window=51_200, increment_rows=51_200, progress=False)
    spec = StreamSpec("synthetic", args.seed, PRETRAIN, PRETRAIN + args.phase_rows, 0.5)
    ckpt = dense_checkpoint(spec, train)
    model, optimizer = ckpt.load(train)
    stream = spec.stream()
    steps = stream.num_batches(train.batch_size, start_row=PRETRAIN, num_rows=args.phase_rows)
    pruner = make_pruner(model, PruneConfig(method, sparsity=target, w1=w1, w2=w2), steps)
    counts = {"closed": 0, "reopened": 0}
    reopened = {f: torch.zeros_like(layer.weight_mask) for f, layer in pruner.linears.items()}
    update = pruner.update_masks

    def counted(progress: float, optimizers: object = ()) -> None:
        before = {f: layer.weight_mask.clone() for f, layer in pruner.linears.items()}
        update(progress, optimizers)
        for f, layer in pruner.linears.items():
            counts["closed"] += int((before[f] & ~layer.weight_mask).sum())
            back = ~before[f] & layer.weight_mask
            counts["reopened"] += int(back.sum())
            reopened[f] |= back

    pruner.update_masks = counted
    trainer = IncrementalTrainer(model, train, optimizers=[optimizer], hooks=[pruner])
    for increment in stretch_increments(stream, PRETRAIN, PRETRAIN + args.phase_rows, 51_200, 512):
        trainer.train_increment(increment)
    pruner.finalize([optimizer])
    masks = {f: layer.weight_mask.clone() for f, layer in pruner.linears.items()}
    kept = sum(int(m.sum()) for m in masks.values())
    kept_reopened = sum(int((reopened[f] & masks[f]).sum()) for f in masks)
    return {"steps": steps, **counts, "kept": kept, "kept_reopened": kept_reopened, "masks": masks}


def main() -> None:
    args = parse_args()
    setup_process()
    rows, report = [], []
    for target in args.targets:
        runs = {name: ramp(args, m, w1, w2, target) for name, (m, w1, w2) in ARMS.items()}
        ref = runs["MP"]["masks"]
        for name, r in runs.items():
            inter = sum(int((r["masks"][f] & ref[f]).sum()) for f in ref)
            union = sum(int((r["masks"][f] | ref[f]).sum()) for f in ref)
            entry = {k: v for k, v in r.items() if k != "masks"}
            entry.update(name=name, target=target, jaccard_vs_mp=inter / union)
            report.append(entry)
            rows.append([
                f"{target:g}", name, r["closed"], r["reopened"], r["kept"],
                f"{r['kept_reopened']} ({100 * r['kept_reopened'] / r['kept']:.1f}%)", f"{inter / union:.3f}",
            ])  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity_mop_churn.json").write_text(json.dumps(report, indent=1))
    text = [
        "# MoP's mask churn during the pruning ramp (why MoP lags MP)",
        "",
        f"Produced by `python benchmarks/fidelity_mop_churn.py` (seed {args.seed}: the converged dense "
        f"checkpoint of the fidelity benchmarks, one pruning ramp of {args.phase_rows:,} rows, "
        f"{report[0]['steps']} steps, mask update every step). Counts are weight-mask events summed over "
        "the ramp; *kept, re-opened* are weights open at the end that had been closed (zeroed) and came "
        "back at zero with fresh Adagrad state; Jaccard compares the final kept set with MP's.",
        "",
        markdown_table(
            ["target", "method", "closed", "re-opened", "kept", "kept, re-opened", "Jaccard vs MP"], rows
        ),
        "",
    ]
    (args.out / "fidelity_mop_churn.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
