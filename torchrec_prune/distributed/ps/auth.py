"""Ray token authentication for every Ray the tools start, and the user's token for the clients.

Ray 2.60 checks a bearer token on its GCS, raylets and dashboard when ``RAY_AUTH_MODE=token``; the token
comes from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's
``ray get-auth-token --generate`` writes the last). Without it anyone who reaches a port runs code as
this user. The tools keep their own token in a file of the run folder, created owner-only (0600), and
read a user's token file only when no one else can read it either.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOKEN_FILE = "auth_token"
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"Ray auth token {path} is readable by others (mode {mode:o}): chmod 600 {path}")


def ensure_token(folder: str | Path) -> Path:
    """``folder/auth_token``: kept when it exists (and is owner-only), else a new 256-bit token, 0600.

    The file is created with mode 0600 in one ``open`` (no window in which it is world-readable).

    Example::

        path = ensure_token("runs/ray-train")  # runs/ray-train/auth_token, -rw-------
    """
    path = Path(folder) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        read_token(path)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def read_token(path: str | Path) -> str:
    """The token in ``path``; ValueError (one line) when missing, empty or readable by others.

    Example::

        headers = {"Authorization": f"Bearer {read_token('~/.ray/auth_token')}"}
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"Ray auth token file {path} does not exist")
    _check_private(path)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"Ray auth token file {path} is empty")
    return token


def user_token(token_file: str | None) -> str:
    """The user's token, looked up in Ray's order: ``token_file`` (a flag), ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``.

    Raises:
        ValueError: none of them holds a token, or the file is readable by others.

    Example::

        token = user_token(args.auth_token_file)
    """
    if token_file:
        return read_token(token_file)
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    default = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / TOKEN_FILE)
    if not default.expanduser().is_file():
        raise ValueError(
            "no Ray auth token: pass --auth-token-file, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            "(the token of the cluster, e.g. the head's run folder auth_token)"
        )
    return read_token(default)


def _refresh() -> None:
    """Make an already imported Ray re-read the auth mode and token (it caches both in C++)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def token_auth(path: str | Path) -> Iterator[Path]:
    """Token authentication on for the Ray this process starts or joins in the block, with the token in
    ``path``; the process's earlier Ray auth settings come back on exit.

    Ray's child processes (GCS, raylets, workers) inherit the environment, so they check the same
    token; ``RAY_AUTH_TOKEN`` is unset in the block so that the file is the only source.

    Example::

        with token_auth(ensure_token(run_dir)):
            ray.init(address="local", include_dashboard=False)
    """
    saved = {name: os.environ.get(name) for name in _AUTH_VARS}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(path).resolve())
    _refresh()
    try:
        yield Path(path)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _refresh()
