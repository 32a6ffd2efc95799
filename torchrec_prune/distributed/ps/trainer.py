"""One asynchronous trainer: its own partition of the stream, the library's model and forward, a bounded
row cache, pulls when its copy is too stale and a push after every batch (SPEC 8). With a staleness
above 1 the push is not waited for until the next batch's rows are known: reading and mapping them
overlaps the shards applying it, and what is stale is still decided on the versions the push returned.

``PSTrainer`` is a plain class over any ``ShardClients`` (in-process shards in tests, Ray actor handles
in a run), so the training step is tested without Ray. Each batch is scored (look-ahead) by the forward
whose gradient is pushed, so the score is taken before any update from that batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_prune.data.stream import iter_increments, rank_ranges
from torchrec_prune.distributed.ps.cache import RowCache
from torchrec_prune.distributed.ps.config import PSConfig
from torchrec_prune.distributed.ps.layout import ParamLayout
from torchrec_prune.distributed.ps.messages import PullReply, PullRequest, PushReply, PushRequest, as_tensor
from torchrec_prune.importance.neuron import NeuronTaylor
from torchrec_prune.masks import wrap
from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.models import build_dlrm
from torchrec_prune.models.batched_tables import BatchedEmbeddingBagCollection
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for
from torchrec_prune.train.trainer import default_forward

ForwardFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
_NEVER = -(10**9)  # version of a copy that was never pulled
PullPlan = tuple[dict[int, PullRequest], dict[int, np.ndarray]]  # requests by shard, pool slots they fill


class ShardClients(Protocol):
    """Calls to every server shard; one request per shard index, answered together."""

    def pull(self, requests: dict[int, PullRequest]) -> dict[int, PullReply]: ...

    def push(self, requests: dict[int, PushRequest]) -> dict[int, PushReply]: ...

    def push_async(self, requests: dict[int, PushRequest]) -> Any:
        """Send the pushes without waiting; ``wait`` on the handle returns the replies."""
        ...

    def wait(self, pending: Any) -> dict[int, PushReply]: ...


@dataclass
class Rows:
    """A batch's distinct rows of every table, in table order then id order.

    ``keys`` are global row keys (``ParamLayout.keys``) and ``owner`` the shard that owns each row,
    ``slots`` their rows in the trainer's pool, ``new`` which were not cached; ``inverse`` the position in
    ``keys`` of each id of the batch, feature by feature.
    """

    keys: np.ndarray
    owner: np.ndarray
    slots: np.ndarray
    new: np.ndarray
    inverse: np.ndarray


@dataclass
class BatchScore:
    """One batch's look-ahead scores at stream positions ``[start, end)`` and its neuron importance."""

    start: int
    end: int
    logits: np.ndarray
    labels: np.ndarray
    taylor: dict[str, np.ndarray] = field(default_factory=dict)
    finished_at: float = 0.0


@dataclass
class ShardRestart:
    """A shard restored from its checkpoint, as a trainer saw it: ``lost`` server versions (applied
    pushes) between the last version the trainer knew and the version the shard restarted at."""

    shard: int
    incarnation: int
    last_seen: int
    restored: int

    @property
    def lost(self) -> int:
        return max(0, self.last_seen - self.restored)


@dataclass
class ChunkReport:
    """What one call to ``run_steps`` produced."""

    rank: int
    scores: list[BatchScore]
    done: bool
    restarts: list[ShardRestart] = field(default_factory=list)


def _batch_tables(model: nn.Module, pool_rows: int) -> BatchedEmbeddingBagCollection:
    """Put the wrapped model's tables on the table-batched kernel (as DMP's sharded collection runs
    them), as one pool of ``pool_rows`` rows that the trainer's row cache fills with the rows of every
    table, keeping the mask wrapper and the rest of the model as they are; returns the new collection."""
    [masked] = [m for m in model.modules() if isinstance(m, MaskedEmbeddingBagCollection)]
    batched = BatchedEmbeddingBagCollection(masked.embedding_bag_configs(), pool_rows=pool_rows)
    setattr(masked, masked.inner_name, batched)
    return batched


class PSTrainer:
    """Train on partition ``rank`` of ``world`` of the job's stream against the parameter server.

    Args:
        rank: this trainer's partition (the torchrun rank partition of ``torchrec_prune.data.stream``).
        job: stream, model and loop settings (``job.train.batch_size`` is the per-trainer batch).
        ps: run shape (trainers, staleness, cache size).
        layout: parameter ownership (same model structure, full-size tables).
        clients: calls to the shards.
        taylor_layers: FQNs of layers whose per-batch neuron Taylor importance is reported.
        forward_fn: ``(model, batch) -> (loss, logits)``, as for ``IncrementalTrainer``.

    Example::

        trainer = PSTrainer(0, job, PSConfig(trainers=1), layout, LocalShards([shard]))
        report = trainer.run_steps(8)
    """

    def __init__(
        self,
        rank: int,
        job: JobConfig,
        ps: PSConfig,
        layout: ParamLayout,
        clients: ShardClients,
        *,
        taylor_layers: tuple[str, ...] = (),
        forward_fn: ForwardFn = default_forward,
    ) -> None:
        self.rank = rank
        self.ps = ps
        self.layout = layout
        self.clients = clients
        self.forward_fn = forward_fn
        self.train = job.train
        stream = make_stream(job)
        self.stream = stream
        self.model = wrap(build_dlrm(replace(model_config_for(stream, job.model), num_embeddings=1))).train()
        self.table_names = list(layout.tables)
        self.pool = _batch_tables(self.model, ps.cache_rows * len(self.table_names))
        self.params = dict(self.model.named_parameters())
        self.buffers = dict(self.model.named_buffers())
        self.cache = RowCache(ps.cache_rows * len(self.table_names))
        self.table_index = {f: self.table_names.index(t) for f, t in layout.feature_table().items()}
        self._key_bases: dict[tuple[str, ...], np.ndarray] = {}  # feature order -> each feature's base
        modules = dict(self.model.named_modules())
        self.taylor_layers = {fqn: modules[fqn] for fqn in taylor_layers}
        self.known = np.zeros(layout.shards, dtype=np.int64)  # latest server version seen, per shard
        self._known_last_step = self.known.copy()  # ``known`` when the last step pushed
        self.dense_version = np.full(layout.shards, _NEVER, dtype=np.int64)
        self.incarnation = np.zeros(layout.shards, dtype=np.int64)
        self.restarts: list[ShardRestart] = []
        self._copies_invalid = False
        self._in_flight: Any = None  # the last push, while its replies are not taken
        self._ahead: Rows | None = None  # the next batch's rows, asked for with the push in flight
        self._pulling: PullPlan | None = None  # what that push asked for
        self.mask_version = 0
        self.batches_done = 0
        self._batches = self._partition()
        self.stats: dict[str, Any] = {
            "rank": rank,
            "steps": 0,
            "samples": 0,
            "pulls": 0,
            "bytes_pulled": 0,
            "bytes_pushed": 0,
            "compute_seconds": 0.0,
            "compute_cpu_seconds": 0.0,
            "step_cpu_seconds": 0.0,  # the whole step on this thread: compute, cache, (de)serialisation
            "pull_seconds": 0.0,
            "push_seconds": 0.0,
            "first_step_at": None,
            "last_step_at": None,
        }

    # ----------------------------------------------------------------------------------------------
    def _partition(self) -> Iterator[tuple[int, int, Batch]]:
        world, size = self.ps.trainers, self.train.batch_size
        for inc in iter_increments(self.stream, self.train.increment_rows, size, self.rank, world):
            ranges = rank_ranges(inc.start_row, inc.start_row + inc.num_rows, size, self.rank, world)
            for (a, b), batch in zip(ranges, inc.batches(), strict=True):
                yield a, b, batch

    def run_steps(self, steps: int) -> ChunkReport:
        """Train on up to ``steps`` more batches of the partition; ``done`` when it is exhausted.

        Inside the chunk each push carries the pull of the next batch's rows; the chunk's last push
        carries none, so no copy outlives the call (between calls the driver may change masks or
        checkpoint).
        """
        scores: list[BatchScore] = []
        done = False
        item = next(self._batches, None)
        for i in range(steps):
            if item is None:
                done = True
                break
            upcoming = next(self._batches, None) if i + 1 < steps else None
            scores.append(self.step(*item, upcoming=None if upcoming is None else upcoming[2]))
            item = upcoming
        self._collect()
        if self._copies_invalid:
            self._invalidate()
        restarts, self.restarts = self.restarts, []
        return ChunkReport(self.rank, scores, done=done, restarts=restarts)

    def step(self, start: int, end: int, batch: Batch, upcoming: Batch | None = None) -> BatchScore:
        """Pull what is missing or stale, score and learn from ``batch``, push its gradients.

        With ``upcoming`` (the next batch to train) the push also asks for the rows and dense tensors
        that batch will need, decided as its own step would decide them now.
        """
        now, step_cpu = time.time(), time.thread_time()
        self.stats["first_step_at"] = self.stats["first_step_at"] or now
        n = batch.labels.numel()
        self.batches_done += 1
        if n == 0:  # every row of the range was malformed
            return BatchScore(start, end, np.zeros(0, np.float32), np.zeros(0, np.float32), finished_at=now)
        rows, self._ahead = self._ahead, None
        self._collect()  # the last push's versions and the rows it pulled (copies dropped later)
        if rows is None:  # not asked for with the last push: decide and pull now
            rows = self._rows(batch.sparse_features)
            self._refresh(rows)
        copy_version = self._copy_versions(rows)
        started, cpu = time.perf_counter(), time.thread_time()
        local = Batch(
            dense_features=batch.dense_features,
            sparse_features=self._remap(batch.sparse_features, rows),
            labels=batch.labels,
        )
        for p in self.params.values():
            p.grad = None
        loss, logits = self.forward_fn(self.model, local)
        loss.backward()
        taylor = self._taylor()
        self.stats["compute_seconds"] += time.perf_counter() - started
        self.stats["compute_cpu_seconds"] += time.thread_time() - cpu
        if upcoming is not None and upcoming.labels.numel() and not self._copies_invalid:
            self._ahead = self._rows(upcoming.sparse_features)
        self._push(rows, copy_version, self._ahead)
        self.stats["steps"] += 1
        self.stats["samples"] += n
        self.stats["last_step_at"] = time.time()
        self.stats["step_cpu_seconds"] += time.thread_time() - step_cpu
        return BatchScore(
            start,
            end,
            logits.detach().numpy().astype(np.float32),
            batch.labels.numpy().astype(np.float32),
            taylor,
            finished_at=self.stats["last_step_at"],
        )

    # ----------------------------------------------------------------------------------------------
    def _rows(self, kjt: KeyedJaggedTensor) -> Rows:
        """The batch's distinct rows of all tables at once: global keys, pool slots, what is new."""
        names = tuple(kjt.keys())
        bases = self._key_bases.get(names)
        if bases is None:
            bases = self._key_bases[names] = self.layout.key_bases[[self.table_index[k] for k in names]]
        keys, inverse = np.unique(
            kjt.values().numpy() + np.repeat(bases, kjt.length_per_key()), return_inverse=True
        )
        slots, new = self.cache.assign(keys)
        return Rows(keys, self.layout.row_owner(self.layout.locate(keys)[1]), slots, new, inverse)

    def _remap(self, kjt: KeyedJaggedTensor, rows: Rows) -> KeyedJaggedTensor:
        """The batch's ids rewritten to pool slots (the local pool's row indices)."""
        return KeyedJaggedTensor(
            keys=kjt.keys(),
            values=as_tensor(rows.slots[rows.inverse]),
            lengths=kjt.lengths(),
            stride=kjt.stride(),
        )

    def _pull_plan(self, rows: Rows, known: np.ndarray) -> PullPlan:
        """What to pull for ``rows``, given the newest server ``known`` versions: rows that are new or
        ``staleness`` versions old, and dense tensors as old; with the pool slots each shard's rows go to."""
        staleness, owner = self.ps.staleness, rows.owner
        stale = rows.new | (known[owner] - self.cache.versions[rows.slots] >= staleness)
        requests: dict[int, PullRequest] = {}
        wanted: dict[int, np.ndarray] = {}
        for s in range(self.layout.shards):
            pick = stale & (owner == s)
            if pick.any():
                requests[s] = PullRequest(keys=rows.keys[pick])
                wanted[s] = rows.slots[pick]
            if known[s] - self.dense_version[s] >= staleness:
                request = requests.setdefault(s, PullRequest())
                request.dense, request.mask_version = True, self.mask_version
        return requests, wanted

    @torch.no_grad()
    def _refresh(self, rows: Rows) -> None:
        """Pull rows and dense tensors ``staleness`` versions old."""
        requests, wanted = self._pull_plan(rows, self.known)
        if requests:
            started = time.perf_counter()
            replies = self.clients.pull(requests)
            self.stats["pull_seconds"] += time.perf_counter() - started
            self.stats["pulls"] += 1
            self._load(requests, replies, wanted)

    def _copy_versions(self, rows: Rows) -> np.ndarray:
        """Per shard, the oldest server version among the copies this step computes with."""
        copy = self.dense_version.copy()
        versions = self.cache.versions[rows.slots]
        for s in range(self.layout.shards):
            mine = versions[rows.owner == s]
            if len(mine):
                copy[s] = min(copy[s], int(mine.min()))
        return copy

    def _load(
        self,
        requests: dict[int, PullRequest],
        replies: dict[int, PullReply],
        wanted: dict[int, np.ndarray],
    ) -> None:
        masks: dict[str, np.ndarray] = {}
        newest = self.mask_version
        pool = self.pool.pool_weight()
        for s, reply in replies.items():
            self.stats["bytes_pulled"] += reply.nbytes
            self._seen(s, reply.version, reply.incarnation)
            if reply.rows is not None:  # in the order asked, as ``wanted[s]``
                pool[as_tensor(wanted[s])] = as_tensor(reply.rows)
                self.cache.versions[wanted[s]] = reply.version
            if requests[s].dense:
                for name, value in reply.dense.items():
                    self.params[name].data.copy_(as_tensor(value))
                self.dense_version[s] = reply.version
            if reply.masks and reply.mask_version > newest:
                masks, newest = reply.masks, reply.mask_version
        for name, value in masks.items():
            self.buffers[name].copy_(as_tensor(value))
        self.mask_version = newest

    def _taylor(self) -> dict[str, np.ndarray]:
        if not self.taylor_layers:
            return {}
        scorer = NeuronTaylor()
        scorer.observe(self.taylor_layers)
        return {fqn: t.numpy() for fqn, t in scorer.scores(self.taylor_layers).items()}

    def _push(self, rows: Rows, copy: np.ndarray, ahead: Rows | None) -> None:
        """Send the step's gradients; with ``ahead``, each shard's push carries the next batch's pull,
        planned with the versions the shards will be at when the next step would decide: the newest known
        plus the versions they advanced by over the last step (at least this push's one). With one
        trainer that is exactly the version this push creates."""
        requests = {
            s: PushRequest(
                copy_version=int(copy[s]),
                mask_version=self.mask_version,
                rank=self.rank,
                batch=self.batches_done - 1,
            )
            for s in range(self.layout.shards)
        }
        for name, shard in self.layout.dense_owner.items():
            grad = self.params[name].grad
            if grad is not None:
                requests[shard].dense[name] = grad.numpy()
        grad = self.pool.pool_grad()
        if grad is not None:
            grad_rows = grad[as_tensor(rows.slots)].numpy()
            for s in range(self.layout.shards):
                pick = rows.owner == s
                if pick.any():
                    requests[s].keys, requests[s].rows = rows.keys[pick], grad_rows[pick]
        pace = np.maximum(1, self.known - self._known_last_step)  # server versions per step, as last seen
        self._known_last_step = self.known.copy()
        if ahead is not None:
            pulls, wanted = self._pull_plan(ahead, self.known + pace)
            for s, pull in pulls.items():
                requests[s].pull = pull
            self._pulling = (pulls, wanted)
            self.stats["pulls"] += bool(pulls)
        self.stats["bytes_pushed"] += sum(r.nbytes for r in requests.values())
        started = time.perf_counter()
        if self.ps.staleness > 1 or ahead is not None:  # the next step waits for it before computing
            self._in_flight = self.clients.push_async(requests)
        else:
            self._replies(self.clients.push(requests))
        self.stats["push_seconds"] += time.perf_counter() - started
        if self._copies_invalid:
            self._invalidate()

    def _collect(self) -> None:
        """Wait for the push in flight (one at most: a shard then applies a trainer's pushes in order and
        a pull sent after it sees it) and take its replies, and the rows pulled with it."""
        if self._in_flight is not None:
            started = time.perf_counter()
            replies = self.clients.wait(self._in_flight)
            self._in_flight = None
            self.stats["push_seconds"] += time.perf_counter() - started
            self._replies(replies)
            if self._pulling is not None:
                pulls, wanted = self._pulling
                self._pulling = None
                self._load(pulls, {s: replies[s].pulled for s in pulls}, wanted)

    def _replies(self, replies: dict[int, PushReply]) -> None:
        for s, reply in replies.items():
            self._seen(s, reply.version, reply.incarnation)
            if reply.mask_version > self.mask_version:
                self._copies_invalid = True

    def _seen(self, shard: int, version: int, incarnation: int) -> None:
        """Track the shard's version; a new incarnation (restored from its checkpoint, versions back)
        is reported, and every copy is pulled again after this step. A reply of an earlier incarnation
        (a push the dead one answered, taken after a pull from the new one) says nothing current."""
        if incarnation < self.incarnation[shard]:
            return
        if incarnation > self.incarnation[shard]:
            self.restarts.append(ShardRestart(shard, incarnation, int(self.known[shard]), version))
            self.incarnation[shard] = incarnation
            self.known[shard] = version
            self._copies_invalid = True
        else:
            self.known[shard] = max(self.known[shard], version)

    def _invalidate(self) -> None:
        """New masks on the server: re-pull every weight (and the masks) before the next step."""
        self.cache.clear()
        self.dense_version[:] = _NEVER
        self._copies_invalid = False

    # ----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counters for the run folder, with the trainer's table memory (bounded by the cache)."""
        table_bytes = self.pool.pool_weight().nbytes
        evictions = self.cache.evictions
        return self.stats | {
            "table_bytes": table_bytes,
            "evictions": evictions,
            "mask_version": self.mask_version,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the trainer is in its partition, and its counters (its weights live on the server)."""
        return {"batches_done": self.batches_done, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip the batches already trained; every weight and the masks are pulled before the next step.

        Without ``stats`` (a trainer restarted after it died) the counters start from zero.
        """
        self._batches = self._partition()
        for _ in range(int(state["batches_done"])):
            next(self._batches, None)
        self.batches_done = int(state["batches_done"])
        if "stats" in state:
            self.stats = dict(state["stats"])
        self.mask_version = -1  # unknown: the next pull brings the server's masks
        self._invalidate()

    def invalidate(self) -> None:
        """Drop every copy: the next step pulls rows, dense tensors and masks as a resumed trainer does."""
        self.mask_version = -1
        self._invalidate()
