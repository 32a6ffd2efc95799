"""``torchrec-prune``: command-line entry point (training paradigms, pruning, Ray jobs).

Commands: train, grow-prune, d2s, prune, compress, export, demo, ray-train, ray-submit, ray-status,
ray-logs.

Bad input (unknown flags, bad paths, out-of-range or non-finite values, flags that do not apply, data
files without valid rows, a torn checkpoint, a run folder holding another run or whose checkpoint another
model or other settings wrote) ends with a one-line error and exit code 2, before any training starts
and before anything is written. A run that fails later (a non-finite loss, a rank that stops answering
for ``--timeout`` seconds) ends with a one-line error and exit code 1. Commands that train on a stream
run in one process, as ``--nproc N`` local torchrun ranks, or as ranks of an outside ``torchrun`` (see
``launch/``); they write full-state run checkpoints and resume from the newest one of their run folder
on (re)start. Each rank logs to stderr and to its run folder (``log.txt``, ``log-rank<r>.txt``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, NoReturn

from torchrec_prune.distributed.checkpoint import CheckpointMismatchError
from torchrec_prune.models import DLRMConfig
from torchrec_prune.train.optimizer_state import REGROWN_STATES
from torchrec_prune.train.trainer import OPTIMIZERS, NonFiniteError, TrainConfig

if TYPE_CHECKING:  # the job module pulls in DMP and DCP: imported when a command runs
    from torchrec_prune.train.job import JobConfig, PreparedJob


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (with where to find the usage), like every other input error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def add_run_args(p: argparse.ArgumentParser, *, run_dir: str) -> None:
    """Flags of commands that train a run folder: ranks, restarts, run checkpoints and resumption."""
    p.add_argument("--run-dir", default=run_dir)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun, gloo on CPU)")
    p.add_argument(
        "--max-restarts", type=int, default=0, help="with --nproc: torchrun restarts of the rank group"
    )
    p.add_argument("--no-checkpoint", action="store_true", help="do not save the final model checkpoint")
    add_resume_args(p)
    add_overwrite_arg(p)
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds ranks wait for each other before the job ends"
    )


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """Flags of run checkpoints and resumption (every command that writes a run folder it can resume)."""
    p.add_argument(
        "--checkpoint-every", type=int, default=100_000, help="rows between full-state checkpoints (0 = off)"
    )
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete run checkpoints kept")
    p.add_argument(
        "--resume",
        choices=("auto", "never"),
        default="auto",
        help="auto: continue from the newest complete run checkpoint of --run-dir; never: start over",
    )


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run in --run-dir (default: refuse to touch it)"
    )


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
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        keep_checkpoints=getattr(args, "keep_checkpoints", 2),
        resume=getattr(args, "resume", "never"),
        timeout=getattr(args, "timeout", 1800.0),
    )


def _world_size(args: argparse.Namespace) -> int:
    if "LOCAL_RANK" in os.environ:  # a rank of torchrun: its launcher chose the ranks
        if args.overwrite:
            raise ValueError(
                "--overwrite does not apply under an outside torchrun (a restarted rank would delete the "
                "checkpoint it must resume from): empty the run folder before starting the job"
            )
        return int(os.environ.get("WORLD_SIZE", args.nproc))
    cores = len(os.sched_getaffinity(0))
    if not 1 <= args.nproc <= cores:
        raise ValueError(f"--nproc must be in [1, {cores}] (CPU cores this process has), got {args.nproc}")
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    return args.nproc


MAX_LR = 1000.0  # far above any learning rate that trains (MLPerf DLRM's SGD uses 24); 1e30 is a typo
# Flags that mean something only with another setting: given without it, they are an error, not ignored.
_APPLIES = {
    "--momentum": ("--optimizer sgd", lambda a: a.optimizer == "sgd"),
    "--drift": ("--data synthetic", lambda a: a.data == "synthetic"),
    "--max-restarts": ("--nproc > 1", lambda a: a.nproc > 1),
    "--threshold": ("--mode adaptive", lambda a: a.mode == "adaptive"),
    "--min-age": ("--mode adaptive", lambda a: a.mode == "adaptive"),
}


def check_flags(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Refuse non-finite numbers, and flags given where they do not apply.

    Raises:
        ValueError: naming the flag and the accepted form.
    """
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
    if not getattr(args, "lr", 1.0) <= MAX_LR:
        raise ValueError(f"--lr must be in (0, {MAX_LR:g}], got {args.lr!r}")
    own = list(argv[: argv.index("--")] if "--" in argv else argv)  # after "--": another command's flags
    for flag, (needs, applies) in _APPLIES.items():
        if any(_is_flag(own, i, (flag,)) for i in range(len(own))) and not applies(args):
            raise ValueError(f"{flag} applies only with {needs}")


def _prepare_run(
    args: argparse.Namespace,
    argv: Sequence[str],
    extra: dict | None,
    train: Callable[[PreparedJob], int],
    check: Callable[[PreparedJob, int], None] | None = None,
    replica: str = "model",
) -> Runner:
    """Check the job (and a resume of it) here, then run ``train(prepared)`` here or under torchrun.

    With ``--overwrite`` ``main`` empties the run folder once, after every check passed; the torchrun
    ranks then start in an empty folder (and resume from their own checkpoints after a restart).
    """
    from torchrec_prune.train.job import check_run_dir, prepare_job

    world_size = _world_size(args)
    config = job_config(args, checkpoint=not args.no_checkpoint)
    # bad paths, malformed headers, a resume into another model or other settings: fail here
    prepared = prepare_job(
        config, extra=extra, world_size=world_size, replica=replica, overwrite=args.overwrite
    )
    resuming = prepared.resume_from is not None
    check_run_dir(args.run_dir, prepared.settings, resuming=resuming, overwrite=args.overwrite)
    if check is not None:
        check(prepared, world_size)

    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return lambda: _relaunch_under_torchrun(args.nproc, args.max_restarts, argv)
    return lambda: train(prepared)


def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> Runner:
    from torchrec_prune.train.job import run_job, summarize_line

    def train(prepared: PreparedJob) -> int:
        result = run_job(prepared)
        if int(os.environ.get("RANK", "0")) == 0:
            print(summarize_line(result, prepared.config.run_dir))
        return 0

    return _prepare_run(args, argv, None, train)


_SCHEMES = {"alternate": "alternate", "prune-only": "prune_only", "grow-only": "grow_only", "dsd": "dsd"}


def _cmd_grow_prune(args: argparse.Namespace, argv: Sequence[str]) -> Runner:
    from torchrec_prune.schedules.grow_prune import GrowPruneConfig
    from torchrec_prune.schedules.phases import scheme

    config = GrowPruneConfig(
        plan=scheme(_SCHEMES[args.scheme]),
        beta=args.beta,
        window_steps=args.window_steps,
        seed=args.seed,
        compact=not args.no_compact,
        regrown_state=args.regrown_state,
    )  # checks beta and the importance window
    extra = {
        "grow_prune": {
            "scheme": args.scheme,
            "beta": args.beta,
            "window_steps": args.window_steps,
            "regrown_state": args.regrown_state,
        }
    }

    def check(prepared: PreparedJob, world_size: int) -> None:  # every phase must be non-empty
        loop = prepared.config.train
        config.plan.sample_bounds(prepared.stream.num_rows, loop.increment_rows, loop.batch_size * world_size)

    def train(prepared: PreparedJob) -> int:
        from torchrec_prune.schedules.jobs import run_grow_prune_job

        line = run_grow_prune_job(prepared, config)
        if int(os.environ.get("RANK", "0")) == 0:
            print(line)
        return 0

    return _prepare_run(args, argv, extra, train, check)


def _cmd_d2s(args: argparse.Namespace, argv: Sequence[str]) -> Runner:
    from torchrec_prune.pruners.aux import AuxConfig
    from torchrec_prune.schedules.d2s import D2SConfig

    lines = (args.mode, "fixed_mask") if args.with_baseline else (args.mode,)
    config = D2SConfig(
        r=args.r,
        p=args.p,
        threshold=args.threshold,
        min_age=args.min_age,
        warmup=args.warmup,
        prune_fraction=args.prune_fraction,
        aux=AuxConfig(lam=args.lam, eps=args.eps),
        lines=lines,
    )  # checks r >= p >= 1, the threshold, warm-up and AUX settings
    extra = {"d2s": {k: getattr(args, k) for k in _D2S_FLAGS}}

    def check(prepared: PreparedJob, world_size: int) -> None:
        loop = prepared.config.train
        increments = -(-prepared.stream.num_rows // loop.increment_rows)
        if increments <= config.first_serving:
            raise ValueError(
                f"--rows: {prepared.stream.num_rows} rows give {increments} increments of "
                f"{loop.increment_rows}, but D2S warms up for {config.first_serving}; use more rows or "
                "smaller --increment-rows"
            )

    def train(prepared: PreparedJob) -> int:
        from torchrec_prune.schedules.jobs import run_d2s_job

        text = run_d2s_job(prepared, config)
        if int(os.environ.get("RANK", "0")) == 0:
            print(text)
        return 0

    return _prepare_run(args, argv, extra, train, check, replica="dense")


_EPS_HELP = (
    "AUX latent-score step (default: latent budget 10 / pruning-phase steps, so lambda alone sets sparsity)"
)
_D2S_FLAGS = (
    "r", "p", "mode", "threshold", "min_age", "warmup", "prune_fraction", "lam", "eps", "with_baseline"
)  # fmt: skip


def _relaunch_under_torchrun(nproc: int, max_restarts: int, argv: Sequence[str]) -> int:
    """Re-run this command as ``nproc`` torchrun ranks on this machine (loopback rendezvous).

    ``--overwrite`` is not passed on: the folder was emptied here.
    """
    rest = [a for i, a in enumerate(argv) if not _is_flag(argv, i, ("--nproc", "--max-restarts"))]
    rest = [a for a in rest if a != "--overwrite"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # "--" ends torchrun's own options: it would read "--r" as an abbreviation of "--rdzv-*"
    cmd += [f"--max-restarts={max_restarts}", "-m", "--", "torchrec_prune.cli", *rest]
    return subprocess.call(cmd)


def _is_flag(argv: Sequence[str], i: int, flags: tuple[str, ...]) -> bool:
    """Whether ``argv[i]`` is one of ``flags`` (``--flag V`` or ``--flag=V``) or its value."""
    a = argv[i]
    return a in flags or a.startswith(tuple(f"{f}=" for f in flags)) or (i > 0 and argv[i - 1] in flags)


# Which methods each sparsity knob of ``prune`` applies to (a knob given to another method is an error).
_PRUNE_KNOBS = {
    "lam": ("aux",),
    "eps": ("aux",),
    "sparsity": ("mp", "tp", "mop"),
    "beta": ("taylor-neuron",),
}


def _cmd_prune(args: argparse.Namespace, argv: Sequence[str]) -> Runner:
    from torchrec_prune.pruners.run import PruneConfig, PruneJobConfig, prepare_prune_job, run_prune_job
    from torchrec_prune.train.job import check_run_dir

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
    # missing or torn checkpoint, bad rows, shape mismatch, a run folder to protect: before training
    prepared = prepare_prune_job(config)
    check_run_dir(args.run_dir, asdict(config), resuming=False, overwrite=args.overwrite)

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
    """The demo regenerates its folder on every run (``make demo`` twice must work), so only the
    folder's writability is checked."""
    from torchrec_prune.demo import prepare_demo
    from torchrec_prune.train.job import check_writable

    check_writable(args.run_dir)
    return prepare_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchrec-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="incremental training of a wrapped DLRM on a stream")
    add_stream_args(train, rows=100_000, window=5_000, increment_rows=20_000)
    add_run_args(train, run_dir="runs/train")
    train.set_defaults(func=_cmd_train)

    grow = sub.add_parser(
        "grow-prune",
        help="alternate grow/prune (or a baseline scheme) of MLP neurons while training on a stream",
        description="Train on the stream under a growth-paper scheme: neurons of every hidden layer are "
        "pruned by Taylor importance entering each sparse phase and regrown at exactly zero leaving it.",
    )
    add_stream_args(grow, rows=100_000, window=5_000, increment_rows=20_000)
    add_run_args(grow, run_dir="runs/grow_prune")
    grow.add_argument("--scheme", choices=tuple(_SCHEMES), default="alternate")
    grow.add_argument("--beta", type=float, default=0.7, help="fraction of neurons pruned in sparse phases")
    grow.add_argument("--window-steps", type=int, default=50, help="batches of Taylor importance")
    grow.add_argument(
        "--no-compact",
        action="store_true",
        help="train sparse phases with the masked forward instead of compacted layers (same results, slower)",
    )
    grow.add_argument(
        "--regrown-state",
        choices=REGROWN_STATES,
        default="reset",
        help="optimizer state of regrown weights: reset (SPEC 3: Adagrad's sum at its initial value) or "
        "layer_mean (accumulators at the mean of the layer's weights that stayed open)",
    )
    grow.set_defaults(func=_cmd_grow_prune)

    d2s = sub.add_parser(
        "d2s",
        help="Dense-to-Sparse: a dense job, AUX pruning jobs and a serving line on one stream",
        description="Train a dense model on every increment; every --r increments (or earlier in "
        "adaptive mode) an AUX pruning job cuts a sparse serving model from the dense snapshot --p "
        "increments back, trained on those increments; the serving model is scored look-ahead on every "
        "increment before it trains on it.",
    )
    add_stream_args(d2s, rows=200_000, window=5_000, increment_rows=20_000)
    add_run_args(d2s, run_dir="runs/d2s")
    d2s.add_argument("--r", type=int, default=4, help="increments each sparse model serves")
    d2s.add_argument("--p", type=int, default=2, help="increments back of the snapshot pruned")
    d2s.add_argument("--mode", choices=("fixed", "adaptive"), default="fixed")
    d2s.add_argument("--threshold", type=float, default=0.01, help="adaptive: relative CE gap to re-prune")
    d2s.add_argument(
        "--min-age", type=int, default=None, help="adaptive: increments served before an early re-prune (p)"
    )
    d2s.add_argument("--warmup", type=int, default=None, help="increments before the first sparse model")
    d2s.add_argument("--prune-fraction", type=float, default=0.5, help="share of the p increments pruning")
    d2s.add_argument("--lam", type=float, default=1.75, help="AUX sparsity penalty lambda")
    d2s.add_argument("--eps", type=float, default=None, help=_EPS_HELP)
    d2s.add_argument(
        "--with-baseline", action="store_true", help="also run the single fixed-mask AUX model (baseline)"
    )
    d2s.set_defaults(func=_cmd_d2s)

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
    prune.add_argument("--eps", type=float, default=None, help=_EPS_HELP)
    prune.add_argument("--sparsity", type=float, default=None, help="MP/TP/MoP per-layer target (0.8)")
    prune.add_argument("--beta", type=float, default=None, help="taylor-neuron pruned fraction (default 0.5)")
    prune.add_argument("--prune-rows", type=int, default=20_000, help="rows of the pruning phase")
    prune.add_argument("--start-row", type=int, default=0, help="first row of the pruning phase")
    prune.add_argument("--run-dir", default="runs/prune")
    prune.add_argument("--no-checkpoint", action="store_true", help="do not save the pruned model")
    add_overwrite_arg(prune)
    prune.set_defaults(func=_cmd_prune)

    demo = sub.add_parser("demo", help="the main job on the built-in synthetic stream")
    add_stream_args(demo, rows=60_000, window=3_000, increment_rows=10_000)
    demo.add_argument("--run-dir", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)

    from torchrec_prune.compress import add_compress_parsers

    add_compress_parsers(sub)

    from torchrec_prune.distributed.ps.cli import add_ray_train_parser  # it imports this module's helpers

    add_ray_train_parser(sub)
    from torchrec_prune.distributed.ps.submit import add_ray_job_parsers

    add_ray_job_parsers(sub)
    return parser


def setup_logging(run_dir: str | None = None) -> None:
    """INFO to stderr with time and rank (one line per event, readable in a job log), and to
    ``run_dir/log.txt`` (rank 0) or ``run_dir/log-rank<r>.txt``, appended across restarts."""
    rank = os.environ.get("RANK", "0")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        name = "log.txt" if rank == "0" else f"log-rank{rank}.txt"
        handlers.append(logging.FileHandler(os.path.join(run_dir, name), encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def _stopped_ranks_line(error: Exception) -> str:
    """One line for a failed collective, naming the ranks that stopped answering (they are ended: on this
    host at once, elsewhere by their torchrun agent)."""
    import torch.distributed as dist

    from torchrec_prune.distributed.dmp import kill_ranks, silent_ranks

    rank = dist.get_rank()
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        silent = silent_ranks()
        kill_ranks(silent)
    except RuntimeError:  # the store is gone too: say what this rank saw
        silent = []
    who = f"rank(s) {', '.join(map(str, silent))} stopped answering" if silent else "a collective failed"
    return f"rank {rank}: {who} ({first[:200]}); ending the job"


def main(argv: Sequence[str] | None = None) -> int:
    """Check every input (exit 2 on the first bad one, nothing written), then run the command."""
    import torch.distributed as dist

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags: one line, exit 2
    prepare: Callable[[argparse.Namespace, Sequence[str]], Runner] = args.func
    try:
        check_flags(args, argv)
        runner = prepare(args, argv)  # validation only: nothing has trained yet
    except CheckpointMismatchError as e:
        parser.exit(2, f"torchrec-prune: error: {e.one_line()}\n")
    except (ValueError, OSError) as e:
        parser.exit(2, f"torchrec-prune: error: {e}\n")
    if getattr(args, "overwrite", False):  # every check passed: now the old run may go
        from torchrec_prune.train.job import clear_run_dir

        clear_run_dir(args.run_dir)
    launcher = getattr(args, "nproc", 1) > 1 and "LOCAL_RANK" not in os.environ
    setup_logging(None if launcher else args.run_dir)  # the ranks of a launcher log for themselves
    try:
        return runner()
    except NonFiniteError as e:
        _fail(parser, str(e))
    except RuntimeError as e:  # gloo's timeout is a plain RuntimeError
        if not dist.is_initialized():
            raise
        _fail(parser, _stopped_ranks_line(e))
    finally:
        _close_log_files()


def _close_log_files() -> None:
    """Detach and close the run folder's log files: a later command in this process (``main`` called
    again, as tests and notebooks do) must not write its lines, its checks' included, into this run."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """End a run that failed while training: one line on stderr, and the same in the run's log file."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    parser.exit(1, f"torchrec-prune: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
