"""The ``compress`` and ``export`` commands: UMEC under a FLOPs budget, fine-tuning, and a plain model.

``compress`` trains a wrapped DLRM (fresh, or loaded from ``--checkpoint``) on the stream with UMEC for
``--umec-rows`` rows from ``--start-row``, removes the groups UMEC chose (the model then fits the
budget), fine-tunes the smaller model with the fixed masks to the end of the stream (on physically
smaller layers, ``torchrec_prune.masks.compact``, unless ``--no-compact``), and writes the run
folder: ``config.json``, ``windows.jsonl``/``.csv``, ``allocation.json`` (the groups removed per layer
over the phase), ``summary.json``, ``window_ce.png``, the masked model as a DCP ``checkpoint/`` and
the compacted plain model ``exported.pt`` (``torchrec_prune.export``). Every batch is scored before it
is learned, as in every other command. Single process.

``export`` turns a checkpoint of any structured-masked DLRM (``compress``, ``prune --method
taylor-neuron``, ...) into ``--out``, loadable with torch and torchrec alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from torchrec_prune.data.stream import Stream
from torchrec_prune.distributed.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from torchrec_prune.masks import wrap
from torchrec_prune.masks.compact import compact_, expand_
from torchrec_prune.masks.export import export, save_exported
from torchrec_prune.metrics.window import WindowRecord
from torchrec_prune.metrics.writer import MetricsWriter, write_text_atomic
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.numerics import enable_ftz_daz
from torchrec_prune.plots import plot_window_metric
from torchrec_prune.pruners.run import stretch_increments
from torchrec_prune.pruners.schedules import check_steps
from torchrec_prune.pruners.umec import UMECConfig, UMECPruner
from torchrec_prune.train.flops import FlopsTotals, fc_flops
from torchrec_prune.train.job import JobConfig, check_run_dir, make_stream, model_config_for
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, make_optimizer


@dataclass
class CompressConfig:
    """A compress job.

    Args:
        job: stream, model shape, loop settings and run folder (``job.checkpoint``: save the masked model).
        umec: budget and UMEC steps (``phase_steps`` is set from ``umec_rows``).
        umec_rows: rows of the UMEC phase (>= 1); fine-tuning runs from its end to the end of the stream.
        start_row: first row of the UMEC phase (>= 0).
        checkpoint: DCP checkpoint of a trained wrapped DLRM to start from (``None``: a fresh model).
        compact: fine-tune on physically smaller layers (``torchrec_prune.masks.compact``): the same
            numbers as the masked forward, a step the cost of a model of the kept sizes.
    """

    job: JobConfig
    umec: UMECConfig
    umec_rows: int = 20_000
    start_row: int = 0
    checkpoint: str | None = None
    compact: bool = True

    def __post_init__(self) -> None:
        check_steps("CompressConfig (--umec-rows)", "umec_rows", self.umec_rows)
        if not isinstance(self.compact, bool):
            raise ValueError(f"CompressConfig.compact must be a bool, got {self.compact!r}")
        if isinstance(self.start_row, bool) or not isinstance(self.start_row, int) or self.start_row < 0:
            raise ValueError(f"--start-row must be an integer >= 0, got {self.start_row!r}")


@dataclass
class PreparedCompress:
    """A compress job whose stream is open, whose model is built (and loaded) and whose pruner accepted
    the budget: nothing has trained yet."""

    config: CompressConfig
    stream: Stream
    model: nn.Module
    pruner: UMECPruner


@dataclass
class CompressResult:
    """What a compress run produced.

    Args:
        records: look-ahead windows from the first UMEC batch to the end.
        umec_samples: samples of the UMEC phase (windows ending at or before it lie inside it).
        allocation: per group layer, ``(groups removed, groups)``.
        flops_fraction: FC FLOPs of the exported model over the dense model's.
        flops: training FLOPs integrated over the run (masked model).
        wall_seconds: time spent training.
    """

    records: list[WindowRecord]
    umec_samples: int
    allocation: dict[str, tuple[int, int]]
    flops_fraction: float
    flops: FlopsTotals
    wall_seconds: float


def build_model(job: JobConfig, stream: Stream, checkpoint: str | None) -> nn.Module:
    """The job's wrapped DLRM, seeded by the job, holding ``checkpoint`` when one is given.

    Raises:
        ValueError: the checkpoint's keys or shapes differ from the model's (one line).
        FileNotFoundError: no checkpoint at the path.
    """
    torch.manual_seed(job.seed)
    model = wrap(build_dlrm(model_config_for(stream, job.model)))
    if checkpoint is not None:
        try:
            load_checkpoint(model, checkpoint)
        except CheckpointMismatchError as e:
            raise ValueError(e.one_line()) from e
    return model


def prepare_compress(config: CompressConfig) -> PreparedCompress:
    """Check every input and build the pruner (budget checks included) before anything trains.

    Raises:
        ValueError: rows that do not fit the stream, a budget outside (0, 1] or below the smallest
            model that keeps one group per layer, a checkpoint of another model, a run folder to protect.
        FileNotFoundError: a missing data file or checkpoint.
    """
    stream = make_stream(config.job)
    stop = config.start_row + config.umec_rows
    if stop > stream.num_rows:
        raise ValueError(
            f"--start-row + --umec-rows = {stop} exceeds the {stream.num_rows} rows of the stream"
        )
    if config.checkpoint is not None:
        checkpoint, run_dir = Path(config.checkpoint).resolve(), Path(config.job.run_dir).resolve()
        if checkpoint.is_relative_to(run_dir):
            raise ValueError(
                f"--checkpoint {config.checkpoint!r} lies inside --run-dir {config.job.run_dir!r}: the run "
                "would write over the model it starts from; give another --run-dir"
            )
    model = build_model(config.job, stream, config.checkpoint)
    batches = stream.num_batches(
        config.job.train.batch_size, start_row=config.start_row, num_rows=config.umec_rows
    )
    umec = dataclasses.replace(config.umec, phase_steps=batches)
    return PreparedCompress(config, stream, model, UMECPruner(model, umec))


def compress_and_train(
    prepared: PreparedCompress,
    writer: MetricsWriter | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> CompressResult:
    """UMEC on the phase's rows, removal of the chosen groups, fine-tuning with fixed masks to the end
    (compacted unless ``config.compact`` is off; the model is full size again when this returns)."""
    config, stream, model, pruner = prepared.config, prepared.stream, prepared.model, prepared.pruner
    train: TrainConfig = config.job.train
    dense_flops = fc_flops(model).dense_forward
    trainer = IncrementalTrainer(
        model,
        train,
        optimizers=[optimizer or make_optimizer(model.parameters(), train)],
        hooks=[pruner],
        writer=writer,
    )
    umec_stop = config.start_row + config.umec_rows
    stretches = [(config.start_row, umec_stop, "umec"), (umec_stop, stream.num_rows, "fine-tune")]
    started = time.perf_counter()
    index = 0
    for first, last, phase in stretches:
        trainer.ctx.phase = phase
        for increment in stretch_increments(
            stream, first, last, train.increment_rows, train.batch_size, index
        ):
            trainer.train_increment(increment)
            index += 1
        pruner.finalize(trainer.optimizers)  # no-op once the pruner finalized itself at its last step
        if phase == "umec" and config.compact:
            compact_(model, trainer.optimizers)
    expand_(model)
    flushed = trainer.window.flush()
    if flushed is not None:
        trainer.result.records.append(flushed)
        if writer is not None:
            writer.write(flushed)
    plain, _ = export(model)
    return CompressResult(
        records=trainer.result.records,
        umec_samples=config.umec_rows,
        allocation=pruner.allocation(),
        flops_fraction=fc_flops(plain).forward / dense_flops,
        flops=trainer.flops.totals,
        wall_seconds=time.perf_counter() - started,
    )


def run_compress_job(prepared: PreparedCompress) -> str:
    """Run the job, write its folder; one line for the console."""
    enable_ftz_daz()
    config = prepared.config
    run_dir = Path(config.job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(asdict(config), indent=2))
    with MetricsWriter(run_dir) as writer:
        result = compress_and_train(prepared, writer)
    plain, mapping = export(prepared.model)
    save_exported(plain, mapping, run_dir / "exported.pt")
    if config.job.checkpoint:
        save_checkpoint(prepared.model, run_dir / "checkpoint")
    history = {
        "layers": {name: n for name, (_, n) in result.allocation.items()},
        "steps": prepared.pruner.history,
    }
    write_text_atomic(run_dir / "allocation.json", json.dumps(history, indent=2))
    records = result.records
    tail = records[-max(1, len(records) // 4) :] if records else []
    summary = {
        "budget": config.umec.budget,
        "bytes_budget": config.umec.bytes_budget,
        "exported_flops_fraction": result.flops_fraction,
        "compression_ratio": 1.0 - result.flops_fraction,
        "allocation": {name: {"removed": k, "groups": n} for name, (k, n) in result.allocation.items()},
        "umec_samples": result.umec_samples,
        "samples": records[-1].samples_end if records else 0,
        "wall_seconds": result.wall_seconds,
        "last_window_ce": records[-1].ce if records else None,
        "last_quarter_ce": sum(r.ce for r in tail) / len(tail) if tail else None,
        "training_flops": result.flops.actual,
        "dense_training_flops": result.flops.dense,
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    plot_window_metric(
        {f"umec(budget={config.umec.budget:g})": records}, run_dir / "window_ce.png", title=config.job.data
    )
    last = f"; last window CE {records[-1].ce:.4f}" if records else ""
    return (
        f"umec(budget={config.umec.budget:g}): exported model at {result.flops_fraction:.4f} of dense FC "
        f"FLOPs (CR {1 - result.flops_fraction:.4f}){last}; outputs in {run_dir}"
    )


# --------------------------------------------------------------------------------------------------
# export


def job_of_run(config_path: str | Path) -> JobConfig:
    """The ``JobConfig`` recorded in a run folder's ``config.json`` (any command's).

    Raises:
        FileNotFoundError: no such file.
        ValueError: it records no job.
    """
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file (the run's config.json)")
    try:
        saved = json.loads(path.read_text())
        job = saved.get("job", saved)
        model, train = DLRMConfig(**job["model"]), TrainConfig(**job["train"])
        return JobConfig(
            data=job["data"], rows=job["rows"], drift=job["drift"], seed=job["seed"], model=model, train=train
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--config {str(path)!r} records no training job ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------
# command line


def add_compress_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``compress`` and ``export`` with the ``torchrec-prune`` parser."""
    from torchrec_prune.cli import add_overwrite_arg, add_stream_args, job_config  # cli registers us

    p = sub.add_parser(
        "compress",
        help="UMEC under a FLOPs budget, then fine-tuning; writes the compacted plain model",
        description="Train with UMEC on rows [--start-row, --start-row + --umec-rows) (learning which "
        "features, embedding columns and neurons to remove within --budget of the dense FC FLOPs), remove "
        "them, fine-tune to the end of the stream, and export the plain model to RUN/exported.pt.",
    )
    add_stream_args(p, rows=100_000, window=5_000, increment_rows=10_000)
    p.add_argument("--budget", type=float, required=True, help="FC FLOPs allowed, fraction of dense, (0, 1]")
    p.add_argument(
        "--bytes-budget", type=float, default=None, help="parameter bytes allowed, fraction, (0, 1]"
    )
    p.add_argument("--umec-rows", type=int, default=20_000, help="rows of the UMEC phase")
    p.add_argument("--start-row", type=int, default=0, help="first row of the UMEC phase")
    p.add_argument("--checkpoint", default=None, help="DCP checkpoint of a trained model to start from")
    for name, default, what in (
        ("eta1", 0.1, "proximal step"),
        ("eta2", 0.01, "Adam step of s (fraction of a layer per step)"),
        ("eta3", 0.1, "ascent step of the sparsity duals"),
        ("eta4", 100.0, "ascent step of the resource duals"),
    ):
        p.add_argument(f"--{name}", type=float, default=default, help=f"UMEC {what} ({default:g})")
    p.add_argument("--run-dir", default="runs/compress")
    p.add_argument("--no-checkpoint", action="store_true", help="do not save the masked model checkpoint")
    p.add_argument(
        "--no-compact",
        action="store_true",
        help="fine-tune with the masked forward instead of compacted layers (same results, slower)",
    )
    add_overwrite_arg(p)

    def prepare(args: argparse.Namespace, argv: Sequence[str]):
        umec = UMECConfig(
            budget=args.budget,
            bytes_budget=args.bytes_budget,
            eta1=args.eta1,
            eta2=args.eta2,
            eta3=args.eta3,
            eta4=args.eta4,
        )  # checks every value
        config = CompressConfig(
            job=job_config(args, checkpoint=not args.no_checkpoint),
            umec=umec,
            umec_rows=args.umec_rows,
            start_row=args.start_row,
            checkpoint=args.checkpoint,
            compact=not args.no_compact,
        )
        check_run_dir(args.run_dir, asdict(config), resuming=False, overwrite=args.overwrite)
        prepared = prepare_compress(config)

        def run() -> int:
            print(run_compress_job(prepared))
            return 0

        return run

    p.set_defaults(func=prepare)

    e = sub.add_parser(
        "export",
        help="compact a structured-masked checkpoint into a plain TorchRec model (torch.save file)",
        description="Remove closed neurons, gated features and embedding columns closed in every table "
        "from a checkpoint's model and save it to --out; it loads with torch and torchrec alone: "
        "torch.load(OUT, weights_only=False)['model'].",
    )
    e.add_argument("--checkpoint", required=True, help="DCP checkpoint folder, e.g. RUN/checkpoint")
    e.add_argument("--out", required=True, help="file to write, e.g. model.pt")
    e.add_argument("--config", default=None, help="the run's config.json (default: next to the checkpoint)")
    e.add_argument("--overwrite", dest="replace_out", action="store_true", help="replace --out if it exists")

    def prepare_export(args: argparse.Namespace, argv: Sequence[str]):
        out = Path(args.out)
        if out.is_dir():
            raise IsADirectoryError(f"--out {args.out!r} is a folder; give a file path")
        if out.exists() and not args.replace_out:
            raise ValueError(f"--out {args.out!r} exists; give another path or --overwrite")
        checkpoint = Path(args.checkpoint)
        job = job_of_run(args.config or checkpoint.parent / "config.json")
        if not (checkpoint / ".metadata").is_file():
            raise FileNotFoundError(
                f"--checkpoint {args.checkpoint!r}: no DCP checkpoint there (missing .metadata)"
            )
        model = build_model(job, make_stream(job), args.checkpoint)
        plain, mapping = export(model)  # nothing to remove: an error here, before anything is written

        def run() -> int:
            save_exported(plain, mapping, out)
            before, after = fc_flops(model).dense_forward, fc_flops(plain).forward
            print(f"exported to {out}: {after / before:.4f} of the dense model's FC FLOPs")
            return 0

        return run

    e.set_defaults(func=prepare_export, run_dir=None)
