"""Shared set-up of the pruning benchmarks (``aux_calibration.py``, ``fixed_mask.py``).

The procedure itself (pruning phase, fixed-mask training, lambda search) lives in
``torchrec_prune.pruners.run``; this module only builds the streams and models the benchmarks use and
formats their tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from torchrec_prune.data import SyntheticStream
from torchrec_prune.data.stream import Stream
from torchrec_prune.masks import wrap
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.numerics import enable_ftz_daz
from torchrec_prune.pruners.run import TrainedState, prune_and_train
from torchrec_prune.train.job import model_config_for
from torchrec_prune.train.trainer import TrainConfig, make_optimizer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
TALKINGDATA = REPO.parent / "shared" / "data" / "talkingdata" / "train_sample.csv"


def setup_process() -> None:
    """One intra-op thread (tiny matmuls on a 2-core machine shared with other jobs) and FTZ/DAZ."""
    torch.set_num_threads(1)
    enable_ftz_daz()


def synthetic_stream(rows: int, drift_per_100k: float, seed: int) -> SyntheticStream:
    """The synthetic stream with a drift rate per row that does not depend on its length."""
    return SyntheticStream(rows, drift=drift_per_100k * rows / 100_000, seed=seed)


def reference_model(stream: Stream, seed: int) -> nn.Module:
    """The reference DLRM (DLRMConfig defaults: emb dim 4, bottom 256-128-64-4, top 256-128-1), wrapped,
    with its input shape taken from the stream."""
    torch.manual_seed(seed)
    return wrap(build_dlrm(model_config_for(stream, DLRMConfig())))


def pretrain(
    stream: Stream, rows: int, train: TrainConfig, seed: int
) -> tuple[nn.Module, TrainedState, float]:
    """Train the reference DLRM densely on rows ``[0, rows)``; returns it, its captured state and the NE of
    its last look-ahead window."""
    model = reference_model(stream, seed)
    optimizer = make_optimizer(model.parameters(), train)
    result = prune_and_train(
        model, stream, train, None, stop_row=rows, optimizers=[optimizer], desc="pretrain"
    )
    return model, TrainedState.capture(model, optimizer), result.records[-1].ne


def layer_label(fqn: str) -> str:
    """``bottom0`` .. ``bottom3`` for DLRM's dense arch, ``top0``, ``top1`` for its over arch."""
    parts = fqn.split(".")
    if "dense_arch" in parts:
        return f"bottom{parts[parts.index('_mlp') + 1]}"
    if "over_arch" in parts and "_mlp" in parts:
        return f"top{parts[parts.index('_mlp') + 1]}"
    return fqn


def layer_shapes(model: nn.Module, fqns: Sequence[str]) -> dict[str, str]:
    """``in x out`` of each named Linear."""
    modules = dict(model.named_modules())
    return {f: f"{modules[f].in_features}x{modules[f].out_features}" for f in fqns}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
