"""Shared pieces of the powered fidelity protocol (``fidelity_*.py``).

The older comparison benchmarks read single short windows from barely trained models, whose noise hides
the papers' margins. This protocol starts every method from one converged dense checkpoint per stream and
seed (pre-trained once, cached on disk, reused across methods and scripts), uses long pruning phases and
long fixed-mask stretches, and reports differences *paired* (same samples, same seed) with a t-interval
over seeds of each seed's mean difference.

Example::

    ckpt = dense_checkpoint(synthetic_spec(seed=0), train)
    model, optimizer = ckpt.load(train)
    ci = t_interval([0.004, 0.006, 0.005])      # {"mean": 0.005, "half": 0.0025, "n": 3, ...}
"""

from __future__ import annotations

import math
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pruning_common import REPO, reference_model
from torch import nn

from torchrec_prune.data import SyntheticStream, open_stream
from torchrec_prune.data.stream import Rows, Stream
from torchrec_prune.pruners.run import TrainedState, prune_and_train
from torchrec_prune.train.trainer import TrainConfig, default_forward, make_optimizer

CACHE = REPO / "runs" / "fidelity_cache"  # git-ignored: pre-trained checkpoints, never data
CRITEO = REPO.parent / "shared" / "data" / "criteo"
# Two-sided 97.5% quantiles of Student's t for df = 1..30 (no scipy in the environment).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def run_tasks(run_task: Callable[[tuple], dict], jobs: Sequence[tuple], workers: int) -> dict:
    """Run every job in ``workers`` spawned processes; the raw report: command line, wall seconds, worker
    count and the tasks' results (in completion order)."""
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        tasks = list(pool.imap_unordered(run_task, jobs))
    return {
        "argv": " ".join(sys.argv[1:]),
        "wall_seconds": time.perf_counter() - started,
        "workers": workers,
        "tasks": tasks,
    }


def t_interval(values: Sequence[float]) -> dict:
    """Mean and 95% t-interval half-width over independent units (seeds); half is inf for one unit."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "half": math.inf, "n": n, "values": list(values)}
    t = _T975[min(n - 1, len(_T975)) - 1] if n - 1 <= len(_T975) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(n)
    return {
        "mean": mean,
        "half": half,
        "low": mean - half,
        "high": mean + half,
        "n": n,
        "values": list(values),
    }


def verdict(ci: dict) -> str:
    """``below 0`` / ``above 0`` when the interval excludes 0, else ``inconclusive``."""
    if ci["n"] < 2:
        return "inconclusive (1 seed)"
    if ci["high"] < 0:
        return "below 0"
    if ci["low"] > 0:
        return "above 0"
    return "inconclusive"


def fmt_ci(ci: dict, scale: float = 100.0, digits: int = 3) -> str:
    """``+0.123 ± 0.045`` (scaled, e.g. to %)."""
    return f"{scale * ci['mean']:+.{digits}f} ± {scale * ci['half']:.{digits}f}"


class OffsetStream(Stream):
    """Rows ``[start, base.num_rows)`` of ``base`` as a stream of their own (schedules that lay phases or
    increments out from row 0 then begin where the dense pre-training stopped)."""

    def __init__(self, base: Stream, start: int) -> None:
        super().__init__()
        self.base, self.start = base, start
        self.num_dense, self.feature_names = base.num_dense, base.feature_names
        self.num_embeddings, self.num_rows = base.num_embeddings, base.num_rows - start

    def _read(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Rows]:
        return self.base._read((a + self.start, b + self.start) for a, b in ranges)


class MemoryStream(Stream):
    """A small file held in memory and replayed ``epochs`` times in order (the Criteo head has 7,200
    training rows: the growth paper's multi-epoch regime, not a stream)."""

    def __init__(self, base: Stream, epochs: int) -> None:
        super().__init__()
        self.rows = next(base._read([(0, base.num_rows)]))
        self.num_dense, self.feature_names = base.num_dense, base.feature_names
        self.num_embeddings, self.num_rows = base.num_embeddings, len(self.rows) * epochs

    def _read(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Rows]:
        n = len(self.rows)
        for a, b in ranges:
            idx = np.arange(a, b) % n
            yield Rows(self.rows.dense[idx], self.rows.ids[idx], self.rows.labels[idx])


@dataclass(frozen=True)
class StreamSpec:
    """What a dense checkpoint was trained on: a synthetic stream or the Criteo head, and its rows."""

    dataset: str
    seed: int
    pretrain_rows: int
    total_rows: int
    drift_per_100k: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.dataset}-s{self.seed}-d{self.drift_per_100k:g}-pre{self.pretrain_rows}"

    def stream(self) -> Stream:
        if self.dataset == "synthetic":
            rows = self.total_rows
            return SyntheticStream(rows, drift=self.drift_per_100k * rows / 100_000, seed=self.seed)
        train = open_stream(f"criteo:{CRITEO / 'kaggle_head_train.tsv'}")
        base = MemoryStream(train, 1)
        return MemoryStream(train, math.ceil(self.total_rows / len(base.rows)))


def criteo_heldout() -> list:
    """The Criteo head's dev and test splits (800 rows) as batches: scored after training, never learned."""
    batches = []
    for split in ("dev", "test"):
        stream = open_stream(f"criteo:{CRITEO / f'kaggle_head_{split}.tsv'}")
        batches += list(stream.batches(1024))
    return batches


@torch.no_grad()
def per_sample_ce(model: nn.Module, batches: Sequence) -> torch.Tensor:
    """Binary cross-entropy of every sample of ``batches`` (eval mode), float64."""
    model.eval()
    out = []
    for batch in batches:
        _, logits = default_forward(model, batch)
        labels = batch.labels.double()
        out.append(
            torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels, reduction="none")
        )
    model.train()
    return torch.cat(out)


@dataclass
class DenseCheckpoint:
    """A converged dense model: its state, and the look-ahead NE of its pre-training windows."""

    spec: StreamSpec
    state: TrainedState
    ne: list[float]

    def load(self, train: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A fresh copy of the model with its optimizer state."""
        model = reference_model(self.spec.stream(), self.spec.seed)
        return model, self.state.restore(model, train)

    def flatness(self) -> float:
        """Relative change of mean NE from the second-last to the last quarter of pre-training windows
        (near 0: converged as far as look-ahead NE can tell)."""
        q = max(1, len(self.ne) // 4)
        last, before = statistics.fmean(self.ne[-q:]), statistics.fmean(self.ne[-2 * q : -q])
        return last / before - 1


def dense_checkpoint(spec: StreamSpec, train: TrainConfig) -> DenseCheckpoint:
    """Pre-train the reference DLRM densely on rows ``[0, pretrain_rows)`` once and cache it."""
    path = CACHE / f"{spec.key}-b{train.batch_size}-lr{train.lr:g}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        return DenseCheckpoint(spec, TrainedState(saved["model"], saved["optimizer"]), saved["ne"])
    stream = spec.stream()
    model = reference_model(stream, spec.seed)
    optimizer = make_optimizer(model.parameters(), train)
    result = prune_and_train(model, stream, train, None, stop_row=spec.pretrain_rows, optimizers=[optimizer])
    state = TrainedState.capture(model, optimizer)
    ne = [r.ne for r in result.records]
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state.model_state, "optimizer": state.optimizer_state, "ne": ne}, tmp)
    tmp.replace(path)
    return DenseCheckpoint(spec, state, ne)


def paired_mean(arm: Sequence[float], ref: Sequence[float], dense: Sequence[float]) -> float:
    """Mean over windows of ``(arm - ref) / dense``: a paired difference of CE relative to dense CE."""
    return statistics.fmean((a - r) / d for a, r, d in zip(arm, ref, dense, strict=True))
