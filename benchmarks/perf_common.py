"""Shared pieces of the ``perf_*`` benchmarks: the reference DLRM's batches, interleaved timing of arms,
and one results file per benchmark.

Arms are timed side by side in one process, round by round in turn (A B C, C A B, ...), each round a
fixed number of steps, so a slow spell of a shared machine hits every arm of that round alike. The order
within a round is shuffled (seeded), so that no arm always runs right after the same other arm and finds
the CPU's caches as that arm left them. A ratio is the
median over rounds of the per-round ratio, and the ratio of total times with its 95% interval over
rounds. CPU time (``time.thread_time``) is reported beside wall time: it leaves out time the thread
waited for a core that another process held.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchrec.datasets.utils import Batch

from torchrec_prune.data.stream import Stream
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.models import DLRMConfig
from torchrec_prune.train.job import JobConfig, PreparedJob, build_replica
from torchrec_prune.train.replica import Replica
from torchrec_prune.train.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"


def reference_batches(batch_size: int, count: int, num_embeddings: int = 10_000) -> list[Batch]:
    """``count`` batches of the synthetic stream, read once so that no arm pays for reading."""
    stream = SyntheticStream(batch_size * count, num_embeddings=num_embeddings, drift=1.0, seed=0)
    return list(stream.batches(batch_size))


def job_replica(stream: Stream, train: TrainConfig) -> Replica:
    """The replica a job trains on ``stream``, as ``train`` builds it (``replica_factory``: wrapped layers,
    tables in a ``FusedEmbeddingBagCollection`` in one process, DMP-sharded on a group of several ranks)."""
    job = JobConfig(rows=stream.num_rows, train=train, checkpoint=False, checkpoint_every=0)
    return build_replica(PreparedJob(job, stream, {}, None), torch.device("cpu"))


def reference_config(num_embeddings: int = 10_000) -> DLRMConfig:
    """The reference DLRM (emb dim 4, bottom 256-128-64-4, top 256-128-1, 26 tables)."""
    return DLRMConfig(num_embeddings=num_embeddings)


@dataclass
class Timing:
    """Per-round seconds of one arm."""

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


def interleave(arms: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, Timing]:
    """Run every arm's round once per round, in an order shuffled per round; per-round thread CPU and
    wall seconds."""
    timings = {name: Timing() for name in arms}
    order = list(arms)
    rng = random.Random(0)
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            run_round = arms[name]
            cpu, wall = time.thread_time(), time.perf_counter()
            run_round()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            if r >= warmup:
                timings[name].cpu.append(cpu)
                timings[name].wall.append(wall)
    return timings


def ratio(timings: dict[str, Timing], arm: str, base: str, kind: str = "cpu") -> dict[str, float]:
    """Median, min and max over rounds of ``arm``'s time over ``base``'s in the same round; and the ratio
    of the two arms' total times (``total``) with a 95% interval from resampling the rounds in pairs
    (``low``, ``high``): single rounds swing by tens of percent here, and the total is the steadier
    figure."""
    pairs = list(zip(getattr(timings[arm], kind), getattr(timings[base], kind), strict=True))
    per_round = [a / b for a, b in pairs]
    rng = random.Random(0)
    draws = sorted(
        sum(a for a, _ in sample) / sum(b for _, b in sample)
        for sample in (rng.choices(pairs, k=len(pairs)) for _ in range(4000))
    )
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
        "total": sum(a for a, _ in pairs) / sum(b for _, b in pairs),
        "low": draws[100],
        "high": draws[3899],
    }


def machine() -> dict[str, object]:
    """Where and when a measurement ran, and the load on the machine's cores when it ended."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average": os.getloadavg()[0],  # every process on the cores, this one included
    }


def write_results(name: str, payload: dict[str, object]) -> Path:
    """``docs/results/<name>.json`` with the machine and command added."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
