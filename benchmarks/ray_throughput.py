"""Asynchronous trainers on Ray vs one process and 2-rank torchrun DMP, on the same cores, interleaved.

Per repeat, one after the other on the same synthetic stream and reference DLRM (global batch 256):
one process (``torchrec-prune train``), two torchrun ranks under DMP (``train --nproc 2``), and the
parameter server with 1 and 2 trainer actors (1 shard; 2 trainers at staleness 2 and 8). Every rate
counts the training loop only (process/actor start excluded; for Ray, from the first trainer step to
the last). Ray actors come from one pool started once. Also recorded: bytes moved per sample, time per
pull and push, server service time per push; from those, the scaling model in the results file.

Writes docs/results/ray_throughput.{md,json} (``--stem`` names others).

    .venv/bin/python benchmarks/ray_throughput.py [--rows 40000] [--repeats 2]
    .venv/bin/python benchmarks/ray_throughput.py --rows 80000 --global-batch 1024 --stem ray_throughput_b1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from perf_common import Timing, ratio

from torchrec_prune.distributed.ps import PSConfig, ray_session  # before ray: loopback
from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.driver import AsyncRunResult, run_async
from torchrec_prune.train.job import JobConfig
from torchrec_prune.train.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"


def run_cli(nproc: int, rows: int, batch_size: int, run_dir: Path) -> dict:
    cmd = [
        sys.executable, "-m", "torchrec_prune.cli", "train", "--data", "synthetic", "--rows", str(rows),
        "--batch-size", str(batch_size), "--window", "5000", "--increment-rows", "10000",
        "--nproc", str(nproc), "--run-dir", str(run_dir), "--no-checkpoint", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "samples_per_second": summary["samples_per_second"],
        "last_quarter_ce": summary["last_quarter_ce"],
    }


def async_figures(result: AsyncRunResult) -> dict:
    """Throughput over the training span and the per-step costs the scaling model needs."""
    t = result.trainers
    span = max(x["last_step_at"] for x in t) - min(x["first_step_at"] for x in t)
    steps = sum(x["steps"] for x in t)
    pushes = sum(s["pushes"] for s in result.servers)
    tail = result.records[-max(1, len(result.records) // 4) :]
    return {
        "samples_per_second": result.samples / span,
        "last_quarter_ce": sum(r.ce for r in tail) / len(tail),
        "bytes_per_sample": sum(x["bytes_pulled"] + x["bytes_pushed"] for x in t) / result.samples,
        "compute_ms_per_step": 1e3 * sum(x["compute_seconds"] for x in t) / steps,
        "pull_ms_per_step": 1e3 * sum(x["pull_seconds"] for x in t) / steps,
        "push_ms_per_step": 1e3 * sum(x["push_seconds"] for x in t) / steps,
        "pulls_per_step": sum(x["pulls"] for x in t) / steps,
        "server_ms_per_push": 1e3 * sum(s["push_seconds"] for s in result.servers) / pushes,
        "server_ms_per_pull": 1e3
        * sum(s["pull_seconds"] for s in result.servers)
        / max(1, sum(s["pulls"] for s in result.servers)),
        "server_busy_fraction": sum(s["push_seconds"] + s["pull_seconds"] for s in result.servers) / span,
        "staleness": result.staleness(),
        "table_bytes_per_trainer": t[0]["table_bytes"],
        "steps": steps,
        "driver_cpu_ms_per_batch": 1e3 * result.driver_cpu_seconds / len(result.batches),
        "compute_cpu_ms_per_step": 1e3 * sum(x["compute_cpu_seconds"] for x in t) / steps,
        "step_cpu_ms_per_step": 1e3 * sum(x["step_cpu_seconds"] for x in t) / steps,
        "server_cpu_ms_per_push": 1e3 * sum(s["push_cpu_seconds"] for s in result.servers) / pushes,
        "server_cpu_ms_per_pull": 1e3
        * sum(s["pull_cpu_seconds"] for s in result.servers)
        / max(1, sum(s["pulls"] for s in result.servers)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--stem", default="ray_throughput", help="results file names under docs/results")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="rewrite the page from the stem's JSON only")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.render:
        saved = json.loads((OUT / f"{args.stem}.json").read_text())
        args = argparse.Namespace(**saved["args"])
        write(args, cores, setups_for(args.global_batch), saved["runs"])
        return
    torch.set_num_threads(1)  # the driver: small ops; an OpenMP team would spin on the actors' cores
    setups = setups_for(args.global_batch)
    runs = []
    with ray_session(None, num_cpus=cores), tempfile.TemporaryDirectory() as tmp:
        pool = ActorPool()
        pool.take(1, 2)
        for repeat in range(args.repeats):
            for label, n, batch, staleness in setups:
                if staleness == 0:
                    figures = run_cli(n, args.rows, batch, Path(tmp) / f"{repeat}-{n}")
                else:
                    train = TrainConfig(batch_size=batch, window=5000, increment_rows=10_000, progress=False)
                    job = JobConfig(rows=args.rows, drift=1.0, seed=0, train=train, checkpoint=False)
                    ps = PSConfig(trainers=n, servers=1, staleness=staleness)
                    figures = async_figures(run_async(job, ps, pool=pool))
                load = os.getloadavg()[0]  # 1-min load average after the run: other users of the cores
                utc = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
                runs.append({"setup": label, "repeat": repeat, "load_average": load, "utc": utc} | figures)
                print(f"{label}: {figures['samples_per_second']:.0f} samples/s", flush=True)
    write(args, cores, setups, runs)


def setups_for(gb: int) -> list[tuple[str, int, int, int]]:
    """Label, nproc or trainers, per-trainer batch and staleness of each setup at global batch ``gb``."""
    return [
        ("1 process (train)", 1, gb, 0),
        ("2 ranks (torchrun + DMP, gloo)", 2, gb // 2, 0),
        ("Ray PS: 1 trainer, 1 shard, staleness 2", 1, gb, 2),
        ("Ray PS: 2 trainers, 1 shard, staleness 2", 2, gb // 2, 2),
        ("Ray PS: 2 trainers, 1 shard, staleness 8", 2, gb // 2, 8),
    ]


def paired(runs: list[dict], label: str, base: str) -> dict[str, float]:
    """``label``'s speed over ``base``'s, repeat by repeat (every setup trains the same rows): the ratio
    of their total times with a 95% interval from resampling the repeats (``perf_common.ratio``)."""
    seconds = {name: Timing() for name in (label, base)}
    for run in runs:
        if run["setup"] in seconds:
            seconds[run["setup"]].wall.append(1.0 / run["samples_per_second"])
    return ratio(seconds, base, label, kind="wall")


def command_flags(args: argparse.Namespace) -> str:
    defaults = {"rows": 40_000, "global_batch": 256, "repeats": 2, "stem": "ray_throughput", "render": False}
    flags = [f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if defaults.get(k) != v]
    return "".join(flags)


def run_dates(runs: list[dict]) -> str:
    stamps = sorted(r["utc"] for r in runs)
    return f"{stamps[0]} to {stamps[-1]} UTC"


def write(args: argparse.Namespace, cores: int, setups: list, runs: list[dict]) -> None:
    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["setup"] == label)

    base, dmp = setups[0][0], setups[1][0]
    lines = [
        "# Asynchronous parameter server on Ray: throughput next to one process and 2-rank DMP",
        "",
        f"Synthetic stream, {args.rows} rows, global batch {args.global_batch} (2 trainers or ranks: "
        f"{args.global_batch // 2} each), reference DLRM (emb dim 4, bottom 256-128-64-4, top 256-128-1, "
        f"10k-row tables), Adagrad, one intra-op thread per process; {args.repeats} repeats, the five setups "
        f"interleaved in each repeat by `benchmarks/ray_throughput.py{command_flags(args)}` on "
        f"{platform.machine()} with {cores} cores, {run_dates(runs)} (1-min load average after each run: "
        f"{min(r['load_average'] for r in runs):.1f} to {max(r['load_average'] for r in runs):.1f}; a "
        "setup's own processes count in it).",
        "Ray: embedded on loopback, 1 server shard, driver in the benchmark process (1 intra-op thread), "
        "every actor `num_cpus=0` (trainers, shard and driver share the 2 cores), arguments and results up "
        "to 8 MiB sent inline with the call (`runtime.INLINE_BYTES`); each trainer holds 4096 rows per "
        "table in one pool shared by the 26 tables (`--cache-rows`).",
        "",
        "The last columns pair each repeat's run with the same repeat's 2-rank DMP run: the median of those "
        "speed ratios (min-max), and the ratio of total times over all repeats with a 95% interval from "
        "resampling the repeats.",
        "",
        "| setup | samples/s (median) | min | max | vs 1 process | vs 2-rank DMP | last-quarter CE "
        "| vs DMP per repeat | vs DMP, total (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, *_ in setups:
        rates = [r["samples_per_second"] for r in runs if r["setup"] == label]
        vs = paired(runs, label, dmp)
        lines.append(
            f"| {label} | {statistics.median(rates):.0f} | {min(rates):.0f} | {max(rates):.0f} | "
            f"{med(label, 'samples_per_second') / med(base, 'samples_per_second'):.2f}x | "
            f"{med(label, 'samples_per_second') / med(dmp, 'samples_per_second'):.2f}x | "
            f"{med(label, 'last_quarter_ce'):.4f} | {vs['median']:.2f} ({vs['min']:.2f}-{vs['max']:.2f}) | "
            f"{vs['total']:.3f} ({vs['low']:.3f}-{vs['high']:.3f}) |"
        )
    lines += [
        "",
        "Per-step costs of the asynchronous runs (medians over repeats; wall times of the calls, which "
        "include waiting for a core, and thread CPU times where marked CPU):",
        "",
        "| setup | bytes/sample | compute ms/step | trainer CPU ms/step | pull ms/step | pulls/step "
        "| push ms/step | server ms/push (CPU) | server ms/pull (CPU) | server busy | driver CPU ms/batch "
        "| trainer table bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, *_ in setups[2:]:
        lines.append(
            f"| {label} | {med(label, 'bytes_per_sample'):.0f} | {med(label, 'compute_ms_per_step'):.1f} | "
            f"{med(label, 'step_cpu_ms_per_step'):.1f} | "
            f"{med(label, 'pull_ms_per_step'):.1f} | {med(label, 'pulls_per_step'):.2f} | "
            f"{med(label, 'push_ms_per_step'):.1f} | {med(label, 'server_ms_per_push'):.2f} "
            f"({med(label, 'server_cpu_ms_per_push'):.2f}) | {med(label, 'server_ms_per_pull'):.2f} "
            f"({med(label, 'server_cpu_ms_per_pull'):.2f}) | {med(label, 'server_busy_fraction'):.0%} | "
            f"{med(label, 'driver_cpu_ms_per_batch'):.2f} | {med(label, 'table_bytes_per_trainer'):.0f} |"
        )
    one = setups[2][0]
    t_c = med(one, "step_cpu_ms_per_step")
    s_push, s_pull = med(one, "server_cpu_ms_per_push"), med(one, "server_cpu_ms_per_pull")
    per_sample = med(one, "bytes_per_sample")
    batch = args.global_batch // 2
    driver = med(one, "driver_cpu_ms_per_batch")
    lines += scaling_model(t_c, s_push, s_pull, driver, per_sample, batch)
    OUT.mkdir(parents=True, exist_ok=True)
    stem = args.stem
    (OUT / f"{stem}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def scaling_model(
    c: float, s_push: float, s_pull: float, driver: float, per_sample: float, batch: int
) -> list[str]:
    """Predicted samples/s for N trainers and S shards from CPU costs measured with one trainer.

    A trainer step costs ``c`` ms of trainer CPU and waits for one push and one pull to be served
    (``s_push + s_pull`` ms of shard CPU for the whole model, split over the shards it touches) plus the
    round trips of ``RTT`` ms: one a step, as the push carries the next pull, and one more for the
    pull of each chunk's first step; each shard serves requests one at a time; the driver spends
    ``driver`` ms of CPU per batch.
    """
    rtt = 1.0
    trips = 1 + 1 / PSConfig().chunk_steps
    step = c + s_push + s_pull + trips * rtt
    trainer_rate = batch / (step / 1e3)  # samples/s of one trainer with idle shards
    lines = [
        "",
        "## Scaling model",
        "",
        f"Measured with 1 trainer ({batch}-row batches) as thread CPU time, so that waiting for one of the 2 "
        f"shared cores is not counted: trainer c = {c:.1f} ms/step (forward, backward, cache, "
        f"(de)serialisation), shard {s_push:.2f} ms/push + {s_pull:.2f} ms/pull for the whole model, driver "
        f"{driver:.3f} ms/batch; {per_sample:.0f} bytes/sample moved. Assumptions: one core per trainer, per "
        f"shard and for the driver; {rtt:.0f} ms per round trip (LAN; {trips:.3f} per step: the push "
        f"carries the next batch's pull, a chunk of {PSConfig().chunk_steps} steps pulls once on its own); "
        "one pull per step (staleness 1-2 with many trainers); shard work splits evenly over shards (dense "
        "tensors are assigned whole, so past ~8 shards the largest tensor, the 355x256 top-MLP input "
        "layer, bounds a shard: the model ignores that); no stragglers, no network limit; queueing at a "
        "shard ignored below saturation.",
        "",
        f"Per trainer: t = c + s_push + s_pull + {trips:.3f} rtt = "
        f"{step:.1f} ms/step, {trainer_rate:.0f} samples/s. "
        "X(N, S) = min(N B / t, S B / (s_push + s_pull), B / driver); efficiency = X / (N B / t). "
        "S80 is the fewest shards for >= 80% efficiency.",
        "",
        "| trainers N | shards S | cores N+S+1 | predicted samples/s | efficiency | bound by | "
        "network per trainer |",
        "|---|---|---|---|---|---|---|",
    ]
    driver_bound = []
    for n in (8, 64, 512):
        s80 = max(1, math.ceil(0.8 * n * (s_push + s_pull) / step))
        for s in sorted({1, s80}):
            rates = {
                "trainers": n * trainer_rate,
                "shards": s * batch / ((s_push + s_pull) / 1e3),
                "driver": batch / (driver / 1e3),
            }
            bound = min(rates, key=rates.__getitem__)
            x = rates[bound]
            if bound == "driver" and n not in driver_bound:
                driver_bound.append(n)
            lines.append(
                f"| {n} | {s}{' (S80)' if s == s80 else ''} | {n + s + 1} | {x:.0f} | "
                f"{x / (n * trainer_rate):.0%} | {bound} | {per_sample * trainer_rate / 1e6:.1f} MB/s |"
            )
    if driver_bound:
        lines += [
            "",
            f"Where the driver bounds the run ({', '.join(map(str, driver_bound))} trainers), windows would "
            "have to be closed by several collectors (each owning a range of the stream) or from per-window "
            "sums the trainers pre-reduce; neither is built.",
        ]
    return lines


if __name__ == "__main__":
    main()
