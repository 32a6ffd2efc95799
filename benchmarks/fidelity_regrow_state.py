"""Is the regrowth blow-up the reset Adagrad accumulator? Rerun chosen seeds of the powered grow/prune
protocol with regrown entries' accumulators started at the mean of their layer's entries that stay open.

SPEC 3 resets a regrown weight's Adagrad ``sum`` to its initial value (0), so its first steps move it by
about the full learning rate. ``GrowPruneConfig.regrown_state`` picks the rule: ``reset`` (SPEC 3) or
``layer_mean`` (accumulators at the mean of the entries open before and after the growth, everything else
as SPEC 3). This prints, as a markdown table, each seed's look-ahead CE per window and accuracy relative to
dense, under each rule, in the same process.

    .venv/bin/python benchmarks/fidelity_regrow_state.py --seeds 7,11,0 [--rules reset,layer_mean]
"""

from __future__ import annotations

import argparse
import sys

import fidelity_grow_prune as protocol

from torchrec_prune.train.optimizer_state import REGROWN_STATES


def _rules(text: str) -> list[str]:
    rules = text.split(",")
    for rule in rules:
        if rule not in REGROWN_STATES:
            raise argparse.ArgumentTypeError(f"{rule!r} is not one of {', '.join(REGROWN_STATES)}")
    return rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[7, 11, 0])
    parser.add_argument("--rules", type=_rules, default=list(REGROWN_STATES))
    options = parser.parse_args()
    sys.argv = sys.argv[:1]  # the protocol's own defaults
    args = protocol.parse_args()
    print("| rule | seed | scheme | CE vs dense per window (%) | accuracy vs dense (%) |")
    print("|---|---|---|---|---|")
    for rule in options.rules:
        args.regrown_state = rule
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


if __name__ == "__main__":
    main()
