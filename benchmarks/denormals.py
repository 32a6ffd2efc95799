"""Cost of denormal arithmetic with and without FTZ/DAZ, and denormals created by zero-init regrowth.

Part 1 times the same element-wise and matmul work on normal values and on denormal values, with
FTZ/DAZ off and on (`torchrec_prune.numerics`), side by side in one process. Part 2 prunes and regrows
(zero init) the neurons of a small DLRM and counts denormal weights after training with FTZ/DAZ off and
on. Results: docs/results/denormals.md and .json. CPUs differ a lot here (many Intel cores pay 5x-260x
per denormal operation, many AMD cores nothing): the table names the CPU it was measured on.

    .venv/bin/python benchmarks/denormals.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

import torchrec_prune as tp
from torchrec_prune.data import SyntheticStream
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.numerics import count_denormals, disable_ftz_daz, enable_ftz_daz
from torchrec_prune.pruners.structured import grow_neurons, neuron_successors, prune_neurons

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


def regrowth_denormals(steps: int = 100, rounds: int = 2) -> list[dict]:
    rows = []
    for ftz in [False, True] * rounds:  # alternating, so drift in machine load hits both settings
        enable_ftz_daz() if ftz else disable_ftz_daz()
        torch.manual_seed(0)
        model = tp.wrap(
            build_dlrm(DLRMConfig(num_embeddings=500, dense_arch=[64, 32, 4], over_arch=[64, 32, 1]))
        )
        opt = torch.optim.SGD(model.parameters(), lr=1e-38)  # tiny steps from zero: the denormal regime
        stream = SyntheticStream(64 * (steps + 20), seed=0, num_embeddings=500)
        batches = stream.batches(64)
        layers = dict(model.named_modules())
        prune_neurons(
            model, 0.5, {f: torch.rand(layers[f].out_features) for f in neuron_successors(model)}, [opt]
        )
        grow_neurons(model, [opt])
        start = time.perf_counter()
        for _, batch in zip(range(steps), batches, strict=False):
            opt.zero_grad()
            model(batch)[0].backward()
            opt.step()
        rows.append(
            {
                "ftz_daz": ftz,
                "denormal_values": count_denormals(model),
                "train_s": time.perf_counter() - start,
                "steps": steps,
            }
        )
    disable_ftz_daz()
    return rows


def main() -> None:
    cpu = _cpu_name()
    result = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "arithmetic": arithmetic(),
        "regrowth": regrowth_denormals(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "denormals.json").write_text(json.dumps(result, indent=2))
    base = {(r["values"], r["ftz_daz"]): r for r in result["arithmetic"]}
    lines = [
        f"# Denormal cost and FTZ/DAZ on {cpu} ({result['threads']} threads)",
        "",
        "| values | FTZ/DAZ | mul+add 4M (ms) | 512x512 matmul (ms) | mul+add vs normal |",
        "|---|---|---|---|---|",
    ]
    for r in result["arithmetic"]:
        ratio = r["mul_add_s"] / base[("normal", r["ftz_daz"])]["mul_add_s"]
        lines.append(
            f"| {r['values']} | {'on' if r['ftz_daz'] else 'off'} | {1e3 * r['mul_add_s']:.2f} | "
            f"{1e3 * r['matmul_s']:.2f} | {ratio:.2f}x |"
        )
    lines += [
        "",
        "Zero-init regrowth of half the neurons of a small DLRM, then SGD with lr 1e-38 (updates in the "
        "denormal range):",
        "",
        "| FTZ/DAZ | denormal values after training | train time (s) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {'on' if r['ftz_daz'] else 'off'} | {r['denormal_values']} | {r['train_s']:.2f} |"
        for r in result["regrowth"]
    ]
    (OUT / "denormals.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
