"""Where an asynchronous run's shards and trainers live: Ray actors (the real thing) or plain objects in
this process (the driver's logic tested without Ray). The driver only submits calls, reads reports and
handles a trainer that died.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.config import PSConfig
from torchrec_prune.distributed.ps.layout import ParamLayout
from torchrec_prune.distributed.ps.messages import PullReply, PullRequest, PushReply, PushRequest
from torchrec_prune.distributed.ps.server import ShardState
from torchrec_prune.distributed.ps.store import ShardStore
from torchrec_prune.distributed.ps.trainer import ChunkReport, PSTrainer
from torchrec_prune.train.job import JobConfig

MaskUpdate = dict[str, np.ndarray]
Finished = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, np.ndarray]]]


class TrainerLost(Exception):
    """Trainer ``rank``'s process died; its queued calls are gone with it."""

    def __init__(self, rank: int, cause: str) -> None:
        super().__init__(f"trainer {rank} died: {cause}")
        self.rank = rank


@dataclass
class RunSetup:
    """What both backends start from: the initial model split over shards, and the mask replica.

    ``shard_states`` and ``trainer_states`` (a resumed run) replace the initial weights with the
    shards' saved states and start trainers at their saved offsets; ``store_dir`` is where shards
    checkpoint themselves (``None``: they do not).
    """

    job: JobConfig
    ps: PSConfig
    layout: ParamLayout
    init: list[dict[str, np.ndarray]]
    masks: MaskUpdate
    replica: nn.Module
    taylor_layers: tuple[str, ...]
    store_dir: Path | None = None
    shard_states: list[dict[str, Any]] | None = None
    trainer_states: list[dict[str, Any]] | None = None

    def store(self, shard: int) -> str | None:
        return None if self.store_dir is None else str(self.store_dir / f"shard-{shard}")


class Backend(Protocol):
    def submit(self, rank: int, steps: int) -> None: ...

    def outstanding(self) -> int:
        """Calls submitted and not yet reported."""
        ...

    def outstanding_for(self, rank: int) -> int: ...

    def next_report(self) -> ChunkReport:
        """The next finished call's report; raises ``TrainerLost`` when its trainer died."""
        ...

    def broadcast(self, masks: MaskUpdate, version: int) -> None: ...

    def committed(self, rank: int) -> int:
        """The last batch of trainer ``rank`` any shard took (-1: none)."""
        ...

    def restart_trainer(self, rank: int, batches_done: int) -> None:
        """Start trainer ``rank`` again, resuming its partition after ``batches_done`` batches."""
        ...

    def invalidate_copies(self) -> None:
        """Every trainer pulls every weight again before its next step (the state a resume starts in)."""
        ...

    def shard_states(self) -> list[dict[str, Any]]: ...

    def trainer_states(self) -> list[dict[str, Any]]: ...

    def finish(self) -> Finished: ...


class LocalShards:
    """``ShardClients`` over in-process shards (tests and the local backend)."""

    def __init__(self, shards: list[ShardState]) -> None:
        self.shards = shards

    def pull(self, requests: dict[int, PullRequest]) -> dict[int, PullReply]:
        return {s: self.shards[s].pull(r) for s, r in requests.items()}

    def push(self, requests: dict[int, PushRequest]) -> dict[int, PushReply]:
        return {s: self.shards[s].push(r) for s, r in requests.items()}

    def push_async(self, requests: dict[int, PushRequest]) -> dict[int, PushReply]:
        return self.push(requests)  # applied at once: the replies are the handle

    def wait(self, pending: dict[int, PushReply]) -> dict[int, PushReply]:
        return pending


class LocalBackend:
    """Shards and trainers as plain objects in this process; calls are served in submission order."""

    def __init__(self, setup: RunSetup) -> None:
        ps = setup.ps
        self.setup = setup
        self.shards = []
        for s in range(ps.servers):
            store = setup.store(s)
            shard = ShardState.for_run(
                s,
                setup.layout,
                setup.init[s],
                setup.masks,
                setup.job.train,
                ps,
                None if store is None else ShardStore(store),
            )
            if setup.shard_states is not None:
                shard.load_state_dict(setup.shard_states[s])
            self.shards.append(shard)
        self.trainers = [self._trainer(r) for r in range(ps.trainers)]
        for trainer, state in zip(self.trainers, setup.trainer_states or [], strict=False):
            trainer.load_state_dict(state)
        self._queue: deque[tuple[int, int]] = deque()

    def _trainer(self, rank: int) -> PSTrainer:
        setup = self.setup
        clients = LocalShards(self.shards)
        return PSTrainer(rank, setup.job, setup.ps, setup.layout, clients, taylor_layers=setup.taylor_layers)

    def submit(self, rank: int, steps: int) -> None:
        self._queue.append((rank, steps))

    def outstanding(self) -> int:
        return len(self._queue)

    def outstanding_for(self, rank: int) -> int:
        return sum(1 for r, _ in self._queue if r == rank)

    def next_report(self) -> ChunkReport:
        rank, steps = self._queue.popleft()
        return self.trainers[rank].run_steps(steps)

    def broadcast(self, masks: MaskUpdate, version: int) -> None:
        for shard in self.shards:
            shard.set_masks(masks, version)

    def committed(self, rank: int) -> int:
        return max(shard.committed.get(rank, -1) for shard in self.shards)

    def restart_trainer(self, rank: int, batches_done: int) -> None:
        self._queue = deque(call for call in self._queue if call[0] != rank)
        self.trainers[rank] = self._trainer(rank)
        self.trainers[rank].load_state_dict({"batches_done": batches_done})

    def invalidate_copies(self) -> None:
        for trainer in self.trainers:
            trainer.invalidate()

    def shard_states(self) -> list[dict[str, Any]]:
        return [shard.state_dict() for shard in self.shards]

    def trainer_states(self) -> list[dict[str, Any]]:
        return [trainer.state_dict() for trainer in self.trainers]

    def finish(self) -> Finished:
        return (
            [t.summary() for t in self.trainers],
            [s.summary() for s in self.shards],
            [s.weights() for s in self.shards],
        )


class RayBackend:
    """Shards and trainers as Ray actors taken from ``pool`` and started for this run."""

    def __init__(self, setup: RunSetup, pool: ActorPool) -> None:
        import ray

        ps = setup.ps
        self.setup = setup
        self.servers, self.trainers = pool.take(ps.servers, ps.trainers)
        self._layout, masks = ray.put(setup.layout), ray.put(setup.masks)
        states = setup.shard_states or [None] * ps.servers
        ray.get(
            [
                server.start.remote(
                    s,
                    self._layout,
                    ray.put(setup.init[s]),
                    masks,
                    setup.job.train,
                    ps,
                    setup.store(s),
                    states[s],
                )
                for s, server in enumerate(self.servers)
            ]
        )
        ray.get([self._start(r) for r in range(ps.trainers)])
        if setup.trainer_states is not None:
            ray.get(
                [
                    t.load_state_dict.remote(st)
                    for t, st in zip(self.trainers, setup.trainer_states, strict=True)
                ]
            )
        self._refs: dict[Any, int] = {}

    def _start(self, rank: int) -> Any:
        setup = self.setup
        return self.trainers[rank].start.remote(
            rank, setup.job, setup.ps, self._layout, self.servers, setup.taylor_layers
        )

    def submit(self, rank: int, steps: int) -> None:
        self._refs[self.trainers[rank].run_steps.remote(steps)] = rank

    def outstanding(self) -> int:
        return len(self._refs)

    def outstanding_for(self, rank: int) -> int:
        return sum(1 for r in self._refs.values() if r == rank)

    def next_report(self) -> ChunkReport:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ready, _ = ray.wait(list(self._refs), num_returns=1)
        rank = self._refs.pop(ready[0])
        try:
            return ray.get(ready[0])
        except RayActorError as e:
            if isinstance(e, RayTaskError):  # an error inside the call, not the trainer's death
                raise
            for ref, other in list(self._refs.items()):
                if other == rank:  # queued behind the dead call: lost with the process
                    del self._refs[ref]
            raise TrainerLost(rank, type(e).__name__) from e

    def broadcast(self, masks: MaskUpdate, version: int) -> None:
        import ray

        ref = ray.put(masks)
        ray.get([s.set_masks.remote(ref, version) for s in self.servers])

    def committed(self, rank: int) -> int:
        import ray

        return max(ray.get([s.committed.remote(rank) for s in self.servers]))

    def restart_trainer(self, rank: int, batches_done: int, timeout: float = 300.0) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout
        while True:  # calls to an actor Ray is still restarting fail at once: ask again until it is up
            try:
                ray.get(self._start(rank))
                break
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ray.get(self.trainers[rank].load_state_dict.remote({"batches_done": batches_done}))

    def invalidate_copies(self) -> None:
        import ray

        ray.get([t.invalidate.remote() for t in self.trainers])

    def shard_states(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([s.state_dict.remote() for s in self.servers])

    def trainer_states(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([t.state_dict.remote() for t in self.trainers])

    def finish(self) -> Finished:
        import ray

        return (
            ray.get([t.summary.remote() for t in self.trainers]),
            ray.get([s.summary.remote() for s in self.servers]),
            ray.get([s.weights.remote() for s in self.servers]),
        )
