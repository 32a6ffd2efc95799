"""D2S on Ray: the dense, pruning and serving jobs as concurrent actors, against one-process D2S.

Same stream, model and D2S settings (fixed line) run twice: ``D2SController`` in one process and
``run_d2s_ray`` (three actors). Writes the serving and dense look-ahead CE of both, the age of the served
model per increment, and a timeline of when each job ran (the paper's Fig. 4 picture) to
docs/results/ray_d2s.{md,json,png}.

    .venv/bin/python benchmarks/ray_d2s.py [--rows 60000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from torchrec_prune.distributed.ps import ray_session  # noqa: E402 (before ray: loopback)
from torchrec_prune.distributed.ps.d2s import run_d2s_ray  # noqa: E402
from torchrec_prune.masks import wrap  # noqa: E402
from torchrec_prune.metrics.window import WindowRecord  # noqa: E402
from torchrec_prune.models import DLRMConfig, build_dlrm  # noqa: E402
from torchrec_prune.pruners.aux import AuxConfig  # noqa: E402
from torchrec_prune.schedules.d2s import D2SConfig, D2SController  # noqa: E402
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for  # noqa: E402
from torchrec_prune.train.trainer import TrainConfig  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
COLORS = {"dense": "tab:blue", "pruning": "tab:orange", "serving": "tab:green"}


def mean_ce(records: list[WindowRecord]) -> float:
    return sum(r.ce * r.n for r in records) / sum(r.n for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    args = parser.parse_args()
    model = DLRMConfig(num_embeddings=10_000, dense_arch=[64, 32, 4], over_arch=[64, 32, 1])
    train = TrainConfig(batch_size=128, window=2000, increment_rows=6000, progress=False)
    job = JobConfig(rows=args.rows, drift=2.0, seed=0, model=model, train=train, checkpoint=False)
    d2s = D2SConfig(r=2, p=1, warmup=2, aux=AuxConfig(lam=1.75, eps=0.2), lines=("fixed",))
    stream = make_stream(job)
    torch.manual_seed(0)
    started = time.perf_counter()
    single = D2SController(wrap(build_dlrm(model_config_for(stream, job.model))), stream, train, d2s).run()
    single_seconds = time.perf_counter() - started
    with ray_session(None, num_cpus=os.cpu_count() or 1):
        started = time.perf_counter()
        ray_result = run_d2s_ray(job, d2s)
        ray_seconds = time.perf_counter() - started
    line = single.lines["fixed"]
    figures = {
        "single_serving_ce": mean_ce(line.records),
        "ray_serving_ce": mean_ce(ray_result.serving),
        "single_dense_ce": mean_ce(single.dense),
        "ray_dense_ce": mean_ce(ray_result.dense),
        "max_window_ce_difference": max(
            abs(a.ce - b.ce) for a, b in zip(ray_result.serving, line.records, strict=True)
        ),
        "births": ray_result.births,
        "max_age": ray_result.max_age,
        "pruning_overlaps_dense": ray_result.overlaps("pruning", "dense"),
        "serving_overlaps_dense": ray_result.overlaps("serving", "dense"),
        "single_process_seconds": single_seconds,
        "ray_seconds_with_actor_start": ray_seconds,
        "spans": ray_result.spans,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ray_d2s.json").write_text(json.dumps({"args": vars(args), "figures": figures}, indent=2))
    plot(ray_result.spans)
    write(args, figures)


def plot(spans: list[tuple[str, int, float, float]]) -> None:
    t0 = min(s[2] for s in spans)
    fig, ax = plt.subplots(figsize=(10, 3))
    rows = {"dense": 2, "pruning": 1, "serving": 0}
    for what, k, start, end in spans:
        ax.barh(rows[what], end - start, left=start - t0, color=COLORS[what], edgecolor="black", height=0.6)
        ax.text((start + end) / 2 - t0, rows[what], str(k), ha="center", va="center", fontsize=7)
    ax.set_yticks(list(rows.values()), [f"{name} job" for name in rows])
    ax.set_xlabel("seconds since the first job started (labels: increment, or birth for pruning)")
    ax.set_title("D2S on Ray: when each actor worked")
    fig.tight_layout()
    fig.savefig(OUT / "ray_d2s.png", dpi=120)


def write(args: argparse.Namespace, f: dict) -> None:
    lines = [
        "# D2S on Ray: dense, pruning and serving jobs as concurrent actors",
        "",
        f"Synthetic stream, {args.rows} rows, drift 2, increments of 6000 rows, batch 128, DLRM emb dim 4, "
        "bottom 64-32-4, top 64-32-1, 10k-row tables, Adagrad; D2S fixed line, r=2, p=1, warm-up 2, AUX "
        f"lambda 1.75. One process (`D2SController`) vs three Ray actors (`run_d2s_ray`) on "
        f"{platform.machine()} with {os.cpu_count()} cores, shared with other jobs.",
        "",
        "| | one process | Ray (3 actors) |",
        "|---|---|---|",
        f"| serving look-ahead CE (all windows) | {f['single_serving_ce']:.5f} | {f['ray_serving_ce']:.5f} |",
        f"| dense look-ahead CE | {f['single_dense_ce']:.5f} | {f['ray_dense_ce']:.5f} |",
        f"| wall seconds (not a speed comparison: run one after the other under other load) | "
        f"{f['single_process_seconds']:.1f} | {f['ray_seconds_with_actor_start']:.1f} "
        "(incl. starting 3 actors) |",
        "",
        f"Largest per-window serving CE difference: {f['max_window_ce_difference']:.2e} (the same library "
        "jobs on the same rows; only where they run differs). Sparse models born at increments "
        f"{f['births']}; oldest served age {f['max_age']} increments (r = 2). Pruning ran while the dense "
        f"job trained: {f['pruning_overlaps_dense']}; serving ran while the dense job trained: "
        f"{f['serving_overlaps_dense']}.",
        "",
        "![timeline](ray_d2s.png)",
    ]
    (OUT / "ray_d2s.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
