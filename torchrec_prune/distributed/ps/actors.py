"""Ray actor shells around ``ShardState`` and ``PSTrainer``: FTZ/DAZ, thread count, and delegation.

Each actor sets its intra-op thread count, then FTZ/DAZ on its own thread and every intra-op worker
(``enable_ftz_daz``), before it builds anything; ``ftz_probe`` lets a test check that from inside.

An actor is a process that imports torch and torchrec (about 7 s of CPU here), so actors are long-lived:
``start`` builds a fresh library object for each run and an ``ActorPool`` hands the same actors to
consecutive runs (tests, benchmarks).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchrec_prune.distributed.ps.config import PSConfig
from torchrec_prune.distributed.ps.layout import ParamLayout
from torchrec_prune.distributed.ps.messages import PullReply, PullRequest, PushReply, PushRequest
from torchrec_prune.distributed.ps.server import ShardState
from torchrec_prune.distributed.ps.store import ShardStore
from torchrec_prune.distributed.ps.trainer import ChunkReport, PSTrainer
from torchrec_prune.numerics import enable_ftz_daz
from torchrec_prune.train.job import JobConfig
from torchrec_prune.train.trainer import TrainConfig

_ASSIGNMENT = "assignment.pt"


def _numerics(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.ones(1_000_000).mul(2).sum()  # start the intra-op team, so FTZ/DAZ reaches existing workers
    if not enable_ftz_daz():
        raise RuntimeError("this CPU does not support flush-to-zero / denormals-are-zero")


def node_id() -> str:
    """The Ray node this process runs on (where ``SPREAD`` placed the actor)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def ftz_probe() -> dict[str, int]:
    """Denormal-producing arithmetic on every intra-op thread: nonzero counts must be 0 under FTZ/DAZ."""
    tiny = torch.full((4_000_000,), 1e-30)
    a = torch.full((256, 256), 1e-20)
    return {
        "threads": torch.get_num_threads(),
        "elementwise_nonzero": int(torch.count_nonzero(tiny * 1e-10)),  # 1e-40: denormal in float32
        "matmul_nonzero": int(torch.count_nonzero(a @ a)),
    }


class RayShards:
    """``ShardClients`` over Ray actor handles: one request per shard, sent together, then awaited."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def pull(self, requests: dict[int, PullRequest]) -> dict[int, PullReply]:
        import ray

        refs = {s: self.handles[s].pull.remote(r) for s, r in requests.items()}
        return dict(zip(refs, ray.get(list(refs.values())), strict=True))

    def push(self, requests: dict[int, PushRequest]) -> dict[int, PushReply]:
        return self.wait(self.push_async(requests))

    def push_async(self, requests: dict[int, PushRequest]) -> dict[int, Any]:
        return {s: self.handles[s].push.remote(r) for s, r in requests.items()}

    def wait(self, pending: dict[int, Any]) -> dict[int, PushReply]:
        import ray

        return dict(zip(pending, ray.get(list(pending.values())), strict=True))


class ServerActor:
    """A server shard as a Ray actor (one thread: pushes apply in arrival order).

    Args:
        threads: intra-op threads.
        home: a folder of this actor's own. ``start`` writes there which shard of which run the actor
            is; when Ray restarts the actor after a fault (``max_restarts``), the constructor, run again
            with the same arguments, finds it and restores the shard from the newest complete checkpoint
            of its ``ShardStore`` before any call (pushes Ray retries or held while it restarted) runs.
    """

    def __init__(self, threads: int = 1, home: str | None = None) -> None:
        _numerics(threads)
        self.state: ShardState | None = None
        self.home = Path(home) if home else None
        if self.home is not None and (self.home / _ASSIGNMENT).exists():
            self._restore()

    def start(
        self,
        shard: int,
        layout: ParamLayout,
        init: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
        train: TrainConfig,
        ps: PSConfig,
        store_dir: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        """Become shard ``shard`` of a run (any earlier state is dropped), from ``init`` or, when
        resuming a run, from ``state``; with ``store_dir`` it checkpoints itself there."""
        store = ShardStore(store_dir) if store_dir else None
        self.state = ShardState.for_run(shard, layout, init, masks, train, ps, store)
        if state is not None:
            self.state.load_state_dict(state)
        if self.home is not None:
            self.home.mkdir(parents=True, exist_ok=True)
            assignment = {"shard": shard, "layout": layout, "train": train, "ps": ps, "store_dir": store_dir}
            torch.save(assignment, self.home / f"{_ASSIGNMENT}.tmp")
            os.replace(self.home / f"{_ASSIGNMENT}.tmp", self.home / _ASSIGNMENT)
        self.state.checkpoint()  # a restart before the first periodic save restores this

    def _restore(self) -> None:
        assert self.home is not None
        assignment = torch.load(self.home / _ASSIGNMENT, weights_only=False)
        if assignment["store_dir"] is None:
            return  # nothing to restore from: calls fail with "start() has not been called"
        store = ShardStore(assignment["store_dir"])
        saved = store.latest()
        if saved is None:
            return
        self.state = ShardState.for_run(
            assignment["shard"],
            assignment["layout"],
            saved["weights"],
            saved["masks"],
            assignment["train"],
            assignment["ps"],
            store,
        )
        self.state.restore(saved)

    def _shard(self) -> ShardState:
        if self.state is None:
            raise RuntimeError("ServerActor.start() has not been called")
        return self.state

    def pull(self, request: PullRequest) -> PullReply:
        return self._shard().pull(request)

    def push(self, request: PushRequest) -> PushReply:
        return self._shard().push(request)

    def set_masks(self, masks: dict[str, np.ndarray], version: int | None = None) -> int:
        return self._shard().set_masks(masks, version)

    def weights(self) -> dict[str, np.ndarray]:
        return self._shard().weights()

    def committed(self, rank: int) -> int:
        """Index of the last batch of trainer ``rank`` this shard took (-1: none)."""
        return self._shard().committed.get(rank, -1)

    def summary(self) -> dict[str, Any]:
        return self._shard().summary()

    def state_dict(self) -> dict[str, Any]:
        return self._shard().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._shard().load_state_dict(state)

    def ftz_probe(self) -> dict[str, int]:
        return ftz_probe()

    def node_id(self) -> str:
        return node_id()


class TrainerActor:
    """A trainer as a Ray actor, pulling from and pushing to the server shards' actors."""

    def __init__(self, threads: int = 1) -> None:
        _numerics(threads)
        self.trainer: PSTrainer | None = None

    def start(
        self,
        rank: int,
        job: JobConfig,
        ps: PSConfig,
        layout: ParamLayout,
        servers: list[Any],
        taylor_layers: tuple[str, ...] = (),
    ) -> None:
        """Become trainer ``rank`` of a new run, reading its partition from the start."""
        self.trainer = PSTrainer(rank, job, ps, layout, RayShards(servers), taylor_layers=taylor_layers)

    def _trainer(self) -> PSTrainer:
        if self.trainer is None:
            raise RuntimeError("TrainerActor.start() has not been called")
        return self.trainer

    def run_steps(self, steps: int) -> ChunkReport:
        return self._trainer().run_steps(steps)

    def summary(self) -> dict[str, Any]:
        return self._trainer().summary()

    def state_dict(self) -> dict[str, Any]:
        return self._trainer().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._trainer().load_state_dict(state)

    def invalidate(self) -> None:
        self._trainer().invalidate()

    def ftz_probe(self) -> dict[str, int]:
        return ftz_probe()

    def node_id(self) -> str:
        return node_id()


class ActorPool:
    """Server and trainer actors kept across runs; each run calls ``start`` on the ones it takes.

    Every actor is scheduled with Ray's ``SPREAD`` strategy, so on a cluster shards and trainers go to
    different nodes (a shard's pushes and pulls then use another node's network link and cores than the
    trainers'); Ray's default policy would pack the driver's node first, up to half its CPUs. Not a
    placement group: the pool starts actors lazily and reuses them for runs of other
    sizes, while a group reserves a fixed set of bundles up front, and its bundles cannot be empty
    where actors here default to 0 CPUs. ``SPREAD`` is best effort: with fewer nodes than actors they
    share nodes, and no actor waits for a node that does not exist.

    Fault tolerance: with ``max_restarts`` Ray restarts a dead actor. A shard restores itself from
    its checkpoints (``ServerActor``), and calls to it are retried or held until it is back
    (``max_task_retries=-1``): a push waits for a restarting shard instead of being lost. A trainer's
    calls are not retried; the driver sees its death, starts it again and resumes its partition after
    the last batch the shards took.

    Args:
        server_cpus, trainer_cpus: CPUs each server / trainer actor reserves (0: actors share the node's
            cores, which is what lets two trainers, two shards and the driver run on a 2-core machine).
        threads: intra-op threads of each actor.
        max_restarts: times Ray restarts each actor after its process dies (0: never).
        home: folder for the server actors' own files (``None``: a temporary folder removed at exit).

    Example::

        pool = ActorPool(trainer_cpus=4, server_cpus=2, threads=4)
        run_async(job, PSConfig(trainers=2), pool=pool)  # starts 1 server and 2 trainer actors
        run_async(job, PSConfig(trainers=1), pool=pool)  # reuses them
    """

    def __init__(
        self,
        *,
        server_cpus: float = 0.0,
        trainer_cpus: float = 0.0,
        threads: int = 1,
        max_restarts: int = 0,
        home: str | os.PathLike | None = None,
    ) -> None:
        import ray

        spread = {"scheduling_strategy": "SPREAD", "max_restarts": max_restarts}
        self._server_cls = ray.remote(ServerActor).options(
            num_cpus=server_cpus, max_task_retries=-1 if max_restarts else 0, **spread
        )
        self._trainer_cls = ray.remote(TrainerActor).options(num_cpus=trainer_cpus, **spread)
        self.threads = threads
        self.max_restarts = max_restarts
        if home is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ps-actors-")
            home = self._tmp.name
        self.home = Path(home)
        self.servers: list[Any] = []
        self.trainers: list[Any] = []

    def take(self, servers: int, trainers: int) -> tuple[list[Any], list[Any]]:
        """The first ``servers`` server actors and ``trainers`` trainer actors, started if missing."""
        while len(self.servers) < servers:
            home = self.home / f"server-{len(self.servers)}"
            self.servers.append(self._server_cls.remote(self.threads, str(home)))
        while len(self.trainers) < trainers:
            self.trainers.append(self._trainer_cls.remote(self.threads))
        return self.servers[:servers], self.trainers[:trainers]
