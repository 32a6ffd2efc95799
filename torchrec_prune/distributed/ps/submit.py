"""``torchrec-prune ray-submit`` / ``ray-status`` / ``ray-logs``: jobs on a Ray cluster one already has.

A job goes through Ray's Job Submission API (the head's dashboard address, ``http://HEAD:8265``) with
the package in its runtime environment: ``py_modules`` (the ``torchrec_prune`` folder this process
imported) or, with ``--working-dir``, that folder, which must hold the package. Either way the cluster
needs only Python, torch, torchrec and Ray, not this package. Every request carries the user's Ray
token (``auth.user_token``). Everything that can be checked here is, before anything is submitted:
the address answers, the token is accepted, the folder holds the package, the command parses.

The job runs ``python -P -m torchrec_prune.distributed.ps.submit COMMAND...`` (``-P``: Python >= 3.11),
which names the package folder it imported in the job's log, then runs the command as ``torchrec-prune``
would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchrec_prune.cli import Runner
from torchrec_prune.distributed.ps.auth import user_token
from torchrec_prune.distributed.ps.runtime import check_address

PACKAGE = Path(__file__).resolve().parents[2]  # the torchrec_prune folder shipped as a py_module
# Not shipped with --working-dir: environments, history and outputs (Ray refuses packages over 500 MiB).
EXCLUDES = [".venv", "venv", ".git", "runs", "__pycache__", "*.pyc"]
JOB_COMMANDS = ("ray-submit", "ray-status", "ray-logs")


def add_ray_job_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ray-submit``, ``ray-status`` and ``ray-logs``.

    Example::

        sub = parser.add_subparsers(dest="command", required=True)
        add_ray_job_parsers(sub)  # torchrec-prune ray-submit --address http://HEAD:8265 -- ray-train ...
    """
    submit = subparsers.add_parser(
        "ray-submit",
        help="submit a command (e.g. ray-train) to a Ray cluster as a job, with this package shipped",
    )
    _client_args(submit)
    submit.add_argument(
        "--working-dir", default=None, help="ship this folder (it must hold torchrec_prune/) as working_dir"
    )
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("job", nargs=argparse.REMAINDER, help="-- then the torchrec-prune command to run")
    submit.set_defaults(func=lambda args, argv: prepare_ray_submit(args))  # job flags: job_command
    status = subparsers.add_parser("ray-status", help="a submitted job's status")
    _client_args(status)
    status.add_argument("job_id")
    status.set_defaults(func=lambda args, argv: prepare_ray_status(args))
    logs = subparsers.add_parser("ray-logs", help="a submitted job's log so far")
    _client_args(logs)
    logs.add_argument("job_id")
    logs.set_defaults(func=lambda args, argv: prepare_ray_logs(args))


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="the head's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument(
        "--auth-token-file",
        default=None,
        help="the cluster's Ray token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    )
    p.set_defaults(run_dir=None)  # main() sets up logging for run_dir; a client writes no run folder


def connect(address: str | None, token_file: str | None) -> Any:
    """A ``JobSubmissionClient`` that has reached the cluster with the user's token.

    Raises:
        ValueError: no or malformed address, nothing listening, no token, a token the cluster refuses.

    Example::

        client = connect("http://127.0.0.1:8265", "runs/head/auth_token")
    """
    if not address:
        raise ValueError("--address is required (the head's dashboard, http://HEAD:8265)")
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--address must be http://HOST:PORT (the head's dashboard), got {address!r}")
    check_address(address, name="--address")
    token = user_token(token_file)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except AuthenticationError as e:
        raise ValueError(f"--address {address} refused the Ray token: {_first_line(e)}") from e
    except ConnectionError as e:
        raise ValueError(f"--address {address}: {_first_line(e)}") from e


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def runtime_env(working_dir: str | None) -> dict[str, Any]:
    """The job's runtime environment: the package as a ``py_module``, or the given working dir.

    Raises:
        ValueError: ``working_dir`` is not a folder holding ``torchrec_prune/__init__.py``.

    Example::

        runtime_env(None)  # {"py_modules": [".../torchrec_prune"]}
    """
    if working_dir is None:
        return {"py_modules": [str(PACKAGE)]}
    folder = Path(working_dir).resolve()
    if not (folder / "torchrec_prune" / "__init__.py").is_file():
        raise ValueError(
            f"--working-dir {working_dir} does not contain the torchrec_prune package "
            f"({folder / 'torchrec_prune' / '__init__.py'} is missing)"
        )
    return {"working_dir": str(folder), "excludes": EXCLUDES}


def job_command(job: Sequence[str]) -> list[str]:
    """The torchrec-prune command after ``--``, parsed here so that a typo fails before submitting.

    Raises:
        ValueError: no command, or one of the job commands themselves.
    """
    from torchrec_prune.cli import build_parser, check_flags

    command = list(job[1:] if job and job[0] == "--" else job)
    if not command:
        raise ValueError("ray-submit needs a command after --, e.g. -- ray-train --schedule alternate")
    if command[0] in JOB_COMMANDS:
        raise ValueError(f"{command[0]} runs on this machine, not as a job")
    if "-h" in command or "--help" in command:
        raise ValueError(f"a job's help is this machine's: torchrec-prune {command[0]} --help")
    parsed = build_parser().parse_args(command)  # unknown commands and flags: argparse's one line, exit 2
    check_flags(parsed, command)  # non-finite values, flags given where they do not apply
    return command


def prepare_ray_submit(args: argparse.Namespace) -> Runner:
    """Check the command, the folder, the address and the token; return the closure that submits.

    Example::

        runner = prepare_ray_submit(parser.parse_args(["ray-submit", "--address", url, "--", "ray-train"]))
        exit_code = runner()  # 0: the job succeeded, 1: it failed or was stopped
    """
    command = job_command(args.job)
    env = runtime_env(args.working_dir)
    client = connect(args.address, args.auth_token_file)
    # -P: the job's current folder (the raylet's) must not shadow the shipped package on sys.path
    entrypoint = shlex.join(["python", "-P", "-m", "torchrec_prune.distributed.ps.submit", *command])

    def run() -> int:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
        if args.no_wait:
            print(job_id)
            return 0
        print(f"submitted {job_id}; streaming its log", file=sys.stderr)
        return follow(client, job_id)

    return run


def follow(client: Any, job_id: str) -> int:
    """Stream the job's log to stdout until it ends; 0 when it succeeded, else 1 with a one-line reason."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return _outcome(client, job_id)


def _outcome(client: Any, job_id: str) -> int:
    info = client.get_job_info(job_id)
    if str(info.status) == "SUCCEEDED":
        return 0
    reason = _first_line(info.message) if info.message else "no message"
    print(f"torchrec-prune: error: job {job_id} {info.status}: {reason}", file=sys.stderr)
    return 1


def prepare_ray_status(args: argparse.Namespace) -> Runner:
    """Print ``JOB_ID STATUS message``; exit 0 when the job succeeded or still runs, 1 when it failed.

    Example::

        torchrec-prune ray-status --address http://127.0.0.1:8265 raysubmit_XyZ
    """
    client = connect(args.address, args.auth_token_file)

    def run() -> int:
        info = _info(client, args.job_id)
        if info is None:
            return 2
        print(f"{args.job_id} {info.status} {_first_line(info.message) if info.message else ''}".rstrip())
        return 1 if str(info.status) in ("FAILED", "STOPPED") else 0

    return run


def prepare_ray_logs(args: argparse.Namespace) -> Runner:
    """Print the job's log so far (``ray-submit`` streams it while waiting).

    Example::

        torchrec-prune ray-logs --address http://127.0.0.1:8265 raysubmit_XyZ
    """
    client = connect(args.address, args.auth_token_file)

    def run() -> int:
        if _info(client, args.job_id) is None:
            return 2
        print(client.get_job_logs(args.job_id), end="")
        return 0

    return run


def _info(client: Any, job_id: str) -> Any | None:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:  # the API's answer to an unknown id
        print(f"torchrec-prune: error: job {job_id}: {_first_line(e)}", file=sys.stderr)
        return None


def job_main(argv: Sequence[str]) -> int:
    """The job's entry point: say which package folder runs, then run the command.

    Example::

        python -m torchrec_prune.distributed.ps.submit ray-train --rows 4000
    """
    import torchrec_prune
    from torchrec_prune.cli import main

    print(f"torchrec-prune job: package {Path(torchrec_prune.__file__).parent}", flush=True)
    return main(list(argv))


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
