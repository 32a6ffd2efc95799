"""The main training job: stream + wrapped DLRM + incremental trainer, in one process or on a torchrun rank.

Everything a run produces lands in its run folder: ``config.json``, ``windows.jsonl``/``windows.csv``
(one look-ahead window per line), ``summary.json``, ``window_ce.png``, the final model as a DCP
``checkpoint/`` (weights and masks) and the full-state run checkpoints ``checkpoints/ckpt-<position>``
written every ``checkpoint_every`` rows (see ``torchrec_prune.distributed.run_checkpoint``).

With ``resume="auto"`` a job whose run folder holds a complete run checkpoint continues from the newest
one: same weights, masks, optimizer state, hook state, look-ahead window and stream position, so the
result equals an uninterrupted run's. That is what makes ``torchrun --max-restarts`` useful: the
restarted ranks run the same command and pick up where the group stopped.

Nothing already trained is lost: ``prepare_job`` refuses a run folder that holds another run
(``check_run_dir``), files are replaced by one rename, a loss or model that turns non-finite stops the
run before anything is saved (``NonFiniteError`` names the last good run checkpoint, left as it was), and
under torchrun a rank that stops answering ends the job after ``timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from torchrec_prune.data import open_stream
from torchrec_prune.data.stream import Stream
from torchrec_prune.distributed.checkpoint import check_files, save_checkpoint
from torchrec_prune.distributed.dmp import (
    ShardingConfig,
    init_distributed,
    one_process_group,
    start_heartbeat,
)
from torchrec_prune.distributed.run_checkpoint import (
    CheckpointInfo,
    RunCheckpointer,
    check_model,
    check_world_size,
)
from torchrec_prune.masks import wrap
from torchrec_prune.masks.compact import expand_, expanded
from torchrec_prune.metrics.writer import MetricsWriter, write_text_atomic
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.numerics import count_denormals, enable_ftz_daz
from torchrec_prune.plots import plot_window_metric
from torchrec_prune.train.hooks import TrainHook
from torchrec_prune.train.replica import (
    DMPReplicaFactory,
    FusedReplicaFactory,
    Replica,
    ReplicaFactory,
)
from torchrec_prune.train.trainer import (
    IncrementalTrainer,
    NonFiniteError,
    RunResult,
    TrainConfig,
)

logger = logging.getLogger(__name__)
RESUME_MODES = ("auto", "never")
# Settings that may change between a run and its resumption: they do not alter what is computed.
RESUMABLE_CHANGES = frozenset(
    {"train.progress", "resume", "checkpoint", "checkpoint_every", "keep_checkpoints", "run_dir", "timeout"}
)
# Files that say a folder is a run folder (every command writes one of them).
RUN_MARKERS = ("config.json", "summary.json")


@dataclass
class JobConfig:
    """One training job.

    Args:
        data: ``synthetic``, ``criteo:PATH`` or ``talkingdata:PATH``.
        rows: rows of the stream to train on (the synthetic stream's length; a cap for files; 0 = all).
        drift: synthetic drift rate (rotations of the click model over the stream; 0 = stationary).
        seed: seed of the synthetic stream and of model initialisation.
        model: DLRM shape; ``num_dense``/``num_sparse`` follow the stream.
        train: loop settings.
        run_dir: where outputs go.
        checkpoint: save a DCP checkpoint at the end.
        checkpoint_every: write a full-state run checkpoint each time training passes a multiple of this
            many stream rows (0: never; >= the global batch otherwise).
        keep_checkpoints: complete run checkpoints kept (>= 1).
        resume: ``auto`` continues from the newest complete run checkpoint of ``run_dir`` (or starts
            when there is none); ``never`` starts over (earlier run checkpoints are deleted as new ones
            are written).
        timeout: seconds a collective waits for the other ranks before the job ends naming the ranks
            that stopped answering (the process group's timeout; > 0).
    """

    data: str = "synthetic"
    rows: int = 100_000
    drift: float = 1.0
    seed: int = 0
    model: DLRMConfig = field(default_factory=DLRMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = "runs/train"
    checkpoint: bool = True
    checkpoint_every: int = 100_000
    keep_checkpoints: int = 2
    resume: str = "auto"
    timeout: float = 1800.0

    def __post_init__(self) -> None:
        if not isinstance(self.rows, int) or self.rows < 0:
            raise ValueError(f"JobConfig.rows must be an integer >= 0 (0 = whole file), got {self.rows!r}")
        if self.data == "synthetic" and self.rows < 1:
            raise ValueError("JobConfig.rows must be >= 1 for the synthetic stream")
        if not 0 <= self.drift < math.inf:
            raise ValueError(f"JobConfig.drift (--drift) must be a finite number >= 0, got {self.drift!r}")
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"--checkpoint-every must be an integer >= 0 rows (0 = off), got {every!r}")
        if 0 < every < self.train.batch_size:
            raise ValueError(
                f"--checkpoint-every must be 0 (off) or >= --batch-size ({self.train.batch_size}) rows, "
                f"got {every}"
            )
        keep = self.keep_checkpoints
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"--keep-checkpoints must be an integer >= 1, got {keep!r}")
        if self.resume not in RESUME_MODES:
            raise ValueError(f"--resume must be one of {'|'.join(RESUME_MODES)}, got {self.resume!r}")
        if not 0 < self.timeout < math.inf:
            raise ValueError(f"--timeout must be a finite number of seconds > 0, got {self.timeout!r}")


def make_stream(config: JobConfig) -> Stream:
    """Open the job's stream, capped at ``config.rows``."""
    kwargs = {"num_embeddings": config.model.num_embeddings}
    if config.data == "synthetic":
        kwargs |= {"num_rows": config.rows, "drift": config.drift, "seed": config.seed}
    elif config.rows:
        kwargs["max_rows"] = config.rows
    return open_stream(config.data, **kwargs)


def model_config_for(stream: Stream, model: DLRMConfig) -> DLRMConfig:
    """``model`` with its input shape taken from the stream."""
    return DLRMConfig(
        num_dense=stream.num_dense,
        num_sparse=len(stream.feature_names),
        num_embeddings=stream.num_embeddings,
        embedding_dim=model.embedding_dim,
        dense_arch=list(model.dense_arch),
        over_arch=list(model.over_arch),
        feature_names=list(stream.feature_names),
    )


def sharding_config(train: TrainConfig) -> ShardingConfig:
    """Fused table optimizer matching the dense one: per-element exact Adagrad (the update and state of
    ``torch.optim.Adagrad``; fbgemm's eps is 1e-8 where torch's is 1e-10) or exact SGD, whose kernel has
    no momentum (``train.momentum`` moves the dense layers)."""
    return ShardingConfig(
        fused_optimizer=train.optimizer,
        dense_optimizer=train.optimizer,
        lr=train.lr,
        momentum=train.momentum,
        batch_size=train.batch_size,
    )


HookFactory = Callable[[Replica], Sequence[TrainHook]]


def _flatten(values: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _first_difference(saved: dict, config: dict) -> tuple[str, object, object] | None:
    """The first setting (but ``RESUMABLE_CHANGES``) whose saved and current values differ."""
    saved = _flatten(saved)
    current = _flatten(json.loads(json.dumps(config)))  # same JSON types as the saved settings
    for key in sorted(set(saved) | set(current)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key):
            return key, current.get(key), saved.get(key)
    return None


def check_resume_config(info: CheckpointInfo, config: dict) -> None:
    """Refuse to resume a run under settings that differ from those it was started with.

    Raises:
        ValueError: naming the first differing setting and both values.
    """
    difference = _first_difference(info.manifest.get("config", {}), config)
    if difference is not None:
        key, current, saved = difference
        flag = "--" + key.rpartition(".")[2].replace("_", "-")
        raise ValueError(
            f"{flag} ({key}) is {current!r} on the command line but {saved!r} in the run "
            f"checkpoint {str(info.path)!r}: resume with the run's settings, or start over with "
            "--overwrite (or another --run-dir)"
        )


def _is_scratch(path: Path) -> bool:
    """Logs (ours, or a job log written beside them) and temporary files: not results of a run."""
    name = path.name
    our_log = name.startswith("log") and name.endswith(".txt")
    return name.startswith(".tmp-") or path.suffix == ".log" or our_log


def check_run_dir(run_dir: str | Path, settings: dict, *, resuming: bool, overwrite: bool) -> None:
    """Refuse a ``--run-dir`` this command cannot write, or whose contents it would clobber.

    A run folder is written without ``--overwrite`` when it is absent or empty, when the command resumes
    from its run checkpoint (the intended way to run a command again; ``prepare_job`` checked the model
    and settings), or when its ``config.json`` records these very settings and it holds no result yet (the
    same run cut short before its first run checkpoint: it is recomputed exactly, so nothing is lost).
    Anything else would mix or destroy results and needs ``--overwrite``: another run's files, a
    finished run (``summary.json``) without a run checkpoint to resume, or run checkpoints that
    ``--resume never`` would delete. ``--overwrite`` replaces a run folder but never a folder that no run
    wrote (no ``RUN_MARKERS``): it would delete whatever else the folder holds.

    Raises:
        NotADirectoryError: the path (or a folder above it) is a file.
        PermissionError: the folder, or the nearest existing folder above it, is not writable.
        ValueError: the folder holds another run, or files of no run (with ``--overwrite``).
    """
    path = Path(run_dir)
    check_writable(path)
    if not path.is_dir() or resuming:
        return
    content = sorted(p.name for p in path.iterdir() if not _is_scratch(p))
    if not content:
        return
    listed = ", ".join(content[:4]) + (", ..." if len(content) > 4 else "")
    if overwrite:
        if not any(name in RUN_MARKERS for name in content):
            raise ValueError(
                f"--run-dir {str(path)!r} is not a run folder (it holds {listed}): --overwrite only "
                "replaces a folder a run wrote; give another --run-dir"
            )
        return
    config = path / "config.json"
    finished = (path / "summary.json").exists() or RunCheckpointer(path / "checkpoints").latest() is not None
    if config.is_file() and not finished and _same_settings(config, settings):
        return
    raise ValueError(
        f"--run-dir {str(path)!r} already holds a run ({listed}) that this command would not resume: "
        "give another --run-dir, or --overwrite to replace it"
    )


def check_writable(run_dir: str | Path) -> None:
    """Raise unless ``run_dir`` is a folder, or can be made one, that this process can write.

    Raises:
        NotADirectoryError: the path (or a folder above it) is a file.
        PermissionError: the folder, or the nearest existing folder above it, is not writable.
    """
    path = Path(run_dir)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"--run-dir {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--run-dir {str(path)!r}: {str(existing)!r} is not writable")


def _same_settings(config: Path, settings: dict) -> bool:
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and _first_difference(saved, settings) is None


def clear_run_dir(run_dir: str | Path) -> None:
    """Delete what a run folder holds (``--overwrite``, after ``check_run_dir`` let it)."""
    path = Path(run_dir)
    if path.is_dir():
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@dataclass
class PreparedJob:
    """A job whose inputs are checked and whose stream is open; nothing has trained yet.

    Attributes:
        config: the job.
        stream: its stream.
        settings: the job's and the command's settings as stored in ``config.json`` and in run checkpoints.
        resume_from: the run checkpoint the job continues from (``None``: a fresh start).
    """

    config: JobConfig
    stream: Stream
    settings: dict
    resume_from: CheckpointInfo | None

    @property
    def checkpointer(self) -> RunCheckpointer:
        return RunCheckpointer(Path(self.config.run_dir) / "checkpoints", keep=self.config.keep_checkpoints)


# Bytes per table parameter a job holds: the weight and its Adagrad accumulator (fused: no table-sized
# gradient), and the copies a run checkpoint or a D2S snapshot makes; more than that cannot fit.
TABLE_BYTES_PER_PARAMETER = 4 * 4


def check_memory(model: DLRMConfig) -> None:
    """Refuse tables that cannot fit this machine's available memory before anything is allocated.

    Raises:
        ValueError: naming --num-embeddings and --embedding-dim, the bytes needed and available.
    """
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not reported on this platform: nothing to check against
        return
    needed = model.num_sparse * model.num_embeddings * model.embedding_dim * TABLE_BYTES_PER_PARAMETER
    if needed > available:
        raise ValueError(
            f"--num-embeddings {model.num_embeddings} x --embedding-dim {model.embedding_dim} over "
            f"{model.num_sparse} tables needs about {needed / 2**30:.1f} GiB (weights, optimizer state, "
            f"checkpoint and snapshot copies); this machine has {available / 2**30:.1f} GiB available"
        )


def prepare_job(
    config: JobConfig,
    stream: Stream | None = None,
    *,
    extra: dict | None = None,
    world_size: int = 1,
    replica: str = "model",
    overwrite: bool = False,
) -> PreparedJob:
    """Open the stream and check the run folder and a resume from it, before anything is built or trained.

    A resume is checked three ways: the checkpoint's model (the replica named ``replica``) has this job's
    keys and shapes (checked on a ``meta`` model), the settings equal the run's (but for
    ``RESUMABLE_CHANGES``), and the world size is the one it was written with. The checkpoint's files
    must also be whole (``check_files``). With ``overwrite`` the folder's run is to be replaced, so it is
    not resumed. Whether the folder may be written at all is the command's call (``check_run_dir``):
    the library lets ``resume="never"`` start over in a folder that holds run checkpoints.

    Raises:
        CheckpointMismatchError: another model (each differing key with both shapes).
        CorruptCheckpointError: the newest run checkpoint is torn or unreadable.
        ValueError: a conflicting setting (named, with both values), another world size, an increment
            smaller than a global batch.
    """
    loop = config.train
    if loop.increment_rows < loop.batch_size * world_size:
        raise ValueError(
            f"--increment-rows ({loop.increment_rows}) must be >= --batch-size x ranks "
            f"({loop.batch_size} x {world_size} = {loop.batch_size * world_size})"
        )
    stream = stream or make_stream(config)
    model_config = model_config_for(stream, config.model)
    check_memory(model_config)
    settings = {**asdict(config), **(extra or {})}
    prepared = PreparedJob(config, stream, settings, None)
    if config.resume == "auto" and not overwrite:
        info = prepared.checkpointer.latest()
        if info is not None:
            check_files(info.path)
            check_model(info, replica, wrap(build_dlrm(model_config, device="meta")))
            check_resume_config(info, settings)
            check_world_size(info, world_size)
        prepared.resume_from = info
    return prepared


def job_position(trainer: IncrementalTrainer, num_rows: int) -> int:
    """Global stream position the trainer has fully trained up to."""
    increment, batches = trainer.resume_position
    train = trainer.config
    return min(num_rows, increment * train.increment_rows + batches * train.batch_size * trainer.world_size)


def job_device(timeout: float | None = None) -> torch.device:
    """Join the torchrun process group when there is one (``WORLD_SIZE`` > 1); this rank's device.

    ``timeout``: seconds a collective waits for the other ranks (default: torch's); every rank also
    starts a heartbeat, so the rank that times out can name the ranks that stopped answering.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = init_distributed(timeout=None if timeout is None else timedelta(seconds=timeout))
        start_heartbeat()
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def replica_factory(prepared: PreparedJob, device: torch.device | str) -> ReplicaFactory:
    """How the job builds its models: on a group of several ranks (torchrun's) DMP shards them
    (``DMPReplicaFactory``); in one process (no group, or a group of one) the tables are held in
    ``FusedEmbeddingBagCollection`` modules (``FusedReplicaFactory``): the same fused kernel and
    optimizer without DMP's distribution around them. Either way the tables train with the fused
    optimizer of ``sharding_config``, under the same state keys.
    """
    model_config = model_config_for(prepared.stream, prepared.config.model)
    sharding, device = sharding_config(prepared.config.train), torch.device(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return DMPReplicaFactory(partial(build_dlrm, model_config, device="meta"), device, sharding)
    return FusedReplicaFactory(partial(build_dlrm, model_config, device=device), sharding)


def build_replica(prepared: PreparedJob, device: torch.device | str) -> Replica:
    """The job's wrapped DLRM and its dense optimizer (``replica_factory``: DMP-sharded over torchrun's
    group, fused tables in one process), seeded by the job, so every start is the same.

    Example::

        replica = build_replica(prepare_job(JobConfig(rows=10_000)), torch.device("cpu"))
    """
    torch.manual_seed(prepared.config.seed)
    return replica_factory(prepared, device).build()


def run_job(
    config: JobConfig | PreparedJob,
    hooks: Sequence[TrainHook] | HookFactory = (),
    stream: Stream | None = None,
    *,
    extra: dict | None = None,
) -> RunResult:
    """Train once over the stream and write the run folder (rank 0 writes files).

    Under torchrun (``WORLD_SIZE`` > 1) each rank joins the process group, builds the model on ``meta``,
    wraps it and lets DMP shard it; rows are partitioned across ranks without overlap. In one process the
    job runs as the single rank of a group of its own (``one_process_group``) with its tables in
    ``FusedEmbeddingBagCollection`` modules (``replica_factory``): the same fused table optimizer, masks and
    run checkpoints as under torchrun. ``hooks`` may be a function of the
    built (sharded) model and its optimizers (a ``Replica``), for pruners and schedules that need them.
    ``extra``: more settings of the command (e.g. a schedule's), stored with the job's and checked the
    same way on resume. With a ``PreparedJob`` the checks already ran.
    """
    enable_ftz_daz()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    prepared = (
        config
        if isinstance(config, PreparedJob)
        else prepare_job(config, stream, extra=extra, world_size=world_size)
    )
    device = job_device(prepared.config.timeout)  # joins torchrun's group, when there is one
    with one_process_group():
        return _train(prepared, hooks, device)


def _train(
    prepared: PreparedJob, hooks: Sequence[TrainHook] | HookFactory, device: torch.device
) -> RunResult:
    config, stream = prepared.config, prepared.stream
    rank = dist.get_rank()
    run_dir = Path(config.run_dir)
    replica = build_replica(prepared, device)
    checkpointer = prepared.checkpointer

    def save(trainer: IncrementalTrainer, final: bool = False) -> None:
        position = job_position(trainer, stream.num_rows)
        if position == stream.num_rows and not final:
            return  # the end of the stream: saved once, after the last window is flushed
        seconds = save_run_checkpoint(prepared, position, {"model": replica}, trainer.state_dict())
        trainer.result.checkpoint_seconds += seconds

    trainer = IncrementalTrainer(
        replica.model,
        config.train,
        optimizers=replica.optimizers,
        hooks=hooks(replica) if callable(hooks) else hooks,
        device=device,
        checkpoint_every=config.checkpoint_every,
        on_checkpoint=save,
    )

    def restore(info: CheckpointInfo) -> None:
        checkpointer.load_replicas(info, {"model": replica})
        trainer.load_state_dict(checkpointer.load_state(info))

    trainer.result.resume_seconds = start_or_resume(prepared, restore)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(prepared.settings, indent=2))
        # a resumed series continues without a gap
        trainer.writer = MetricsWriter(run_dir, trainer.result.records)
    start = time.perf_counter()
    try:
        result = trainer.run(stream)
        result.wall_seconds = time.perf_counter() - start
        expand_(replica.model)  # a run that ends in a compacted sparse phase (prune-only) ends full size
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}{_kept(checkpointer)}") from None
    finally:
        if trainer.writer is not None:
            trainer.writer.close()
    if config.checkpoint_every:
        save(trainer, final=True)  # the finished run: a rerun of the command has nothing left to train
    if config.checkpoint:
        save_checkpoint(replica.model, run_dir / "checkpoint")
    if rank == 0:
        summary = summarize(result, stream, trainer.model)
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        plot_window_metric({"model": result.records}, run_dir / "window_ce.png", title=config.data)
    return result


def save_run_checkpoint(
    prepared: PreparedJob, position: int, replicas: dict[str, Replica], state: dict
) -> float:
    """Save a run checkpoint of the job at ``position`` (collective); the seconds it took.

    Raises:
        NonFiniteError: a replica holds NaN or inf; nothing is saved and the last good checkpoint stays.
    """
    checkpointer = prepared.checkpointer
    manifest = {"config": prepared.settings, "num_rows": prepared.stream.num_rows}
    with contextlib.ExitStack() as full_size:  # a compacted sparse phase saves (and checks) its full layers
        for replica in replicas.values():
            full_size.enter_context(expanded(replica.model))
        for replica in replicas.values():
            bad = non_finite_key(replica.model)
            if bad is not None:
                raise NonFiniteError(
                    f"{bad!r} holds NaN or inf at stream row {position}{_kept(checkpointer)}"
                )
        started = time.perf_counter()
        path = checkpointer.save(position, replicas, state, manifest)
    logger.info("run checkpoint at row %d: %s", position, path)
    return time.perf_counter() - started


def start_or_resume(prepared: PreparedJob, restore: Callable[[CheckpointInfo], None]) -> float | None:
    """Start over (``resume="never"``: the folder's run checkpoints are deleted) or ``restore`` the run
    checkpoint ``prepare_job`` found; the seconds restoring took (``None``: a fresh start). Collective."""
    info = prepared.resume_from
    if prepared.config.resume == "never":
        prepared.checkpointer.clear()
        return None
    if info is None:
        return None
    started = time.perf_counter()
    restore(info)
    seconds = time.perf_counter() - started
    logger.info(
        "resumed from %s at row %d of %d in %.2f s (torchrun restarts so far: %s)",
        info.path,
        info.position,
        prepared.stream.num_rows,
        seconds,
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
    )
    return seconds


def _kept(checkpointer: RunCheckpointer) -> str:
    last = checkpointer.latest()
    if last is None:
        return "; no run checkpoint was written before it, nothing was saved"
    return f"; nothing was saved: the last good run checkpoint {str(last.path)!r} is kept as it was"


def non_finite_key(model: torch.nn.Module) -> str | None:
    """The first state-dict entry of ``model`` (this rank's shards) holding NaN or inf, or ``None``."""
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):  # ShardedTensor: this rank's shards
            tensors = [shard.tensor for shard in value.local_shards()]
        else:
            tensors = [value.to_local() if hasattr(value, "to_local") else value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                if not bool(torch.isfinite(tensor).all()):
                    return key
    return None


def summarize(result: RunResult, stream: Stream, model: torch.nn.Module) -> dict:
    """Headline figures of a run, for ``summary.json`` and the console."""
    records = result.records
    tail = records[-max(1, len(records) // 4) :] if records else []
    return {
        "samples": result.samples,
        "wall_seconds": result.wall_seconds,
        "resume_seconds": result.resume_seconds,
        "checkpoint_seconds": result.checkpoint_seconds,
        "samples_per_second": result.samples / result.wall_seconds if result.wall_seconds else None,
        "windows": len(records),
        "last_quarter_ce": sum(r.ce for r in tail) / len(tail) if tail else None,
        "last_quarter_ne": sum(r.ne for r in tail) / len(tail) if tail else None,
        "last_window": _json_safe(records[-1].__dict__) if records else None,
        "malformed_rows": dict(stream.stats.malformed),
        "training_flops": result.flops.actual,
        "dense_training_flops": result.flops.dense,
        "denormals": count_denormals(model),
    }


def _json_safe(values: dict) -> dict:
    """JSON has no NaN (NE/AUC of a single-class window): write ``null`` as the metrics writer does."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def summarize_line(result: RunResult, run_dir: str | Path) -> str:
    """One line for the console."""
    last = result.records[-1] if result.records else None
    figures = (
        f"last window CE {last.ce:.4f} NE {last.ne:.4f} AUC {last.auc:.4f}" if last else "no window closed"
    )
    return f"trained {result.samples} samples in {result.steps} steps; {figures}; outputs in {run_dir}"
