"""Checkpoints of wrapped models, sharded or not, with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is the model's ``state_dict``: weights (sharded tables as ``ShardedTensor``) and every mask
buffer. DCP stores tensors by global key and shape, so a checkpoint written by N ranks loads into M
ranks or into a single process. Without a process group DCP runs in single-process mode.

DCP itself fails on a shape mismatch with an error about storage chunks, and a key absent from the
checkpoint surfaces late. ``load_checkpoint`` compares the checkpoint's metadata with the model first
and names every differing key, with both shapes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

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
    """The checkpoint's DCP metadata (keys, global shapes, dtypes)."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no DCP checkpoint at {str(path)!r} (missing .metadata)")
    return dcp.FileSystemReader(path).read_metadata()


def check_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Raise ``CheckpointMismatchError`` unless the checkpoint has exactly the model's keys and shapes."""
    saved = read_metadata(path).state_dict_metadata
    state = model.state_dict()
    mismatches: list[KeyMismatch] = []
    for key in sorted(set(saved) | set(state)):
        ckpt = _describe_saved(saved[key]) if key in saved else None
        mine = _describe_tensor(state[key]) if key in state else None
        if ckpt != mine:
            mismatches.append(KeyMismatch(key=key, checkpoint=ckpt, model=mine))
    if mismatches:
        raise CheckpointMismatchError(str(path), mismatches)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into ``model`` in place, after ``check_checkpoint``.

    Works for a DMP model (each rank reads the parts of its local shards, whatever the sharding at save
    time) and for a plain model in a single process. Under a process group every rank must call it.

    Raises:
        CheckpointMismatchError: (a ``ValueError``) naming each key whose shape or dtype differs, and
            keys present on one side only, mask buffers included.
        FileNotFoundError: if ``path`` holds no DCP checkpoint.
    """
    check_checkpoint(model, path)
    state = model.state_dict()
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=path)
    # DCP fills the state-dict tensors in place; loading them back lets modules that post-process a
    # load (TorchRec's sharded collections) see it, and bumps the masks' version counters.
    model.load_state_dict(state)


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
