"""Cost of denormal arithmetic with and without FTZ/DAZ, and a zero-init regrowth phase with FTZ/DAZ
against a denormal-free run.

Part 1 times the same element-wise and matmul work on normal values and on denormal values, with
FTZ/DAZ off and on (`torchrec_prune.numerics`), side by side in one process. Part 2 trains the reference
DLRM as a job does (its one-process replica and ``IncrementalTrainer``) right after pruning 70% of its
hidden neurons and regrowing them at zero, in four arms interleaved round by round:
- ``denormal_free``: FTZ/DAZ off, lr 0.05, no denormal value arises (the count is reported);
- ``ftz_daz_on``: FTZ/DAZ on, lr 1e-42, so every update of a regrown zero weight is a denormal, flushed;
- ``ftz_daz_off``: FTZ/DAZ off, lr 1e-42: the regrown weights that get a gradient turn denormal and
  the matmuls read them (what FTZ/DAZ saves; the target is ``ftz_daz_on`` within 5% of
  ``denormal_free``);
- ``ftz_daz_on_lr_0.05``: FTZ/DAZ on at the denormal-free arm's lr: what FTZ/DAZ costs where nothing is
  flushed, apart from what the tiny lr changes.
CPUs differ a lot here (many Intel cores pay 5x-260x per denormal operation, many AMD cores nothing):
the results name the CPU they were measured on. Results: docs/results/denormals.md and .json.

    .venv/bin/python benchmarks/denormals.py [--rounds 200] [--steps 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from perf_common import interleave, job_replica, machine, ratio, reference_batches, reference_config

from torchrec_prune.data.stream import BatchStream
from torchrec_prune.distributed.dmp import one_process_group
from torchrec_prune.numerics import count_denormals, disable_ftz_daz, enable_ftz_daz
from torchrec_prune.pruners.structured import grow_neurons, neuron_successors, prune_neurons
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

BETA = 0.7
ARMS = {
    "denormal_free": (False, 0.05),
    "ftz_daz_on": (True, 1e-42),
    "ftz_daz_off": (False, 1e-42),
    "ftz_daz_on_lr_0.05": (True, 0.05),
}

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def arithmetic(n: int = 4_000_000) -> list[dict]:
    rows = []
    disable_ftz_daz()  # build the inputs with FTZ off so that denormal values are really stored
    for label, value in (("normal", 1.0), ("denormal", 1e-39)):
        x, y = torch.full((n,), value), torch.empty(n)  # preallocated: time arithmetic, not page faults
        a, c = torch.full((512, 512), value), torch.empty(512, 512)
        for ftz in (False, True):
            enable_ftz_daz() if ftz else disable_ftz_daz()
            rows.append({
                "values": label, "ftz_daz": ftz,
                "mul_add_s": _time(lambda x=x, y=y: torch.mul(x, 0.5, out=y).add_(x)),
                "matmul_s": _time(lambda a=a, c=c: torch.mm(a, a, out=c)),
            })  # fmt: skip
    disable_ftz_daz()
    return rows


def regrowth_arm(
    ftz: bool, lr: float, stream: BatchStream, steps: int, batch_size: int
) -> tuple[Callable[[], None], Callable[[], int]]:
    """A round of ``steps`` training steps of the job's replica right after a zero-init regrowth of the
    70% of hidden neurons pruned at its start, with FTZ/DAZ set as ``ftz`` for the round; and a count of
    the denormal values its parameters and buffers hold."""
    torch.manual_seed(0)
    train = TrainConfig(batch_size=batch_size, lr=lr, window=5_000, progress=False)
    replica = job_replica(stream, train)
    model = replica.model
    scores = {f: torch.rand(model.get_submodule(f).out_features) for f in neuron_successors(model)}
    prune_neurons(model, BETA, scores, replica.optimizers)
    grow_neurons(model, replica.optimizers)
    trainer = IncrementalTrainer(replica.model, train, optimizers=replica.optimizers)
    source = itertools.cycle(list(stream.batches(batch_size)))

    def run() -> None:
        enable_ftz_daz() if ftz else disable_ftz_daz()
        for _ in range(steps):
            trainer.step(next(source))
        disable_ftz_daz()

    return run, lambda: count_denormals(replica.model)


def regrowth(rounds: int, steps: int, batch_size: int) -> dict[str, object]:
    """The arms side by side, interleaved round by round, and each one's time over the denormal-free arm."""
    with one_process_group():
        stream = BatchStream(
            reference_batches(batch_size, 50), num_embeddings=reference_config().num_embeddings
        )
        arms = {name: regrowth_arm(ftz, lr, stream, steps, batch_size) for name, (ftz, lr) in ARMS.items()}
        timings = interleave({name: run for name, (run, _) in arms.items()}, rounds)
        denormals = {name: count() for name, (_, count) in arms.items()}
    return {
        "arms": {
            name: {"ftz_daz": ftz, "lr": lr, "denormal_values": denormals[name]}
            for name, (ftz, lr) in ARMS.items()
        },
        "rounds": rounds,
        "steps": steps,
        "batch_size": batch_size,
        "cpu_s": {name: t.cpu for name, t in timings.items()},
        "ratios": {name: ratio(timings, name, "denormal_free") for name in ARMS if name != "denormal_free"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (FTZ/DAZ is set on each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = _cpu_name()
    result = {
        "machine": machine(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "arithmetic": arithmetic(),
        "regrowth": regrowth(args.rounds, args.steps, args.batch_size),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "denormals.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "denormals.md").write_text("\n".join(report(result)) + "\n")
    print("\n".join(report(result)))


def report(result: dict) -> list[str]:
    base = {(r["values"], r["ftz_daz"]): r for r in result["arithmetic"]}
    lines = [
        f"# Denormal cost and FTZ/DAZ on {result['cpu']} (intra-op threads: {result['threads']})",
        "",
        f"`{result['machine']['command']}`, {result['machine']['date']}, load average "
        f"{result['machine']['load_average']:.2f}.",
        "",
        "| values | FTZ/DAZ | mul+add 4M (ms) | 512x512 matmul (ms) | mul+add vs normal |",
        "|---|---|---|---|---|",
    ]
    for r in result["arithmetic"]:
        ratio_ = r["mul_add_s"] / base[("normal", r["ftz_daz"])]["mul_add_s"]
        lines.append(
            f"| {r['values']} | {'on' if r['ftz_daz'] else 'off'} | {1e3 * r['mul_add_s']:.2f} | "
            f"{1e3 * r['matmul_s']:.2f} | {ratio_:.2f}x |"
        )
    grow = result["regrowth"]
    lines += [
        "",
        f"A zero-init regrowth phase: the reference DLRM's job replica trains right after {BETA:.0%} of its "
        f"hidden neurons were pruned and regrown at zero; {grow['rounds']} interleaved rounds of "
        f"{grow['steps']} steps of batch {grow['batch_size']}, thread CPU time; ratio of total times over "
        "the denormal-free arm with its 95% interval, and the median (min-max) of per-round ratios:",
        "",
        "| arm | FTZ/DAZ | lr | denormal values after training | time over denormal-free |",
        "|---|---|---|---|---|",
    ]
    for name, arm in grow["arms"].items():
        r = grow["ratios"].get(name)
        cell = (
            "1"
            if r is None
            else f"{r['total']:.3f} ({r['low']:.3f}-{r['high']:.3f}); "
            f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        )
        lines.append(
            f"| `{name}` | {'on' if arm['ftz_daz'] else 'off'} | {arm['lr']:g} | {arm['denormal_values']} | "
            f"{cell} |"
        )
    return lines


if __name__ == "__main__":
    main()
