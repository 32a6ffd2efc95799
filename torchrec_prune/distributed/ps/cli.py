"""``torchrec-prune ray-train``: the parser and the prepare step (validation only, no actor starts).

The CLI owner registers it with ``add_ray_train_parser(sub)``; ``prepare_ray_train`` follows the
``Runner`` contract of ``torchrec_prune.cli``: it raises ValueError (one line, naming the flag) on bad
input and returns the closure that runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torchrec_prune.cli import Runner, add_resume_args, add_stream_args, job_config
from torchrec_prune.distributed.ps.config import SCHEDULES, PSConfig
from torchrec_prune.distributed.ps.runtime import check_address
from torchrec_prune.train.optimizer_state import REGROWN_STATES


def add_ray_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ray-train`` (the data and model flags of ``train`` plus the asynchronous ones).

    Example::

        sub = parser.add_subparsers(dest="command", required=True)
        add_ray_train_parser(sub)  # args.func(args, argv) is prepare_ray_train(args)
    """
    p = subparsers.add_parser(
        "ray-train",
        help="asynchronous trainers and a sharded parameter server on Ray (RAY_ADDRESS or embedded)",
    )
    add_stream_args(p, rows=100_000, window=5_000, increment_rows=20_000)
    p.add_argument("--schedule", choices=SCHEDULES, default="dense", help="d2s runs its 3 jobs as actors")
    p.add_argument("--trainers", type=int, default=2, help="trainer actors, one stream partition each")
    p.add_argument("--servers", type=int, default=1, help="parameter-server shards")
    p.add_argument("--staleness", type=int, default=2, help="server versions a weight copy may serve")
    p.add_argument("--cache-rows", type=int, default=4096, help="embedding rows per table a trainer holds")
    p.add_argument("--chunk-steps", type=int, default=8, help="batches per driver call to a trainer")
    p.add_argument(
        "--max-lead-chunks", type=int, default=4, help="global chunks a trainer may run ahead (0: no bound)"
    )
    p.add_argument("--beta", type=float, default=0.7, help="pruned neuron fraction in sparse phases")
    p.add_argument("--window-steps", type=int, default=50, help="batches of importance before pruning")
    p.add_argument(
        "--regrown-state",
        choices=REGROWN_STATES,
        default="reset",
        help="server optimizer state of regrown weights: reset (SPEC 3) or layer_mean",
    )
    p.add_argument("--d2s-r", type=int, default=4, help="d2s: a new sparse model every r increments")
    p.add_argument("--d2s-p", type=int, default=2, help="d2s: pruned from the snapshot p increments back")
    p.add_argument("--lam", type=float, default=1.75, help="d2s: AUX sparsity penalty lambda")
    p.add_argument(
        "--eps", type=float, default=None, help="d2s: AUX latent-score step (default: from the latent budget)"
    )
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of an embedded Ray")
    p.add_argument("--trainer-cpus", type=float, default=0.0, help="CPUs each trainer actor reserves")
    p.add_argument("--server-cpus", type=float, default=0.0, help="CPUs each server-shard actor reserves")
    p.add_argument("--run-dir", default="runs/ray-train", help="also holds an embedded Ray's auth token")
    p.add_argument("--no-checkpoint", action="store_true", help="do not save the final model checkpoint")
    add_resume_args(p)
    p.add_argument(
        "--max-restarts", type=int, default=3, help="times Ray restarts each trainer or shard that dies"
    )
    p.add_argument(
        "--shard-checkpoint-pushes",
        type=int,
        default=500,
        help="applied pushes between a shard's own checkpoints (0: at start and mask changes only)",
    )
    p.set_defaults(func=lambda args, argv: prepare_ray_train(args))
    return p


def prepare_ray_train(args: argparse.Namespace) -> Runner:
    """Check every flag, the stream's partitions and ``RAY_ADDRESS``; return the closure that trains.

    Raises:
        ValueError: bad values (naming the flag), too many trainers for the stream, an unreachable
            ``RAY_ADDRESS``.
        FileNotFoundError: a missing data file.

    Example::

        runner = prepare_ray_train(parser.parse_args(["ray-train", "--trainers", "2"]))
        exit_code = runner()  # starts Ray (or joins RAY_ADDRESS), trains, writes the run folder
    """
    from torchrec_prune.distributed.ps.job import RayTrainConfig, run_ray_d2s_job, run_ray_job, summarize_line

    ps = PSConfig(
        trainers=args.trainers,
        servers=args.servers,
        staleness=args.staleness,
        cache_rows=args.cache_rows,
        chunk_steps=args.chunk_steps,
        shard_checkpoint_pushes=args.shard_checkpoint_pushes,
        max_lead_chunks=args.max_lead_chunks,
        regrown_state=args.regrown_state,
    )
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be an integer >= 0, got {args.max_restarts}")
    if args.num_cpus < 1:
        raise ValueError(f"--num-cpus must be an integer >= 1, got {args.num_cpus}")
    for flag, cpus in (("--trainer-cpus", args.trainer_cpus), ("--server-cpus", args.server_cpus)):
        if cpus < 0:
            raise ValueError(f"{flag} must be >= 0, got {cpus}")
        if cpus and args.schedule == "d2s":
            raise ValueError(f"{flag} applies to the asynchronous schedules, not --schedule d2s")
    config = RayTrainConfig(
        job=job_config(args, checkpoint=not args.no_checkpoint),
        ps=ps,
        schedule=args.schedule,
        beta=args.beta,
        window_steps=args.window_steps,
        d2s_r=args.d2s_r,
        d2s_p=args.d2s_p,
        lam=args.lam,
        eps=args.eps,
    )
    config.check()
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)

    def run() -> int:
        import torch

        from torchrec_prune.distributed.ps.actors import ActorPool
        from torchrec_prune.distributed.ps.runtime import ray_session

        torch.set_num_threads(1)  # the driver runs small ops; an OpenMP team would spin on actors' cores
        with ray_session(address, num_cpus=args.num_cpus, token_dir=args.run_dir):
            if config.schedule == "d2s":
                result = run_ray_d2s_job(config)
            else:
                pool = ActorPool(
                    trainer_cpus=args.trainer_cpus,
                    server_cpus=args.server_cpus,
                    max_restarts=args.max_restarts,
                    home=Path(args.run_dir) / "ps" / "actors",
                )
                result = run_ray_job(config, pool=pool)
        print(summarize_line(result, config.job.run_dir))
        return 0

    return run
