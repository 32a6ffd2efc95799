"""Checkpoints of wrapped models, sharded or not, with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is the model's ``state_dict``: weights (sharded tables as ``ShardedTensor``) and every mask
buffer. DCP stores tensors by global key and shape, so a checkpoint written by N ranks loads into M
ranks or into a single process. Without a process group DCP runs in single-process mode.

DCP itself fails on a shape mismatch with an error about storage chunks, and a key absent from the
checkpoint surfaces late. ``load_checkpoint`` compares the checkpoint's metadata with the model first
and names every differing key, with both shapes. A torn or corrupt checkpoint (a truncated or missing
data file, an unreadable ``.metadata``) raises ``CorruptCheckpointError`` naming the file, rather than
the ``EOFError``, ``UnpicklingError`` or zip ``RuntimeError`` of the layer that happened to read it;
``check_files`` finds truncated data files from the metadata alone, before anything is loaded.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

T = TypeVar("T")
# What reading a torn or corrupt DCP checkpoint raises, depending on where the damage is.
_READ_ERRORS = (EOFError, pickle.UnpicklingError, RuntimeError, ValueError, OSError, CheckpointException)

_MASK_SUFFIXES = ("weight_mask", "neuron_mask", "input_mask", "feature_gate")


@dataclass(frozen=True)
class KeyMismatch:
    """One state-dict entry where checkpoint and model differ (``None``: the side lacks the key)."""

    key: str
    checkpoint: str | None
    model: str | None

    @property
    def module(self) -> str:
        return _module_of(self.key)

    def describe(self) -> str:
        kind = "mask " if is_mask_key(self.key) else ""
        where = f"{kind}{self.key!r} of module {self.module!r}"
        if self.checkpoint is None:
            return f"{where}: missing from the checkpoint (model has {self.model})"
        if self.model is None:
            return f"{where}: in the checkpoint ({self.checkpoint}) but not in the model"
        return f"{where}: checkpoint has {self.checkpoint}, model has {self.model}"


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a model with other keys or shapes; ``mismatches`` lists them."""

    def __init__(self, path: str, mismatches: list[KeyMismatch]) -> None:
        self.path = path
        self.mismatches = mismatches
        lines = [m.describe() for m in mismatches]
        hint = ""
        if any(is_mask_key(m.key) and (m.checkpoint is None or m.model is None) for m in mismatches):
            hint = "\n(mask keys differ: was one model not wrapped, or wrapped with another WrapConfig?)"
        super().__init__(
            f"checkpoint {path!r} does not match the model ({len(lines)} differences):\n  "
            + "\n  ".join(lines)
            + hint
        )

    def one_line(self, shown: int = 3) -> str:
        """The first ``shown`` differences on one line, for command-line errors."""
        details = [m.describe() for m in self.mismatches]
        more = f"; and {len(details) - shown} more" if len(details) > shown else ""
        return (
            f"checkpoint {self.path!r} does not match the model ({len(details)} differences; are the model "
            f"and stream flags those it was trained with?): {'; '.join(details[:shown])}{more}"
        )


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are torn (cut short or missing) or unreadable: nothing can be loaded from it."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(
            f"checkpoint {str(path)!r} is torn or corrupt ({reason}); use another checkpoint (a run folder "
            "keeps the last --keep-checkpoints), or delete this one"
        )


def reading(path: str | os.PathLike, read: Callable[[], T]) -> T:
    """``read()``; a torn or corrupt checkpoint at ``path`` raises ``CorruptCheckpointError``."""
    try:
        return read()
    except CorruptCheckpointError:
        raise
    except _READ_ERRORS as e:
        text = " ".join(str(e).split())
        raise CorruptCheckpointError(path, f"{type(e).__name__}: {text[:200]}") from e


def check_files(path: str | os.PathLike) -> None:
    """Raise ``CorruptCheckpointError`` unless every data file the metadata names holds its bytes."""
    sizes: dict[str, int] = {}
    for info in read_metadata(path).storage_data.values():
        name = info.relative_path
        if name not in sizes:
            file = os.path.join(path, name)
            sizes[name] = os.path.getsize(file) if os.path.isfile(file) else -1
        if sizes[name] < 0:
            raise CorruptCheckpointError(path, f"data file {name!r} is missing")
        needed = info.offset + info.length
        if sizes[name] < needed:
            reason = f"data file {name!r} has {sizes[name]} bytes, the metadata needs {needed}"
            raise CorruptCheckpointError(path, reason)


def is_mask_key(key: str) -> bool:
    """Whether a state-dict key is a mask buffer added by ``wrap``."""
    return key.endswith(_MASK_SUFFIXES) or ".dim_masks." in key


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` (weights and masks) to the directory ``path`` with DCP.

    Under a process group every rank must call it; each writes its own shards.
    """
    with _single_process_is_intended():
        dcp.save(model.state_dict(), checkpoint_id=path)


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The checkpoint's DCP metadata (keys, global shapes, dtypes).

    Raises:
        FileNotFoundError: no ``.metadata`` at ``path``.
        CorruptCheckpointError: it cannot be read.
    """
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no DCP checkpoint at {str(path)!r} (missing .metadata)")
    return reading(path, dcp.FileSystemReader(str(path)).read_metadata)


def check_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Raise ``CheckpointMismatchError`` unless the checkpoint has exactly the model's keys and shapes."""
    mismatches = state_mismatches(read_metadata(path).state_dict_metadata, model.state_dict())
    if mismatches:
        raise CheckpointMismatchError(str(path), mismatches)


def state_mismatches(saved: Mapping[str, object], state: Mapping[str, object]) -> list[KeyMismatch]:
    """Keys whose shape or dtype differ between DCP metadata entries and a state dict, and keys present
    on one side only."""
    mismatches: list[KeyMismatch] = []
    for key in sorted(set(saved) | set(state)):
        ckpt = _describe_saved(saved[key]) if key in saved else None
        mine = _describe_tensor(state[key]) if key in state else None
        if ckpt != mine:
            mismatches.append(KeyMismatch(key=key, checkpoint=ckpt, model=mine))
    return mismatches


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into ``model`` in place, after ``check_checkpoint``.

    Works for a DMP model (each rank reads the parts of its local shards, whatever the sharding at save
    time) and for a plain model in a single process. Under a process group every rank must call it.
    A plain checkpoint (no mask keys: written by the model before ``wrap``, e.g. with ``dcp.save``)
    loads into the wrapped model with every mask open (``load_plain_checkpoint``).

    Raises:
        CheckpointMismatchError: (a ``ValueError``) naming each key whose shape or dtype differs, and
            keys present on one side only, mask buffers included.
        FileNotFoundError: if ``path`` holds no DCP checkpoint.
        CorruptCheckpointError: its files are torn or unreadable.
    """
    check_files(path)
    state = model.state_dict()
    if any(is_mask_key(k) for k in state) and not any(
        map(is_mask_key, read_metadata(path).state_dict_metadata)
    ):
        load_plain_checkpoint(model, path)
        return
    check_checkpoint(model, path)
    with _single_process_is_intended():
        reading(path, lambda: dcp.load(state, checkpoint_id=path))
    # DCP fills the state-dict tensors in place; loading them back lets modules that post-process a
    # load (TorchRec's sharded collections) see it, and bumps the masks' version counters.
    model.load_state_dict(state)


def load_plain_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint of the unwrapped model into the wrapped ``model``; every mask is opened.

    Keys are mapped with ``plain_state_keys`` (the wrappers' ``.ebc``/``.ec`` segment dropped, masks
    left out), and compared with the checkpoint first, so a checkpoint of another model is refused
    naming each differing key, as ``check_checkpoint`` does.

    Raises:
        CheckpointMismatchError: a key or shape differs (keys named as the checkpoint has them).
    """
    from torchrec_prune.masks.unwrap import plain_state_keys

    state = model.state_dict()
    plain = {plain_key: state[key] for key, plain_key in plain_state_keys(state).items()}
    saved = read_metadata(path).state_dict_metadata
    mismatches: list[KeyMismatch] = []
    for key in sorted(set(saved) | set(plain)):
        ckpt = _describe_saved(saved[key]) if key in saved else None
        mine = _describe_tensor(plain[key]) if key in plain else None
        if ckpt != mine:
            mismatches.append(KeyMismatch(key=key, checkpoint=ckpt, model=mine))
    if mismatches:
        raise CheckpointMismatchError(str(path), mismatches)
    with _single_process_is_intended():
        dcp.load(plain, checkpoint_id=path)
    opened = {k: torch.ones_like(v) if is_mask_key(k) else v for k, v in state.items()}
    model.load_state_dict(opened)


@contextmanager
def _single_process_is_intended() -> Iterator[None]:
    # Without a process group DCP warns that it assumes a single process: here that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


def _module_of(key: str) -> str:
    head = key.split(".dim_masks.")[0] if ".dim_masks." in key else key.rpartition(".")[0]
    return head or "<root>"


def _describe_saved(meta: object) -> str:
    if isinstance(meta, TensorStorageMetadata):
        return _shape_text(tuple(meta.size), meta.properties.dtype)
    return "a non-tensor value"


def _describe_tensor(value: object) -> str:
    if isinstance(value, torch.Tensor):  # ShardedTensor and DTensor report their global size
        return _shape_text(tuple(value.size()), value.dtype)
    return "a non-tensor value"


def _shape_text(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"shape {shape} {str(dtype).removeprefix('torch.')}"
