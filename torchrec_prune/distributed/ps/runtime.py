"""Connecting to Ray: an existing cluster at ``RAY_ADDRESS``, or an embedded one bound to loopback.

Ray replaces a loopback ``_node_ip_address`` by the machine's routable address unless its
"no cluster" mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray uses on laptops): with it
every Ray process of the embedded instance (GCS, raylet, workers) listens on 127.0.0.1 only. The
setting is read when ``ray`` is imported, so this module sets it before importing Ray (unless
``RAY_ADDRESS`` names a cluster, whose nodes must see this driver's routable address) and checks the
node address after start-up.

An embedded instance also runs with Ray's token authentication on (``auth.token_auth``): its token is a
0600 file in the folder the caller names (``ray-train``: its run folder), or in a private temporary
folder removed on exit.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlparse

from torchrec_prune.distributed.ps.auth import ensure_token, token_auth

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

LOOPBACK = "127.0.0.1"
# Arguments and results up to this size travel inside the call instead of through the object store.
# Ray's default (100 KiB) sends every dense push and pull (0.7 MB for the reference DLRM) through a put
# and a fetch; inline, the raylet's CPU per run fell from 0.7-0.9 s to 0.05 s here. A cluster sets it at
# ``ray start --system-config='{"max_direct_call_object_size": 8388608}'``.
INLINE_BYTES = 8 * 1024 * 1024


def check_address(address: str, timeout: float = 3.0, name: str = "RAY_ADDRESS") -> None:
    """Raise ValueError naming ``name`` (the variable or flag) when its host:port does not accept a TCP
    connection.

    ``auto`` (a cluster started on this machine) is left to Ray. Called before any actor starts.

    Example::

        check_address("http://127.0.0.1:8265", name="--address")  # ValueError when nothing listens
    """
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as e:
        raise ValueError(f"{name}={address!r} is not host:port ({e})") from e
    if not host or port is None:
        raise ValueError(f"{name}={address!r} must be host:port, scheme://host:port or auto")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"{name}={address!r} is unreachable: {e}") from e


@contextmanager
def ray_session(address: str | None, num_cpus: int, token_dir: str | Path | None = None) -> Iterator[None]:
    """Ray for the duration of the block, shut down on exit even on failure.

    Args:
        address: an existing cluster (``RAY_ADDRESS``), or ``None`` for an embedded local instance bound
            to loopback with the dashboard off.
        num_cpus: CPUs the embedded instance advertises (ignored for a cluster).
        token_dir: where the embedded instance's auth token file is kept (``None``: a private temporary
            folder); ignored for a cluster, which uses the caller's Ray auth settings.

    Example::

        with ray_session(os.environ.get("RAY_ADDRESS"), num_cpus=2):
            result = run_async(job, PSConfig(trainers=2))
    """
    import ray

    with ExitStack() as stack:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            folder = token_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ray-auth-"))
            stack.enter_context(token_auth(ensure_token(folder)))
            ray.init(
                address="local",
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                num_cpus=num_cpus,
                log_to_driver=True,
                _system_config={"max_direct_call_object_size": INLINE_BYTES},
            )
        stack.callback(ray.shutdown)  # runs before the token goes: shutdown still talks to the GCS
        if not address:
            ip = ray.util.get_node_ip_address()
            if ip != LOOPBACK:
                raise RuntimeError(
                    f"embedded Ray bound to {ip}, not loopback: import torchrec_prune.distributed.ps.runtime "
                    "before ray, or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
                )
        yield
