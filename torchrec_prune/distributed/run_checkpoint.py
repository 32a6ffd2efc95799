"""Full-state run checkpoints: everything a killed job needs to continue exactly where it was.

One checkpoint, written with ``torch.distributed.checkpoint`` (DCP) by every rank together, holds:

- for each named ``Replica`` (a model and its optimizers; D2S has several): the model's state dict
  (sharded tables, dense weights, every mask), the dense optimizers' state keyed by parameter FQN, and
  the fused table optimizer's state (``table_optimizer``: DMP's, sharded like the tables, or that of
  one process's ``FusedEmbeddingBagCollection`` modules, under the same keys);
- each rank's own run state, one pickled blob per rank (trainer counters and stream position, open
  look-ahead window, pruner and schedule state, RNG states): tensors and plain values, small;
- ``manifest.json``: position in the stream, world size, the job's configuration, a format version.

A checkpoint is complete or invisible: it is written into ``.tmp-ckpt-<position>`` and renamed to
``ckpt-<position>`` (one atomic ``rename`` on the shared file system) by rank 0 after DCP's coordinator
wrote ``.metadata``; the manifest is written before the rename. A job killed during a save leaves only a
``.tmp-`` folder, which is never loaded and is removed by the next save. The last ``keep`` complete
checkpoints are kept.

Model and optimizer tensors are stored by global key and shape, so they reshard to another world size;
the per-rank blobs (stream offsets, each rank's part of the open window) do not, so a full-state resume
needs the world size it was written with (``CheckpointWorldSizeError`` says so and what to do instead).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from torchrec_prune.distributed.checkpoint import (
    CheckpointMismatchError,
    _single_process_is_intended,
    read_metadata,
    reading,
    state_mismatches,
)
from torchrec_prune.distributed.fused_tables import table_optimizer
from torchrec_prune.train.replica import Replica

FORMAT = "torchrec_prune.run_checkpoint/1"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^ckpt-(\d{12})$")
_TMP_PREFIX = ".tmp-ckpt-"


class CheckpointWorldSizeError(ValueError):
    """A full-state checkpoint was written by another number of ranks than this run has."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk: its folder, stream position and manifest."""

    path: Path
    position: int
    manifest: dict[str, Any]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """``id(param) -> FQN`` of what ``optimizer`` trains (TorchRec's keyed optimizers know their names)."""
    keyed = getattr(optimizer, "params", None)
    if isinstance(keyed, Mapping):
        return {id(p): name for name, p in keyed.items()}
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensor state as ``{"<param FQN>/<state key>": tensor}``.

    Keys by FQN (not by position, as ``torch.optim`` does) make the state independent of parameter
    order and let DCP deduplicate replicated dense parameters across ranks.
    """
    names = _param_names(model, optimizer)
    out: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{names[id(param)]}/{key}"] = value
    return out


def _replica_state(name: str, replica: Replica) -> dict[str, Any]:
    state: dict[str, Any] = {f"{name}.model": replica.model.state_dict()}
    for i, optimizer in enumerate(replica.optimizers):
        state[f"{name}.optim{i}"] = _optimizer_tensors(replica.model, optimizer)
    fused = table_optimizer(replica.model)
    if fused is not None:
        state[f"{name}.fused"] = fused.state_dict()["state"]
    return state


class RunCheckpointer:
    """Save and find full-state checkpoints of one run folder.

    Args:
        root: the folder that holds ``ckpt-<position>`` checkpoints (e.g. ``RUN/checkpoints``); on a
            multi-node job it must be on a file system every node sees.
        keep: complete checkpoints to keep (>= 1); older ones are deleted after each save.

    Example::

        ckpt = RunCheckpointer("runs/x/checkpoints", keep=2)
        ckpt.save(position, {"model": Replica(model, [optimizer])}, trainer.state_dict(), manifest)
        info = ckpt.latest()
        if info is not None:
            ckpt.load_replicas(info, {"model": Replica(model, [optimizer])})
            trainer.load_state_dict(ckpt.load_state(info))
    """

    def __init__(self, root: str | os.PathLike, *, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    # ---------------------------------------------------------------------------------------------
    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (``.tmp-`` folders and folders without a manifest skipped)."""
        return complete_checkpoints(self.root, ".metadata")

    def clear(self) -> None:
        """Delete every checkpoint of this folder, complete or not (a run that starts over); collective."""
        if _world()[1] == 0 and self.root.is_dir():
            for path in self.root.iterdir():
                if _NAME.match(path.name) or path.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)
        _barrier()

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or ``None``."""
        done = self.complete()
        return done[-1] if done else None

    # ---------------------------------------------------------------------------------------------
    def save(
        self,
        position: int,
        replicas: Mapping[str, Replica],
        state: Mapping[str, Any],
        manifest: Mapping[str, Any],
    ) -> Path:
        """Write one checkpoint at stream ``position``; every rank calls it (collective).

        Args:
            position: global stream position the run has fully trained up to.
            replicas: models and their optimizers, by name.
            state: this rank's run state (``Stateful.state_dict()`` values), pickled as one blob.
            manifest: JSON-able description of the job (configuration, world size, ...).

        Returns:
            the folder of the new checkpoint.
        """
        world, rank = _world()
        final, tmp = checkpoint_paths(self.root, position)
        if rank == 0:
            remove_unpublished(self.root)
        _barrier()
        blob = io.BytesIO()
        torch.save(dict(state), blob)
        tensors: dict[str, Any] = {f"rank{rank}": blob.getvalue()}
        for name, replica in replicas.items():
            tensors.update(_replica_state(name, replica))
        with _single_process_is_intended():
            dcp.save(tensors, checkpoint_id=tmp)
        if rank == 0:
            body = {"format": FORMAT, "position": position, "world_size": world, **manifest}
            body["replicas"] = sorted(replicas)
            publish(tmp, final, body)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old.path, ignore_errors=True)
        _barrier()
        return final

    # ---------------------------------------------------------------------------------------------
    def load_state(self, info: CheckpointInfo) -> dict[str, Any]:
        """This rank's run state from ``info`` (collective).

        Raises:
            CheckpointWorldSizeError: the checkpoint was written by another number of ranks.
        """
        world, rank = _world()
        check_world_size(info, world)
        holder: dict[str, Any] = {f"rank{rank}": b""}
        with _single_process_is_intended():
            reading(info.path, lambda: dcp.load(holder, checkpoint_id=info.path))
        return torch.load(io.BytesIO(holder[f"rank{rank}"]), weights_only=False)

    def load_replicas(self, info: CheckpointInfo, replicas: Mapping[str, Replica]) -> None:
        """Load models, masks and optimizer state of ``replicas`` from ``info`` in place (collective).

        Optimizer state that a fresh optimizer creates lazily (SGD momentum) is allocated from the
        checkpoint's shapes before loading.

        Raises:
            CheckpointMismatchError: a model key or shape differs (each named, with both shapes).
        """
        metadata = read_metadata(info.path)
        missing = sorted(set(replicas) - set(info.manifest.get("replicas", [])))
        if missing:
            raise ValueError(
                f"checkpoint {str(info.path)!r} holds models {info.manifest.get('replicas')}, not {missing}"
            )
        for name, replica in replicas.items():
            check_model(info, name, replica.model, metadata)
            for i, optimizer in enumerate(replica.optimizers):
                _allocate_lazy_state(metadata, f"{name}.optim{i}", replica.model, optimizer)
        state: dict[str, Any] = {}
        fused_states: dict[str, dict[str, Any]] = {}
        for name, replica in replicas.items():
            state.update(_replica_state(name, replica))
            if f"{name}.fused" in state:
                fused_states[name] = state.pop(f"{name}.fused")
                state.update(_fused_sources(metadata, name, fused_states[name]))
        with _single_process_is_intended():
            reading(info.path, lambda: dcp.load(state, checkpoint_id=info.path))
        for name, replica in replicas.items():
            # DCP fills tensors in place; loading them back lets TorchRec's sharded modules see it.
            replica.model.load_state_dict(state[f"{name}.model"])
            if name in fused_states:
                fused = table_optimizer(replica.model)
                fused.load_state_dict({**fused.state_dict(), "state": fused_states[name]})


def _fused_sources(metadata: Metadata, name: str, fused: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Where each tensor of replica ``name``'s fused optimizer state is read from, by checkpoint key.

    A checkpoint of a one-process run from before one process trained like a DMP rank holds no fused
    state: a table's per-element Adagrad accumulator is the ``sum`` of its dense ``torch.optim.Adagrad``
    (the same quantity as fused exact Adagrad's ``momentum1``), so such a run resumes exactly.
    """
    saved = metadata.state_dict_metadata
    sources: dict[str, torch.Tensor] = {}
    for fqn, entries in fused.items():
        for key, tensor in entries.items():
            flat = f"{name}.fused.{fqn}.{key}"
            older = f"{name}.optim0.{fqn}/sum"
            use_older = flat not in saved and key.endswith(".momentum1") and older in saved
            sources[older if use_older else flat] = tensor
    return sources


def check_world_size(info: CheckpointInfo, world_size: int) -> None:
    """Raise ``CheckpointWorldSizeError`` unless ``info`` was written by ``world_size`` ranks."""
    saved = int(info.manifest["world_size"])
    if saved != world_size:
        raise CheckpointWorldSizeError(
            f"run checkpoint {str(info.path)!r} was written by {saved} rank(s), this run has {world_size}: "
            "each rank's stream offset and its part of the open look-ahead window cannot be split "
            "differently, so a full-state resume needs the same world size (model and optimizer tensors do "
            "reshard: start a new run from them with `prune --checkpoint` or `load_checkpoint`)"
        )


def check_model(info: CheckpointInfo, name: str, model: nn.Module, metadata: Metadata | None = None) -> None:
    """Raise unless replica ``name`` of the checkpoint has exactly ``model``'s state-dict keys and shapes.

    ``model`` may live on ``meta`` (and be unsharded: DMP's state dict has the same keys and global
    shapes), so a command checks a checkpoint before it builds anything real.

    Raises:
        CheckpointMismatchError: naming each differing key with both shapes.
    """
    metadata = metadata or read_metadata(info.path)
    prefix = f"{name}.model."
    saved = {
        key[len(prefix) :]: meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    mismatches = state_mismatches(saved, model.state_dict())
    if mismatches:
        raise CheckpointMismatchError(str(info.path), mismatches)


def _allocate_lazy_state(
    metadata: Metadata, prefix: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    names = _param_names(model, optimizer)
    params = {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(prefix + ".") or not isinstance(meta, TensorStorageMetadata):
            continue
        fqn, _, state_key = key[len(prefix) + 1 :].rpartition("/")
        param = params.get(fqn)
        if param is not None and state_key not in optimizer.state[param]:
            optimizer.state[param][state_key] = torch.empty(
                tuple(meta.size), dtype=meta.properties.dtype, device=param.device
            )


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it, a file written in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_paths(root: Path, position: int) -> tuple[Path, Path]:
    """The published folder of the checkpoint at ``position`` and the temporary one it is written in."""
    return root / f"ckpt-{position:012d}", root / f"{_TMP_PREFIX}{position:012d}"


def remove_unpublished(root: Path) -> None:
    """Create ``root`` and delete the temporary folders of saves an earlier kill cut short."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(tmp: Path, final: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` into the fully written ``tmp``, flush, and make it ``final`` in one rename
    (a checkpoint already at ``final``, the same position saved again, is swapped out, then deleted)."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    fsync_dir(tmp)
    old = final.parent / f"{_TMP_PREFIX}old-{final.name}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path, *required: str) -> list[CheckpointInfo]:
    """Published checkpoints under ``root`` holding a manifest and every ``required`` file, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        manifest = path / MANIFEST
        if match and manifest.is_file() and all((path / name).is_file() for name in required):
            body = reading(path, lambda m=manifest: json.loads(m.read_text()))
            found.append(CheckpointInfo(path, int(match.group(1)), body))
    return sorted(found, key=lambda info: info.position)


def find_run_checkpoint(path: str | os.PathLike) -> CheckpointInfo | None:
    """The run checkpoint ``path`` names: a ``ckpt-<position>`` folder, or a run folder (its newest
    complete run checkpoint); ``None`` when ``path`` is neither (e.g. a weights-only DCP checkpoint).

    Raises:
        FileNotFoundError: a run folder without a complete run checkpoint.
    """
    path = Path(path)
    if _NAME.match(path.name) and path.is_dir():
        for info in RunCheckpointer(path.parent).complete():
            if info.path == path:
                return info
        raise FileNotFoundError(f"run checkpoint {str(path)!r} is incomplete (cut short while it was saved)")
    if (path / "checkpoints").is_dir():
        info = RunCheckpointer(path / "checkpoints").latest()
        if info is None:
            raise FileNotFoundError(f"run folder {str(path)!r} holds no complete run checkpoint")
        return info
    return None


def load_into_one_process(info: CheckpointInfo, name: str, replica: Replica) -> list[str]:
    """Load replica ``name`` of a run checkpoint written by any number of ranks into a one-process model
    and its optimizers (a new job that starts from a trained run, e.g. ``prune``).

    Model tensors reshard by global key. Optimizer state comes from the dense optimizer's entries or, for
    tables trained by DMP's fused Adagrad, from its per-element accumulator (``momentum1``), which is
    the ``sum`` of ``torch.optim.Adagrad``; a model with fused tables (``table_optimizer``) reads its
    kernels' state the same way, from the fused state or a plain run's ``sum``.

    Returns:
        ``<param FQN>/<state key>`` of the optimizer state the checkpoint lacks (left as initialised).

    Raises:
        CheckpointMismatchError: another model (each differing key with both shapes).
    """
    metadata = read_metadata(info.path)
    check_model(info, name, replica.model, metadata)
    saved = metadata.state_dict_metadata
    state: dict[str, Any] = {f"{name}.model": replica.model.state_dict()}
    missing: list[str] = []
    for i, optimizer in enumerate(replica.optimizers):
        _allocate_lazy_state(metadata, f"{name}.optim{i}", replica.model, optimizer)
        names = _param_names(replica.model, optimizer)
        for param, values in optimizer.state.items():
            fqn = names[id(param)]
            for key, value in values.items():
                if not isinstance(value, torch.Tensor):
                    continue
                table = fqn.rsplit(".", 2)[-2] if fqn.endswith(".weight") else ""
                candidates = [f"{name}.optim{i}.{fqn}/{key}"]
                if key == "sum":
                    candidates.append(f"{name}.fused.{fqn}.{table}.momentum1")
                found = next((c for c in candidates if c in saved), None)
                if found is None:
                    missing.append(f"{fqn}/{key}")
                else:
                    state[found] = value
    fused = table_optimizer(replica.model)
    fused_state = {} if fused is None else fused.state_dict()["state"]
    for key, tensor in _fused_sources(metadata, name, fused_state).items():
        if key in saved:
            state[key] = tensor
        else:
            missing.append(key)
    with _single_process_is_intended():
        reading(info.path, lambda: dcp.load(state, checkpoint_id=info.path))
    replica.model.load_state_dict(state[f"{name}.model"])
    if fused is not None:  # DCP filled the kernels' state in place; loading it back is TorchRec's way
        fused.load_state_dict({**fused.state_dict(), "state": fused_state})
    return missing
