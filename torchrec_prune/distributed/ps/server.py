"""One parameter-server shard: master weights, optimizer state and masks of what it owns (SPEC 8).

The shard is a plain class (the Ray actor is a thin shell around it, ``actors.py``), so it is tested
without Ray. Pushes are applied one at a time in arrival order: the actor runs with one thread, which is
the per-shard lock. Shards are separate processes, so pushes to different shards run in parallel
(Hogwild across shards, exact within one); one thread per shard also makes versions and the closed-weight
check exact, and under the GIL threads inside one shard would not apply updates faster anyway.

The optimizer is the library's (``make_optimizer``: Adagrad by default, per element as on the
single-process path); a push's table rows get the same update applied to those rows alone. Mask changes
reuse the library's optimizer-state reset. The owned rows of every table are row blocks of one tensor
(``RowStore``; each table's parameter and optimizer state are views of it), so a push's rows of every
table are read and updated by one index op instead of one per table.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from torchrec_prune.distributed.ps.config import PSConfig
from torchrec_prune.distributed.ps.layout import ParamLayout, has_mask, keep_mask
from torchrec_prune.distributed.ps.messages import PullReply, PullRequest, PushReply, PushRequest, as_tensor
from torchrec_prune.distributed.ps.store import ShardStore
from torchrec_prune.train.optimizer_state import renew_state_
from torchrec_prune.train.trainer import TrainConfig, make_optimizer

_MASK_HISTORY = 8  # mask versions a shard remembers, to mask gradients computed under an older mask


RowRule = Callable[[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor], None]


def _row_rule(optimizer: torch.optim.Optimizer) -> RowRule:
    """The optimizer's update of a few table rows done with index ops. Torch's sparse Adagrad coalesces
    and masks a sparse copy of the whole state for every table (about 0.2 ms each here); the same
    arithmetic on the rows alone is an order of magnitude cheaper. Covered: plain Adagrad (no lr decay,
    weight decay or maximize) and SGD without momentum, the optimizers ``TrainConfig`` builds for the
    parameter server (``PSConfig.check_stream`` refuses momentum)."""
    [group] = optimizer.param_groups
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.Adagrad):
        if group["lr_decay"] or group["weight_decay"] or group["maximize"]:
            return None
        eps = float(group["eps"])

        def adagrad(
            param: torch.Tensor, state: dict[str, Any], rows: torch.Tensor, grad: torch.Tensor
        ) -> None:
            total = state["sum"].index_select(0, rows).addcmul_(grad, grad)
            state["sum"].index_copy_(0, rows, total)
            state["step"] += 1
            param.detach().index_add_(0, rows, grad / total.sqrt_().add_(eps), alpha=-lr)

        return adagrad
    if isinstance(optimizer, torch.optim.SGD) and not group["momentum"] and not group["weight_decay"]:

        def sgd(param: torch.Tensor, state: dict[str, Any], rows: torch.Tensor, grad: torch.Tensor) -> None:
            param.detach().index_add_(0, rows, grad, alpha=-lr)

        return sgd
    raise ValueError(f"the parameter server applies rows with plain Adagrad or SGD only, got {optimizer!r}")


@dataclass
class RowStore:
    """The owned rows of every table in one tensor, and the row rule's state over it.

    Each table's ``nn.Parameter`` (and its optimizer state tensors) are views of a block of rows here.
    """

    weight: torch.Tensor
    offsets: dict[str, int]  # table parameter FQN -> its first row
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, tables: dict[str, np.ndarray]) -> RowStore:
        """Tables (parameter FQN -> owned rows) in layout order; all of one width, as the trainers' shared
        row pool requires."""
        widths = sorted({np.shape(rows)[1:] for rows in tables.values()})
        if len(widths) != 1:
            raise ValueError(f"the parameter server needs tables of one width; got widths {widths}")
        offsets, start = {}, 0
        for name, rows in tables.items():
            offsets[name] = start
            start += len(rows)
        return cls(torch.cat([as_tensor(np.array(rows)) for rows in tables.values()]), offsets)

    @cached_property
    def starts(self) -> np.ndarray:
        """First row of each table, in layout order (index with ``ParamLayout.locate``'s table index)."""
        return np.array(list(self.offsets.values()), dtype=np.int64)

    def view(self, name: str, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """Rows of parameter ``name`` in ``tensor`` (the store's weight or one of its state tensors)."""
        return tensor[self.offsets[name] : self.offsets[name] + rows]

    def share_state(self, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> None:
        """Gather each table's per-element state into store-wide tensors and make the tables' state
        views of them (again after ``optimizer.load_state_dict``, which replaces the tensors)."""
        names = list(self.offsets)
        for key, value in optimizer.state[params[names[0]]].items():
            if not (torch.is_tensor(value) and value.shape == params[names[0]].shape):
                continue
            whole = torch.cat([optimizer.state[params[n]][key] for n in names])
            self.state[key] = whole
            for n in names:
                optimizer.state[params[n]][key] = self.view(n, whole, len(params[n]))
        self.state.setdefault("step", torch.zeros(()))


class ShardState:
    """Weights, optimizer state, masks and version counters of shard ``shard``.

    Args:
        shard: this shard's index.
        layout: who owns what.
        init: the owned part of the initial weights (``ParamLayout.split_state``).
        masks: every mask buffer of the model (FQN -> bool array), all open at the start of a run.
        train: loop settings (optimizer and learning rate).
        regrow_value: value re-opened weights start from (0: the library's zero-init regrowth).
        regrown_state: optimizer state of re-opened entries (``PSConfig.regrown_state``).
        trace_pushes: pushes after a growth over which the norm of regrown weights is recorded.
        store: where the shard checkpoints itself (``None``: never), every ``checkpoint_pushes``
            applied pushes and after every mask change, so a restored shard has the current masks.

    Example::

        shard = ShardState(0, layout, layout.split_state(dict(model.named_parameters()), 0), masks, train)
        reply = shard.pull(PullRequest(keys=layout.keys("t_cat_0", np.array([3, 5])), dense=True))
    """

    def __init__(
        self,
        shard: int,
        layout: ParamLayout,
        init: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
        train: TrainConfig,
        *,
        regrow_value: float = 0.0,
        regrown_state: str = "reset",
        trace_pushes: int = 200,
        store: ShardStore | None = None,
        checkpoint_pushes: int = 0,
    ) -> None:
        self.shard = shard
        self.layout = layout
        tables = [spec.param for spec in layout.tables.values()]
        self.params = {n: nn.Parameter(as_tensor(np.array(v))) for n, v in init.items() if n not in tables}
        self.row_store = RowStore.build({name: init[name] for name in tables})
        for name in tables:
            self.params[name] = nn.Parameter(
                self.row_store.view(name, self.row_store.weight, len(init[name]))
            )
        self.params = {name: self.params[name] for name in init}  # the layout's order
        # The dense optimizer is fused: one kernel over every tensor (0.3 ms a push against 1.2 ms for
        # torch's multi-tensor loop on the reference MLPs), as the DMP jobs' dense optimizers. The tables'
        # optimizer holds their state; the row rule applies its update to the pushed rows. A shard may own
        # no dense tensor.
        dense = [p for n, p in self.params.items() if n not in tables]
        self.optimizers = [make_optimizer(dense, train, fused=True)] if dense else []
        self.optimizers.append(make_optimizer([self.params[n] for n in tables], train))
        self._row_rule = _row_rule(self.optimizers[-1])
        self.row_store.share_state(self.optimizers[-1], self.params)
        self.version = 0
        self.mask_version = 0
        self.incarnation = 0
        self.committed: dict[int, int] = {}  # trainer rank -> index of its last batch this shard took
        self.store = store
        self.checkpoint_pushes = checkpoint_pushes
        self.masks = {name: as_tensor(np.array(m, dtype=bool)) for name, m in masks.items()}
        self._take_keeps(self._keeps())
        self._history: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=_MASK_HISTORY)
        self._history.append((0, self.keeps))
        self.regrow_value = float(regrow_value)
        self.regrown_state = regrown_state
        self.trace_pushes = trace_pushes
        self.traces: list[dict[str, Any]] = []
        self._regrown: dict[str, torch.Tensor] = {}
        self.stats: dict[str, Any] = {
            "pushes": 0,
            "pulls": 0,
            "violations": 0,
            "masked_entries": 0,
            "dropped_pushes": 0,
            "duplicate_pushes": 0,
            "checkpoints": 0,
            "checkpoint_seconds": 0.0,
            "bytes_in": 0,
            "bytes_out": 0,
            "push_seconds": 0.0,
            "pull_seconds": 0.0,
            "push_cpu_seconds": 0.0,  # thread CPU time: the service cost without waiting for a core
            "pull_cpu_seconds": 0.0,
            "staleness": Counter(),
        }

    @classmethod
    def for_run(
        cls,
        shard: int,
        layout: ParamLayout,
        init: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
        train: TrainConfig,
        ps: PSConfig,
        store: ShardStore | None = None,
    ) -> ShardState:
        """Shard ``shard`` of a run with the settings ``ps`` names (regrowth value, traces, checkpoints)."""
        return cls(
            shard,
            layout,
            init,
            masks,
            train,
            regrow_value=ps.regrow_value,
            regrown_state=ps.regrown_state,
            trace_pushes=ps.trace_pushes,
            store=store,
            checkpoint_pushes=ps.shard_checkpoint_pushes,
        )

    # ----------------------------------------------------------------------------------------------
    def _keeps(self) -> dict[str, torch.Tensor]:
        return {
            name: keep_mask(self.layout, name, self.masks)[0]
            for name in self.params
            if has_mask(self.layout, name)
        }

    def _take_keeps(self, keeps: dict[str, torch.Tensor]) -> None:
        """Make ``keeps`` the current masks, with what a push reads from them per row."""
        self.keeps = keeps
        self._open = {name: bool(keep.all()) for name, keep in keeps.items()}
        self._table_keeps = self._by_table(keeps)
        self._tables_open = bool(self._table_keeps.all())

    def _by_table(self, keeps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each table's column mask as one row of a ``[tables, dim]`` tensor (layout order)."""
        return torch.cat([keeps[spec.param] for spec in self.layout.tables.values()])

    def _locate(self, keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Table index and row in the store of each global key."""
        table, ids = self.layout.locate(keys)
        return as_tensor(table), as_tensor(self.row_store.starts[table] + self.layout.local_rows(ids))

    def pull(self, request: PullRequest) -> PullReply:
        """Current weights of the requested rows (and dense tensors and masks when asked)."""
        started, cpu = time.perf_counter(), time.thread_time()
        reply = PullReply(version=self.version, mask_version=self.mask_version, incarnation=self.incarnation)
        if len(request.keys):
            reply.rows = self.row_store.weight[self._locate(request.keys)[1]].numpy()
        if request.dense:
            reply.dense = {
                name: self.params[name].detach().numpy().copy()
                for name in self.layout.owned_dense(self.shard)
            }
            if request.mask_version != self.mask_version:
                reply.masks = {name: m.numpy().copy() for name, m in self.masks.items()}
        self.stats["pulls"] += 1
        self.stats["bytes_out"] += reply.nbytes
        self.stats["pull_seconds"] += time.perf_counter() - started
        self.stats["pull_cpu_seconds"] += time.thread_time() - cpu
        return reply

    def push(self, request: PushRequest) -> PushReply:
        """Apply one trainer's gradients, masked by the current masks and by those it computed under;
        then answer the pull the push carries (the trainer's next batch), in the reply.

        A push of a batch at or before the trainer's committed offset here (Ray retrying a call the
        shard's previous incarnation had taken) is dropped: no batch is applied twice.
        """
        reply = self._take(request)
        if request.pull is not None:
            reply.pulled = self.pull(request.pull)
        return reply

    @torch.no_grad()
    def _take(self, request: PushRequest) -> PushReply:
        started, cpu = time.perf_counter(), time.thread_time()
        if request.batch <= self.committed.get(request.rank, -1):
            self.stats["duplicate_pushes"] += 1
            return PushReply(
                version=self.version, mask_version=self.mask_version, incarnation=self.incarnation
            )
        self.committed[request.rank] = request.batch
        then = self._keeps_at(request.mask_version)
        if then is None:
            self.stats["dropped_pushes"] += 1  # computed under a mask this shard no longer remembers
        else:
            self._apply(request, then)
            self.stats["staleness"][self.version - request.copy_version] += 1
            self.version += 1
            self._record_trace()
        self.stats["pushes"] += 1
        self.stats["bytes_in"] += request.nbytes
        self.stats["push_seconds"] += time.perf_counter() - started
        self.stats["push_cpu_seconds"] += time.thread_time() - cpu
        if self.store is not None and self.checkpoint_pushes and self.version % self.checkpoint_pushes == 0:
            self.checkpoint()
        return PushReply(version=self.version, mask_version=self.mask_version, incarnation=self.incarnation)

    def checkpoint(self) -> None:
        """Save the whole state to the shard's store (a no-op without one)."""
        if self.store is None:
            return
        started = time.perf_counter()
        self.store.save(self.state_dict())
        self.stats["checkpoints"] += 1
        self.stats["checkpoint_seconds"] += time.perf_counter() - started

    def _keeps_at(self, mask_version: int) -> dict[str, torch.Tensor] | None:
        if mask_version >= self.mask_version:  # same masks, or a newer version another shard has already
            return self.keeps
        for version, keeps in self._history:
            if version == mask_version:
                return keeps
        return None

    def _apply(self, request: PushRequest, then: dict[str, torch.Tensor]) -> None:
        current = then is self.keeps
        guards: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, closed, before)
        for name, grad in request.dense.items():
            param, g = self.params[name], as_tensor(grad)
            if name in self.keeps and not (current and self._open[name]):
                g = self._masked(g, self.keeps[name] & then[name])
                closed = ~self.keeps[name].expand_as(param)
                guards.append((param, closed, param.detach()[closed].clone()))
            param.grad = g
        if len(request.keys):  # one update of every table's rows
            table, local = self._locate(request.keys)
            g = as_tensor(request.rows)
            if not (current and self._tables_open):
                computed_under = self._table_keeps if current else self._by_table(then)
                g = self._masked(g, (self._table_keeps & computed_under)[table])
            self._row_rule(self.row_store.weight, self.row_store.state, local, g)
        for optimizer in self.optimizers[:-1]:  # the dense one (the tables' rows are done)
            optimizer.step()
        for param in self.params.values():
            param.grad = None
        for param, closed, before in guards:
            self.stats["violations"] += int((param.detach()[closed] != before).sum())
        if len(request.keys) and not self._tables_open:
            closed = ~self._table_keeps[table]
            self.stats["violations"] += int((self.row_store.weight[local][closed] != 0).sum())

    def _masked(self, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        closed = ~keep.expand_as(grad)
        self.stats["masked_entries"] += int((grad[closed] != 0).sum())
        return grad.masked_fill(closed, 0.0)

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_masks(self, masks: dict[str, np.ndarray], version: int | None = None) -> int:
        """Take new masks: closed and re-opened entries start from 0 (or ``regrow_value`` when re-opened);
        closed entries get fresh optimizer state, re-opened ones the state ``regrown_state`` gives them;
        closed biases keep their value. Returns the new mask version.

        With ``version`` (the driver's), a call for a version the shard already has is a no-op, so Ray
        may retry it on a shard restored after it had taken (and checkpointed) those masks.
        """
        if version is not None and version <= self.mask_version:
            return self.mask_version
        self.masks = {name: as_tensor(np.array(m, dtype=bool)) for name, m in masks.items()}
        new = self._keeps()
        self._regrown = {}
        for name, keep in new.items():
            param, old = self.params[name], self.keeps[name]
            changed = (old ^ keep).expand_as(param)
            renew_state_(self.optimizers, param, old, keep, self.regrown_state)
            if not keep_mask(self.layout, name, self.masks)[1]:
                continue  # a bias: masked in the forward, value kept
            reopened = changed & keep.expand_as(param)
            param.masked_fill_(changed | ~keep.expand_as(param), 0.0)
            if self.regrow_value:
                param.masked_fill_(reopened, self.regrow_value)
            if bool(reopened.any()):
                self._regrown[name] = reopened
        self._take_keeps(new)
        self.mask_version = self.mask_version + 1 if version is None else version
        self._history.append((self.mask_version, new))
        if self._regrown:
            self.traces.append({"mask_version": self.mask_version, "version": self.version, "norms": []})
            self._record_trace()
        self.checkpoint()
        return self.mask_version

    def _record_trace(self) -> None:
        """Norm of the weights re-opened by the last growth, at growth and after each push since."""
        if not self._regrown or len(self.traces[-1]["norms"]) > self.trace_pushes:
            return
        total = sum(
            float(self.params[n].detach()[w].double().square().sum()) for n, w in self._regrown.items()
        )
        self.traces[-1]["norms"].append(total**0.5)

    # ----------------------------------------------------------------------------------------------
    def weights(self) -> dict[str, np.ndarray]:
        """Every owned tensor (for the final model and checkpoints)."""
        return {name: p.detach().numpy().copy() for name, p in self.params.items()}

    def summary(self) -> dict[str, Any]:
        """Counters for the run folder: versions, closed-weight violations, bytes and time."""
        out = self._plain_stats()
        return out | {
            "shard": self.shard,
            "version": self.version,
            "mask_version": self.mask_version,
            "incarnation": self.incarnation,
            "committed": dict(self.committed),
            "traces": self.traces,
        }

    def _plain_stats(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.stats.items()}

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer state, masks, versions, committed offsets and counters: what a restarted
        shard needs."""
        return {
            "weights": self.weights(),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "masks": {name: m.numpy().copy() for name, m in self.masks.items()},
            "version": self.version,
            "mask_version": self.mask_version,
            "incarnation": self.incarnation,
            "committed": dict(self.committed),
            "stats": self._plain_stats(),
            "traces": self.traces,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["weights"].items():
            self.params[name].copy_(as_tensor(value))
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.row_store.share_state(self.optimizers[-1], self.params)
        self.masks = {name: as_tensor(np.array(m, dtype=bool)) for name, m in state["masks"].items()}
        self._take_keeps(self._keeps())
        self.version = int(state["version"])
        self.mask_version = int(state["mask_version"])
        self.incarnation = int(state["incarnation"])
        self.committed = {int(r): int(b) for r, b in state["committed"].items()}
        self.stats = dict(state["stats"]) | {"staleness": Counter(state["stats"]["staleness"])}
        self.traces = list(state["traces"])
        self._regrown = {}
        self._history.clear()
        self._history.append((self.mask_version, self.keeps))

    def restore(self, state: dict[str, Any]) -> None:
        """Load ``state`` as a new incarnation: what a shard restarted after a fault does."""
        self.load_state_dict(state)
        self.incarnation += 1
        self.stats["restored_at_version"] = self.version
