"""The main training job: stream + wrapped DLRM + incremental trainer, in one process or on a torchrun rank.

Everything a run produces lands in its run folder: ``config.json``, ``windows.jsonl``/``windows.csv``
(one look-ahead window per line), ``summary.json``, ``window_ce.png`` and a DCP ``checkpoint/``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from torchrec_prune.data import open_stream
from torchrec_prune.data.stream import Stream
from torchrec_prune.distributed.checkpoint import save_checkpoint
from torchrec_prune.distributed.dmp import ShardingConfig, init_distributed, shard
from torchrec_prune.masks import wrap
from torchrec_prune.metrics.writer import MetricsWriter
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.numerics import count_denormals, enable_ftz_daz
from torchrec_prune.plots import plot_window_metric
from torchrec_prune.train.hooks import TrainHook
from torchrec_prune.train.trainer import IncrementalTrainer, RunResult, TrainConfig


@dataclass
class JobConfig:
    """One training job.

    Args:
        data: ``synthetic``, ``criteo:PATH`` or ``talkingdata:PATH``.
        rows: rows of the stream to train on (the synthetic stream's length; a cap for files; 0 = all).
        drift: synthetic drift rate (rotations of the click model over the stream; 0 = stationary).
        seed: seed of the synthetic stream and of model initialisation.
        model: DLRM shape; ``num_dense``/``num_sparse`` follow the stream.
        train: loop settings.
        run_dir: where outputs go.
        checkpoint: save a DCP checkpoint at the end.
    """

    data: str = "synthetic"
    rows: int = 100_000
    drift: float = 1.0
    seed: int = 0
    model: DLRMConfig = field(default_factory=DLRMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = "runs/train"
    checkpoint: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rows, int) or self.rows < 0:
            raise ValueError(f"JobConfig.rows must be an integer >= 0 (0 = whole file), got {self.rows!r}")
        if self.data == "synthetic" and self.rows < 1:
            raise ValueError("JobConfig.rows must be >= 1 for the synthetic stream")
        if not self.drift >= 0:
            raise ValueError(f"JobConfig.drift must be >= 0, got {self.drift!r}")


def make_stream(config: JobConfig) -> Stream:
    """Open the job's stream, capped at ``config.rows``."""
    kwargs = {"num_embeddings": config.model.num_embeddings}
    if config.data == "synthetic":
        kwargs |= {"num_rows": config.rows, "drift": config.drift, "seed": config.seed}
    elif config.rows:
        kwargs["max_rows"] = config.rows
    return open_stream(config.data, **kwargs)


def model_config_for(stream: Stream, model: DLRMConfig) -> DLRMConfig:
    """``model`` with its input shape taken from the stream."""
    return DLRMConfig(
        num_dense=stream.num_dense,
        num_sparse=len(stream.feature_names),
        num_embeddings=stream.num_embeddings,
        embedding_dim=model.embedding_dim,
        dense_arch=list(model.dense_arch),
        over_arch=list(model.over_arch),
        feature_names=list(stream.feature_names),
    )


def sharding_config(train: TrainConfig) -> ShardingConfig:
    """Fused table optimizer matching the dense one (per-element Adagrad, as in one process)."""
    return ShardingConfig(
        fused_optimizer=train.optimizer,
        dense_optimizer=train.optimizer,
        lr=train.lr,
        batch_size=train.batch_size,
    )


HookFactory = Callable[[torch.nn.Module], Sequence[TrainHook]]


def run_job(
    config: JobConfig, hooks: Sequence[TrainHook] | HookFactory = (), stream: Stream | None = None
) -> RunResult:
    """Train once over the stream and write the run folder (rank 0 writes files).

    Under torchrun (``WORLD_SIZE`` > 1) each rank joins the process group, builds the model on ``meta``,
    wraps it and lets DMP shard it; rows are partitioned across ranks without overlap. ``hooks`` may be a
    function of the built (possibly sharded) model, for pruners that need it.
    """
    enable_ftz_daz()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = (
        init_distributed() if distributed else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    rank = dist.get_rank() if distributed else 0
    stream = stream or make_stream(config)
    model_config = model_config_for(stream, config.model)
    torch.manual_seed(config.seed)
    run_dir = Path(config.run_dir)
    if distributed:
        sharded = shard(wrap(build_dlrm(model_config, device="meta")), device, sharding_config(config.train))
        model, optimizers = sharded.model, [sharded.optimizer]
    else:
        model = wrap(build_dlrm(model_config, device=device))
        optimizers = None
    writer = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
        writer = MetricsWriter(run_dir)
    trainer = IncrementalTrainer(
        model,
        config.train,
        optimizers=optimizers,
        hooks=hooks(model) if callable(hooks) else hooks,
        writer=writer,
        device=device,
    )
    start = time.perf_counter()
    try:
        result = trainer.run(stream)
        result.wall_seconds = time.perf_counter() - start
    finally:
        if writer is not None:
            writer.close()
    if config.checkpoint:
        save_checkpoint(model, run_dir / "checkpoint")
    if rank == 0:
        summary = summarize(result, stream, trainer.model)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_window_metric({"model": result.records}, run_dir / "window_ce.png", title=config.data)
    return result


def summarize(result: RunResult, stream: Stream, model: torch.nn.Module) -> dict:
    """Headline figures of a run, for ``summary.json`` and the console."""
    records = result.records
    tail = records[-max(1, len(records) // 4) :] if records else []
    return {
        "samples": result.samples,
        "wall_seconds": result.wall_seconds,
        "samples_per_second": result.samples / result.wall_seconds if result.wall_seconds else None,
        "windows": len(records),
        "last_quarter_ce": sum(r.ce for r in tail) / len(tail) if tail else None,
        "last_quarter_ne": sum(r.ne for r in tail) / len(tail) if tail else None,
        "last_window": _json_safe(records[-1].__dict__) if records else None,
        "malformed_rows": dict(stream.stats.malformed),
        "training_flops": result.flops.actual,
        "dense_training_flops": result.flops.dense,
        "denormals": count_denormals(model),
    }


def _json_safe(values: dict) -> dict:
    """JSON has no NaN (NE/AUC of a single-class window): write ``null`` as the metrics writer does."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def summarize_line(result: RunResult, run_dir: str | Path) -> str:
    """One line for the console."""
    last = result.records[-1] if result.records else None
    figures = (
        f"last window CE {last.ce:.4f} NE {last.ne:.4f} AUC {last.auc:.4f}" if last else "no window closed"
    )
    return f"trained {result.samples} samples in {result.steps} steps; {figures}; outputs in {run_dir}"
