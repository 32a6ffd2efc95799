"""``torchrec-prune demo``: both training paradigms on one stream, each against the dense model.

1. Dense-to-Sparse (SPEC 6): the serving model of D2S (fixed period and adaptive) against a single AUX
   sparse model with a fixed mask, the adaptation-mask variant and the dense model, on a drifting stream.
2. Alternate grow/prune (SPEC 5) against prune-only, grow-only and dense-sparse-dense at beta 0.7, with
   counted training FLOPs and measured step time.

Everything lands in the run folder: window records per run (``windows.jsonl``/``windows.csv``), the
comparison tables as CSV, ``summary.json`` and the plots. Settings that the command line does not expose
are the constants below.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from torchrec_prune.cli import job_config
from torchrec_prune.data.stream import Stream
from torchrec_prune.masks import wrap
from torchrec_prune.masks.report import format_report, sparsity_report
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.models import build_dlrm
from torchrec_prune.numerics import count_denormals, enable_ftz_daz
from torchrec_prune.plots import plot_window_metric
from torchrec_prune.pruners.aux import AuxConfig
from torchrec_prune.schedules.d2s import D2SConfig, D2SController, D2SResult
from torchrec_prune.schedules.grow_prune import GrowPruneConfig, GrowPruneResult, run_grow_prune
from torchrec_prune.schedules.phases import SCHEMES, PhasePlan, scheme
from torchrec_prune.schedules.report import (
    d2s_rows,
    format_table,
    grow_prune_rows,
    plot_phase_curves,
    plot_relative_ce,
    write_csv,
)
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for

# D2S: prune the dense snapshot one increment back, serve each sparse model for two increments; the
# adaptive line also replaces it when its look-ahead CE on an increment is 1% above the dense model's.
D2S = D2SConfig(
    r=2,
    p=1,
    warmup=2,
    threshold=0.01,
    prune_fraction=0.5,
    aux=AuxConfig(lam=1.75),  # latent step from the latent budget, like every other command
    lines=("fixed", "adaptive", "fixed_mask", "adaptation"),
)
BETA = 0.7
WINDOW_STEPS = 20


def prepare_demo(args: argparse.Namespace) -> Callable[[], int]:
    """Check every setting and open the stream; returns the closure that trains (nothing trains here).

    Raises:
        ValueError: a bad flag value, or a stream too short for the D2S warm-up or the schedules' phases.
        FileNotFoundError: a missing data file.
    """
    job = job_config(args, checkpoint=False)
    stream = make_stream(job)
    increments = math.ceil(stream.num_rows / job.train.increment_rows)
    needed = D2S.first_serving + D2S.r + 1
    if increments < needed:
        raise ValueError(
            f"the demo needs at least {needed} increments (D2S warms up for {D2S.first_serving} and serves "
            f"each sparse model for {D2S.r}); {stream.num_rows} rows in increments of "
            f"{job.train.increment_rows} give {increments}: raise --rows or lower --increment-rows"
        )
    for name in SCHEMES:
        scheme(name).sample_bounds(stream.num_rows, job.train.increment_rows, job.train.batch_size)
    return lambda: run_demo(job, stream)


def _fresh_model(stream: Stream, job: JobConfig) -> nn.Module:
    torch.manual_seed(job.seed)  # every run starts from the same initial weights
    return wrap(build_dlrm(model_config_for(stream, job.model)))


def run_demo(job: JobConfig, stream: Stream) -> int:
    """Train every run, print the comparison tables and write the run folder."""
    torch.set_num_threads(1)  # measured here: tiny matmuls on 2 shared cores run far faster on one thread
    enable_ftz_daz()
    started = time.perf_counter()
    out = Path(job.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = job.train
    print(
        f"demo: {job.data} stream, {stream.num_rows} rows, drift {job.drift}, "
        f"increments of {train.increment_rows} rows, {train.optimizer} lr {train.lr}, "
        f"batch {train.batch_size}, look-ahead window {train.window}"
    )

    print(
        f"\n[1/2] Dense-to-Sparse: r={D2S.r}, p={D2S.p}, warm-up {D2S.first_serving} increments, AUX lambda "
        f"{D2S.aux.lam}; lines {', '.join(D2S.lines)}"
    )
    controller = D2SController(_fresh_model(stream, job), stream, train, D2S)
    d2s = controller.run()
    d2s.write(out / "d2s")
    d2s_table = d2s_rows(d2s)

    print(f"\n[2/2] grow/prune at beta {BETA}: dense, {', '.join(SCHEMES)}")
    results: dict[str, GrowPruneResult] = {}
    models: dict[str, nn.Module] = {}
    for name in ("dense", *SCHEMES):
        print(f"  {name}")
        models[name] = _fresh_model(stream, job)
        plan = PhasePlan.dense() if name == "dense" else scheme(name)
        config = GrowPruneConfig(plan, beta=BETA, window_steps=WINDOW_STEPS, seed=job.seed)
        with MetricsWriter(out / "grow_prune" / name) as writer:
            results[name] = run_grow_prune(models[name], stream, train, config, writer=writer)
    gp_table = grow_prune_rows(results)

    serving = {
        name: line.current.model for name, line in controller.lines.items() if line.current is not None
    }
    denormals = {
        f"d2s/{name}": count_denormals(m) for name, m in {"dense": controller.dense.model, **serving}.items()
    }
    denormals |= {f"grow_prune/{name}": count_denormals(m) for name, m in models.items()}
    _print_report(d2s, d2s_table, gp_table, serving.get("fixed"), models["prune_only"], denormals)
    plots = _plots(out, d2s, results)
    write_csv(d2s_table, out / "comparison_d2s.csv")
    write_csv(gp_table, out / "comparison_grow_prune.csv")
    summary = _summary(job, d2s, d2s_table, results, gp_table, denormals, time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    print(f"\nplots: {', '.join(p.name for p in plots)}")
    print(f"outputs in {out} ({time.perf_counter() - started:.0f} s)")
    return 0


def _print_report(
    d2s: D2SResult,
    d2s_table: list,
    gp_table: list,
    serving: nn.Module | None,
    prune_only: nn.Module,
    denormals: dict[str, int],
) -> None:
    print(f"\nDense-to-Sparse, relative to dense after the warm-up ({d2s.warmup_rows} rows):")
    print(format_table(d2s_table))
    for name, line in d2s.lines.items():
        sparsity = ", ".join(f"{s:.1%}" for s in line.sparsity)
        print(
            f"  {name}: sparse models born at increments {line.births} (sparsity {sparsity}); oldest served "
            f"age {line.max_age} increments"
        )
    print("  (D2S FLOPs/time: serving model + pruning jobs, effective FLOPs; the dense job runs alongside)")
    print(f"\nGrow/prune at beta {BETA}, relative to dense over the whole stream:")
    print(format_table(gp_table))
    if serving is not None:
        print("\nPer-layer sparsity of the D2S (fixed) serving model at the end:")
        print(format_report(sparsity_report(serving)))
    print("\nPer-layer sparsity of the prune-only model at the end (it ends sparse):")
    print(format_report(sparsity_report(prune_only)))
    print(
        "\nDenormal values in the final models (FTZ/DAZ on): "
        + ", ".join(f"{k} {v}" for k, v in denormals.items())
    )


def _plots(out: Path, d2s: D2SResult, results: dict[str, GrowPruneResult]) -> list[Path]:
    lines = {name: line.records for name, line in d2s.lines.items()}
    gp = {name: result.run.records for name, result in results.items() if name != "dense"}
    return [
        plot_window_metric(
            {"dense": d2s.dense, **lines}, out / "d2s_window_ce.png", title="D2S: look-ahead CE"
        ),
        plot_relative_ce(lines, d2s.dense, out / "d2s_relative_ce.png", title="D2S: serving model vs dense"),
        plot_window_metric(
            {"dense": results["dense"].run.records, **gp},
            out / "grow_prune_window_ce.png",
            title="grow/prune",
        ),
        plot_relative_ce(
            gp, results["dense"].run.records, out / "grow_prune_relative_ce.png", title="grow/prune"
        ),
        *plot_phase_curves(results, out, prefix="grow_prune_"),
    ]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _summary(
    job: JobConfig,
    d2s: D2SResult,
    d2s_table: list,
    results: dict[str, GrowPruneResult],
    gp_table: list,
    denormals: dict[str, int],
    seconds: float,
) -> dict:
    def row(r) -> dict:
        return {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(r).items()}

    return {
        "job": asdict(job),
        "d2s": {
            "config": asdict(D2S),
            "warmup_rows": d2s.warmup_rows,
            "table": [row(r) for r in d2s_table],
            "lines": {
                name: {
                    "births": line.births,
                    "sources": line.sources,
                    "sparsity": line.sparsity,
                    "max_age": line.max_age,
                    "gaps": line.gaps,
                }
                for name, line in d2s.lines.items()
            },
        },
        "grow_prune": {
            "beta": BETA,
            "window_steps": WINDOW_STEPS,
            "table": [row(r) for r in gp_table],
            "phases": {name: [p.summary() for p in result.phases] for name, result in results.items()},
        },
        "denormals": denormals,
        "seconds": seconds,
    }
