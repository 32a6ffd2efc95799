"""Is the regrowth blow-up the reset Adagrad accumulator? Rerun chosen seeds of the powered grow/prune
protocol with regrown entries' accumulators started at the mean of their layer's other entries.

SPEC 3 resets a regrown weight's Adagrad ``sum`` to its initial value (0), so its first steps move it by
about the full learning rate. This experiment replaces, for the run only, the reset that prune and grow
share (``torchrec_prune.masks.surgery.reset_state_``): ``sum`` entries restart at the mean of the entries
that keep their state, everything else as SPEC 3. It is an experiment, not a library setting: it prints,
as a markdown table, each seed's look-ahead CE per window and accuracy relative to dense, under both rules,
in the same process.

    .venv/bin/python benchmarks/fidelity_regrow_state.py --seeds 7,11,0 [--rules spec,mean_sum]
"""

from __future__ import annotations

import argparse
import sys

import fidelity_grow_prune as protocol
import torch

import torchrec_prune.masks.surgery as surgery
from torchrec_prune.train.optimizer_state import element_states

SPEC_RESET = surgery.reset_state_


def mean_sum_reset(optimizers, param: torch.Tensor, where: torch.Tensor) -> int:
    """``reset_state_`` with Adagrad's ``sum`` restarted at the mean of the entries not reset."""
    entries = element_states(list(optimizers), param)
    with torch.no_grad():
        for entry in entries:
            value = entry.holder[entry.key]
            reset = where.expand_as(value)
            fill = (
                float(value[~reset].mean()) if entry.key == "sum" and bool((~reset).any()) else entry.initial
            )
            value.masked_fill_(reset, fill)
    return len(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[7, 11, 0])
    parser.add_argument("--rules", type=lambda s: s.split(","), default=["spec", "mean_sum"])
    options = parser.parse_args()
    sys.argv = sys.argv[:1]  # the protocol's own defaults
    args = protocol.parse_args()
    print("| rule | seed | scheme | CE vs dense per window (%) | accuracy vs dense (%) |")
    print("|---|---|---|---|---|")
    rules = {"spec": SPEC_RESET, "mean_sum": mean_sum_reset}
    for rule in options.rules:
        surgery.reset_state_ = rules[rule]
        for seed in options.seeds:
            task = protocol.run_task(("synthetic", seed, args))
            runs = task["runs"]
            for scheme in protocol.SCHEMES:
                rel = [
                    100 * (a / b - 1) for a, b in zip(runs[scheme]["ce"], runs["dense"]["ce"], strict=True)
                ]
                acc = 100 * runs[scheme]["relative_accuracy"]
                windows = ", ".join(f"{x:+.2f}" for x in rel)
                print(f"| {rule} | {seed} | {scheme} | {windows} | {acc:+.3f} |", flush=True)
    surgery.reset_state_ = SPEC_RESET


if __name__ == "__main__":
    main()
