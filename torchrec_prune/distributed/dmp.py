"""Shard a wrapped TorchRec model with ``DistributedModelParallel`` (SPEC 8).

Wrapping happens before sharding: ``MaskedEmbeddingBagCollection`` composes around the EBC (and
``MaskedEmbeddingCollection`` around the EC), so the planner sees the same collection (now at
``<path>.ebc`` / ``<path>.ec``) and TorchRec's own sharder shards it. The plan is
therefore the unwrapped model's plan, table for table; ``plan_by_table`` makes that checkable.

Embedding tables train with TorchRec's fused optimizer (the update runs inside the backward of the
embedding kernel); everything else, data-parallel tables included, trains with the dense optimizer
returned by ``shard``. Both kinds of state are reset by ``torchrec_prune.masks.surgery`` when masks
change, as far as the fused kernel allows (see ``set_embedding_masks_``).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fused_embeddingbag import FusedEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, Topology, TopologyFactory, TrainerConfig
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    ModuleSharder,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
)
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

# Fused (in-backward) embedding optimizers. "sgd", "adagrad" and "rowwise_adagrad" run on CPU and GPU;
# "adam" needs a GPU. "adagrad" keeps one accumulator per element, "rowwise_adagrad" one per row.
FUSED_OPTIMIZERS: dict[str, EmbOptimType] = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}
DENSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}


@dataclass
class ShardingConfig:
    """How ``shard`` plans the tables and which optimizers train the model.

    Args:
        fused_optimizer: optimizer fused into the embedding kernels, one of ``FUSED_OPTIMIZERS``.
        dense_optimizer: ``torch.optim`` optimizer for the dense parameters, one of ``DENSE_OPTIMIZERS``.
        lr: learning rate of the embedding tables (> 0).
        dense_lr: learning rate of the dense parameters (> 0); ``None`` uses ``lr``.
        momentum: momentum of the dense ``"sgd"`` optimizer, in [0, 1) (the fused exact SGD has none).
        batch_size: per-rank batch size the planner assumes when it estimates costs (>= 1).
        storage_reservation: fraction of each device's memory the planner keeps for dense tensors and
            activations, in [0, 1). A fixed fraction (rather than TorchRec's estimate from the dense
            tensors) keeps the plan independent of the mask buffers that ``wrap`` adds.
        constraints: per-table ``ParameterConstraints`` (sharding types, kernels, column-shard sizes).
    """

    fused_optimizer: str = "rowwise_adagrad"
    dense_optimizer: str = "adagrad"
    lr: float = 0.01
    dense_lr: float | None = None
    momentum: float = 0.0
    batch_size: int = 512
    storage_reservation: float = 0.15
    constraints: Mapping[str, ParameterConstraints] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fused_optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(
                f"ShardingConfig.fused_optimizer must be one of {sorted(FUSED_OPTIMIZERS)}, "
                f"got {self.fused_optimizer!r}"
            )
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(
                f"ShardingConfig.dense_optimizer must be one of {sorted(DENSE_OPTIMIZERS)}, "
                f"got {self.dense_optimizer!r}"
            )
        for name in ("lr", "dense_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ShardingConfig.{name} must be > 0, got {value!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"ShardingConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum and self.dense_optimizer != "sgd":
            raise ValueError(
                f"ShardingConfig.momentum applies to dense_optimizer 'sgd' only, not {self.dense_optimizer!r}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"ShardingConfig.batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not 0 <= self.storage_reservation < 1:
            raise ValueError(
                f"ShardingConfig.storage_reservation must be in [0, 1), got {self.storage_reservation!r}"
            )


@dataclass(frozen=True)
class ShardSummary:
    """One shard of a table: offsets and sizes (rows, columns) and where it lives."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    placement: str


@dataclass(frozen=True)
class TableSharding:
    """A table's ``ParameterSharding`` reduced to what decides where its rows and columns live.

    ``module`` (the FQN of the EBC that holds the table) is informative and not compared: it is the
    one thing that differs between a wrapped and an unwrapped model.
    """

    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    shards: tuple[ShardSummary, ...]
    module: str = field(default="", compare=False)


@dataclass
class ShardedModel:
    """What a trainer needs after sharding.

    Attributes:
        model: the DMP-wrapped model; ``model.fused_optimizer`` holds the embedding optimizers.
        optimizer: dense optimizer over the parameters that are not trained in the backward; call its
            ``step()`` after ``backward()`` and pass it to ``set_masks_``/``prune_``/``grow_``.
        plan: the sharding plan used.
    """

    model: DistributedModelParallel
    optimizer: KeyedOptimizer
    plan: ShardingPlan


def init_distributed(backend: str | None = None, timeout: timedelta | None = None) -> torch.device:
    """Join the process group torchrun describes (env vars) and return this rank's device.

    Uses NCCL on ``cuda:LOCAL_RANK`` when a GPU is visible, otherwise gloo on CPU. Calling it again
    once the group exists only returns the device. ``timeout``: how long a collective waits for the
    other ranks before it fails (gloo and NCCL honour it; default: torch's 30 minutes for gloo).

    After a ``torchrun --max-restarts`` restart the workers share the agent's store with the failed
    attempt, whose ranks left their addresses under the same keys: a new rank could read a dead rank's
    address and fail to connect. The group's keys are therefore prefixed with the restart count.
    """
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt == 0:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                world_size,
                is_master=not agent_store and rank == 0,
                timeout=timedelta(minutes=10),
            )
            prefixed = dist.PrefixStore(f"torchrec_prune/attempt_{attempt}", store)
            dist.init_process_group(
                backend=backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout
            )
    return device


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A process group of this process alone while the block runs, unless one exists already.

    The one-process commands run their trainer, windows and hooks against a group, as on torchrun
    (their tables are fused without DMP: ``replica_factory``); an in-memory store makes it without a
    port or a launcher. The group is destroyed
    when the block ends; one that existed before (torchrun's) is left alone.

    Example::

        with one_process_group():
            replica = build_replica(prepared, torch.device("cpu"))
    """
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


_HEARTBEAT = "torchrec_prune/heartbeat/"


def start_heartbeat(interval: float = 1.0) -> None:
    """Count this rank's heartbeats in the process group's store, from a daemon thread.

    A rank that is stopped (SIGSTOP, a hung kernel) or lost stops counting while its peers wait for it in
    a collective; ``silent_ranks`` then tells the rank whose collective timed out which ranks to name.
    The thread is stopped and joined at exit: a daemon thread still inside the store's C++ call when the
    interpreter finalizes is ended by ``pthread_exit``, whose unwinding through C++ frames aborts the
    rank ("terminate called without an active exception") after its work is done.
    """
    store, rank = dist.distributed_c10d._get_default_store(), dist.get_rank()
    store.set(f"{_HEARTBEAT}pid/{rank}", f"{socket.gethostname()} {os.getpid()}")
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                store.add(f"{_HEARTBEAT}{rank}", 1)
            except RuntimeError:  # the store went away with the job: nothing left to report to
                return
            stop.wait(interval)

    thread = threading.Thread(target=beat, name="torchrec_prune-heartbeat", daemon=True)
    thread.start()
    atexit.register(_stop_heartbeat, stop, thread)


def _stop_heartbeat(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(timeout=10.0)  # one store call at most; a store that hangs longer is left to exit


def silent_ranks(wait: float = 3.0) -> list[int]:
    """Ranks whose heartbeat did not advance during ``wait`` seconds (stopped or lost), in order."""
    store = dist.distributed_c10d._get_default_store()
    keys = [f"{_HEARTBEAT}{r}" for r in range(dist.get_world_size())]
    before = [store.add(key, 0) for key in keys]
    time.sleep(wait)
    return [r for r, key in enumerate(keys) if store.add(key, 0) == before[r]]


def kill_ranks(ranks: list[int]) -> None:
    """SIGKILL ``ranks`` that run on this host. A stopped process cannot act on torchrun's SIGTERM, which
    would hold the job for torchrun's 30-second shutdown grace; ranks on other hosts are left to their
    own agent."""
    store = dist.distributed_c10d._get_default_store()
    for rank in ranks:
        host, pid = store.get(f"{_HEARTBEAT}pid/{rank}").decode().split()
        if host == socket.gethostname():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def make_sharders(config: ShardingConfig) -> list[ModuleSharder[nn.Module]]:
    """TorchRec's ``EmbeddingBagCollection`` and ``EmbeddingCollection`` sharders, both with the fused
    optimizer of ``config``, and the ``FusedEmbeddingBagCollection`` sharder (its optimizer is its own):
    every table of these kinds is planned and sharded, none copied to every rank.

    Example::

        planner.plan(wrap(model), make_sharders(ShardingConfig(fused_optimizer="adagrad")))
    """
    fused = {"optimizer": FUSED_OPTIMIZERS[config.fused_optimizer], "learning_rate": config.lr}
    return [
        EmbeddingBagCollectionSharder(fused_params=dict(fused)),  # type: ignore[list-item]
        EmbeddingCollectionSharder(fused_params=dict(fused)),  # type: ignore[list-item]
        # A FusedEmbeddingBagCollection brings its own optimizer (chosen when the user built it).
        FusedEmbeddingBagCollectionSharder(),  # type: ignore[list-item]
    ]


_MODEL_PARALLEL = [
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
]


def _constraints(model: nn.Module, config: ShardingConfig, compute_device: str) -> dict:
    """The user's constraints, plus: on CPU the tables of a ``FusedEmbeddingBagCollection`` are never
    planned data-parallel (TorchRec 1.8 wraps that lookup in DDP with ``device_ids=[cpu]``, which DDP
    refuses for CPU modules); model-parallel sharding works."""
    constraints = dict(config.constraints)
    if compute_device == "cpu":
        for module in model.modules():
            if isinstance(module, FusedEmbeddingBagCollection):
                for table in module.embedding_bag_configs():
                    constraints.setdefault(table.name, ParameterConstraints(sharding_types=_MODEL_PARALLEL))
    return constraints


def plan_sharding(
    model: nn.Module,
    config: ShardingConfig,
    *,
    world_size: int,
    compute_device: str = "cpu",
    local_world_size: int | None = None,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plan how every ``EmbeddingBagCollection`` and ``EmbeddingCollection`` of ``model`` (on ``meta`` or
    not) is sharded.

    With ``pg`` the plan is made on rank 0 and broadcast, so every rank shards identically; without it
    the plan is made locally (for inspection, or on each rank of a deterministic setup).

    Raises:
        ValueError: unless ``world_size >= 1`` is a multiple of ``local_world_size >= 1`` (ranks per
            host, default ``world_size``).
    """
    local = world_size if local_world_size is None else local_world_size
    if world_size < 1 or local < 1 or world_size % local:
        raise ValueError(
            f"world_size must be >= 1 and a multiple of local_world_size >= 1, got {world_size} and {local}"
        )
    topology: Topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local),
        kernel_config=KernelConfig(compute_device=compute_device),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=config.batch_size,
        storage_reservation=FixedPercentageStorageReservation(config.storage_reservation),
        constraints=_constraints(model, config, compute_device),
        debug=False,
    )
    sharders = make_sharders(config)
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


class _OneRank(DataParallelWrapper):
    """No DDP on a one-rank group: averaging gradients with itself is the identity, and DDP's forward
    and gradient hooks cost 10-20% of a reference DLRM step on CPU."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        dmp._dmp_wrapped_module.to(device)


def shard(
    model: nn.Module,
    device: torch.device,
    config: ShardingConfig | None = None,
    *,
    pg: dist.ProcessGroup | None = None,
    plan: ShardingPlan | None = None,
) -> ShardedModel:
    """Shard ``model`` (wrapped, usually built on ``meta``) over the ranks of ``pg`` with DMP.

    DMP materialises meta parameters on ``device`` and re-initialises their modules (a MaskedLinear's
    masks are reset to all-True there; a MaskedEmbeddingBagCollection's masks are real tensors from the
    start). The dense optimizer is built afterwards, over the materialised non-fused parameters. On a
    one-rank group the dense part is not wrapped in DDP (nothing to average; see ``_OneRank``).

    Args:
        model: the model; call ``torchrec_prune.wrap`` on it first.
        device: this rank's compute device (``init_distributed()`` returns it).
        config: optimizers and planner settings; defaults to ``ShardingConfig()``.
        pg: process group; defaults to the default (WORLD) group, which must be initialised.
        plan: a plan to reuse (e.g. to shard a fresh model exactly like a checkpointed one).
    """
    config = config or ShardingConfig()
    if pg is None:
        if not dist.is_initialized():
            raise RuntimeError("shard() needs a process group: call init_distributed() under torchrun first")
        pg = dist.GroupMember.WORLD
    assert pg is not None
    if plan is None:
        plan = plan_sharding(
            model,
            config,
            world_size=pg.size(),
            compute_device=device.type,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", pg.size())),
            pg=pg,
        )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=make_sharders(config),
        data_parallel_wrapper=_OneRank() if pg.size() == 1 else None,
    )
    return ShardedModel(model=dmp, optimizer=dense_optimizer(dmp, config), plan=plan)


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that no fused kernel steps (neither a sharded table nor one of a
    ``FusedEmbeddingBagCollection``), by name: what a dense optimizer must hold, and nothing more (a
    table in it would be stepped twice)."""
    fused = {
        id(p) for m in model.modules() if isinstance(m, FusedEmbeddingBagCollection) for p in m.parameters()
    }
    return {n: p for n, p in in_backward_optimizer_filter(model.named_parameters()) if id(p) not in fused}


def dense_optimizer(model: nn.Module, config: ShardingConfig) -> KeyedOptimizerWrapper:
    """``config.dense_optimizer`` over ``dense_parameters(model)``, keyed by name.

    Torch's fused kernel: one kernel over all dense tensors, 3x faster than the per-tensor loop on the
    reference MLPs.
    """
    optimizer_cls = DENSE_OPTIMIZERS[config.dense_optimizer]
    kwargs = {"lr": config.lr if config.dense_lr is None else config.dense_lr, "fused": True}
    if config.momentum:
        kwargs["momentum"] = config.momentum
    return KeyedOptimizerWrapper(dense_parameters(model), lambda params: optimizer_cls(params, **kwargs))


def rebuild_data_parallel(model: nn.Module) -> None:
    """Wrap the dense part of every DMP in ``model`` in a new DDP, after its parameters changed shape.

    DDP sizes its gradient buckets by the parameters it was built over, and its reducer keeps each
    parameter's gradient accumulator alive, which checks gradients against the shape it was created
    with: the old reducer is dropped (and collected) before the new DDP asks for the accumulators. The
    parameters are the same objects, so the dense optimizer stays valid. Collective: every rank rebuilds
    at the same step. A DMP without DDP (one rank) is left as it is.
    """
    rebuilt = []
    for dmp in model.modules():
        if isinstance(dmp, DistributedModelParallel) and isinstance(
            dmp._dmp_wrapped_module, DistributedDataParallel
        ):
            old = dmp._dmp_wrapped_module
            dmp._dmp_wrapped_module = old.module
            dmp._ddp_wrapped = False
            for name in ("reducer", "logger"):  # the old DDP may live on in a caller's module dict
                if hasattr(old, name):
                    delattr(old, name)
            rebuilt.append(dmp)
    if rebuilt:
        gc.collect()  # DDP holds reference cycles: its reducer may go only with a collection
    for dmp in rebuilt:
        dmp.init_data_parallel()


def plan_by_table(plan: ShardingPlan) -> dict[str, TableSharding]:
    """Map every table of ``plan`` to its ``TableSharding`` (sharding type, kernel, ranks, shards).

    Two plans shard the same tables the same way exactly when these dicts are equal, whatever the
    module paths (e.g. ``...embedding_bag_collection`` vs ``...embedding_bag_collection.ebc``).

    Raises:
        ValueError: if two modules of the plan hold a table of the same name.
    """
    tables: dict[str, TableSharding] = {}
    for module_path, module_plan in plan.plan.items():
        if not isinstance(module_plan, EmbeddingModuleShardingPlan):
            continue
        for table, sharding in module_plan.items():
            if table in tables:
                raise ValueError(
                    f"table {table!r} is planned in both {tables[table].module!r} and {module_path!r}"
                )
            spec = sharding.sharding_spec
            shards = tuple(
                ShardSummary(
                    offsets=tuple(s.shard_offsets),
                    sizes=tuple(s.shard_sizes),
                    placement=str(s.placement),
                )
                for s in (getattr(spec, "shards", None) or [])
            )
            tables[table] = TableSharding(
                sharding_type=sharding.sharding_type,
                compute_kernel=sharding.compute_kernel,
                ranks=tuple(sharding.ranks or ()),
                shards=shards,
                module=module_path,
            )
    return tables
