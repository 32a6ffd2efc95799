"""``torchrec-prune``: command-line entry point (train, prune, demo).

Bad input (unknown flags, bad paths, out-of-range values) ends with a one-line error and exit code 2,
before any training starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torchrec_prune.models import DLRMConfig
from torchrec_prune.train.trainer import OPTIMIZERS, TrainConfig

if TYPE_CHECKING:  # the job module pulls in DMP and DCP: imported when a command runs
    from torchrec_prune.train.job import JobConfig


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_stream_args(p: argparse.ArgumentParser, *, rows: int, window: int, increment_rows: int) -> None:
    """Flags shared by every command that trains on a stream."""
    p.add_argument("--data", default="synthetic", help="synthetic | criteo:PATH | talkingdata:PATH")
    p.add_argument("--rows", type=int, default=rows, help="synthetic stream length; cap for files (0 = all)")
    p.add_argument("--drift", type=float, default=1.0, help="synthetic drift rate (0 = stationary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adagrad")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--window", type=int, default=window, help="look-ahead window, in samples")
    p.add_argument("--increment-rows", type=int, default=increment_rows)
    p.add_argument("--num-embeddings", type=int, default=10_000, help="hash size of every table")
    p.add_argument("--embedding-dim", type=int, default=4)
    p.add_argument("--dense-arch", type=_layers, default=None, help="bottom MLP, e.g. 256,128,64,4")
    p.add_argument("--over-arch", type=_layers, default=None, help="top MLP, e.g. 256,128,1")
    p.add_argument("--no-progress", action="store_true")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        window=args.window,
        increment_rows=args.increment_rows,
        progress=not args.no_progress,
    )


def model_config(args: argparse.Namespace) -> DLRMConfig:
    dense = args.dense_arch or [256, 128, 64, args.embedding_dim]
    return DLRMConfig(
        num_embeddings=args.num_embeddings,
        embedding_dim=args.embedding_dim,
        dense_arch=dense,
        over_arch=args.over_arch or [256, 128, 1],
    )


Runner = Callable[[], int]


def job_config(args: argparse.Namespace, *, checkpoint: bool) -> JobConfig:
    """The job described by the stream, model and loop flags (validated by the dataclasses)."""
    from torchrec_prune.train.job import JobConfig

    return JobConfig(
        data=args.data,
        rows=args.rows,
        drift=args.drift,
        seed=args.seed,
        model=model_config(args),
        train=train_config(args),
        run_dir=args.run_dir,
        checkpoint=checkpoint,
    )


def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> Runner:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    from torchrec_prune.train.job import make_stream, run_job, summarize_line

    config = job_config(args, checkpoint=not args.no_checkpoint)
    stream = make_stream(config)  # bad paths and malformed headers fail here, before any training
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return lambda: _relaunch_under_torchrun(args.nproc, argv)

    def run() -> int:
        result = run_job(config, stream=stream)
        if int(os.environ.get("RANK", "0")) == 0:
            print(summarize_line(result, config.run_dir))
        return 0

    return run


def _relaunch_under_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this command as ``nproc`` torchrun ranks on this machine (loopback rendezvous)."""
    rest = [a for i, a in enumerate(argv) if not _is_nproc(argv, i)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "torchrec_prune.cli", *rest]
    return subprocess.call(cmd)


def _is_nproc(argv: Sequence[str], i: int) -> bool:
    a = argv[i]
    return a == "--nproc" or a.startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc")


# Which methods each sparsity knob of ``prune`` applies to (a knob given to another method is an error).
_PRUNE_KNOBS = {
    "lam": ("aux",),
    "eps": ("aux",),
    "sparsity": ("mp", "tp", "mop"),
    "beta": ("taylor-neuron",),
}


def _cmd_prune(args: argparse.Namespace, argv: Sequence[str]) -> Runner:
    from torchrec_prune.pruners.run import PruneConfig, PruneJobConfig, prepare_prune_job, run_prune_job

    knobs = {k: getattr(args, k) for k in _PRUNE_KNOBS if getattr(args, k) is not None}
    prune = PruneConfig(method=args.method, prune_rows=args.prune_rows, **knobs)  # checks every value
    for knob in knobs:
        if args.method not in _PRUNE_KNOBS[knob]:
            methods = "|".join(_PRUNE_KNOBS[knob])
            raise ValueError(f"--{knob} applies to --method {methods}, not {args.method!r}")
    config = PruneJobConfig(
        checkpoint=args.checkpoint,
        job=job_config(args, checkpoint=not args.no_checkpoint),
        prune=prune,
        start_row=args.start_row,
    )
    prepared = prepare_prune_job(config)  # missing checkpoint, bad rows, shape mismatch: before training

    def run() -> int:
        result, table = run_prune_job(prepared)
        print(table)
        last = result.records[-1] if result.records else None
        tail = f"; last window CE {last.ce:.4f}" if last else ""
        print(
            f"{prune.label}: pruned-layer sparsity {result.sparsity:.4f} after {result.phase_steps} steps"
            f"{tail}; outputs in {args.run_dir}"
        )
        return 0

    return run


def _cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> Runner:
    from torchrec_prune.demo import prepare_demo

    return prepare_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrec-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="incremental training of a wrapped DLRM on a stream")
    add_stream_args(train, rows=100_000, window=5_000, increment_rows=20_000)
    train.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun, gloo on CPU)")
    train.add_argument("--run-dir", default="runs/train")
    train.add_argument("--no-checkpoint", action="store_true")
    train.set_defaults(func=_cmd_train)

    prune = sub.add_parser(
        "prune",
        help="prune a trained checkpoint on a stretch of the stream, then train on with the fixed mask",
        description="Load a checkpoint (model flags must match it), prune it on rows [--start-row, "
        "--start-row + --prune-rows) and train on with the fixed mask to the end of the stream. A synthetic "
        "stream continues the one a checkpoint was trained on when the ratio --drift / --rows is the same "
        "(e.g. train --rows 100000 --drift 0.5, then prune --rows 200000 --drift 1 --start-row 100000).",
    )
    add_stream_args(prune, rows=100_000, window=5_000, increment_rows=10_000)
    prune.add_argument("--method", required=True, help="aux | mp | tp | mop | taylor-neuron")
    prune.add_argument("--checkpoint", required=True, help="DCP checkpoint folder, e.g. RUN/checkpoint")
    prune.add_argument("--lam", type=float, default=None, help="AUX sparsity penalty lambda (default 1.75)")
    prune.add_argument("--eps", type=float, default=None, help="AUX latent-score step (default 0.05)")
    prune.add_argument("--sparsity", type=float, default=None, help="MP/TP/MoP per-layer target (0.8)")
    prune.add_argument("--beta", type=float, default=None, help="taylor-neuron pruned fraction (default 0.5)")
    prune.add_argument("--prune-rows", type=int, default=20_000, help="rows of the pruning phase")
    prune.add_argument("--start-row", type=int, default=0, help="first row of the pruning phase")
    prune.add_argument("--run-dir", default="runs/prune")
    prune.add_argument("--no-checkpoint", action="store_true", help="do not save the pruned model")
    prune.set_defaults(func=_cmd_prune)

    demo = sub.add_parser("demo", help="the main job on the built-in synthetic stream")
    add_stream_args(demo, rows=60_000, window=3_000, increment_rows=10_000)
    demo.add_argument("--run-dir", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags: argparse prints one line and exits 2
    prepare: Callable[[argparse.Namespace, Sequence[str]], Runner] = args.func
    try:
        runner = prepare(args, argv)  # validation only: nothing has trained yet
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        parser.exit(2, f"torchrec-prune: error: {e}\n")
    return runner()


if __name__ == "__main__":
    sys.exit(main())
