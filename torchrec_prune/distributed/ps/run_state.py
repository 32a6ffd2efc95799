"""Whole-run checkpoints of an asynchronous run: what a restarted ``ray-train`` resumes from.

The driver takes one when the consumed stream passes a multiple of ``--checkpoint-every`` rows: it stops
handing out work, lets every queued call report, and saves, at that quiet point, every shard's state, every
trainer's offset and counters and its own state (open window, reorder buffer, schedule, traces, what was
lost). Nothing is in flight, so the parts agree: each batch a trainer pushed has been consumed by the
driver. Each checkpoint is a folder ``checkpoints/ckpt-<position>`` written under a temporary name and
published by one rename after ``manifest.json``, by the same code as the synchronous run checkpoints
(``run_checkpoint.publish``); the last ``keep`` are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from torchrec_prune.distributed.run_checkpoint import (
    CheckpointInfo,
    checkpoint_paths,
    complete_checkpoints,
    publish,
    remove_unpublished,
)


class AsyncCheckpoints:
    """The run folder's ``checkpoints/``, named and published as the synchronous run checkpoints are.

    Args:
        run_dir: the run folder.
        keep: complete checkpoints kept.
        identity: settings a resumed run must share with the one that saved (checked by ``check``).

    Example::

        checkpoints = AsyncCheckpoints(run_dir, keep=2, identity={"trainers": 2, "servers": 1})
        checkpoints.save(position, shards=..., trainers=..., driver=...)
        latest = checkpoints.latest()  # None when no complete checkpoint exists
        state = checkpoints.load(latest)
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int, identity: dict[str, Any]) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.identity = identity

    def complete(self) -> list[CheckpointInfo]:
        return complete_checkpoints(self.root, "driver.pt")

    def latest(self) -> CheckpointInfo | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def check(self, checkpoint: CheckpointInfo) -> None:
        """Raise ValueError when the checkpoint was written by a run with other settings."""
        saved = checkpoint.manifest["identity"]
        for key, value in self.identity.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"{checkpoint.path} was written with {key}={saved.get(key)!r}, this run has {value!r}: "
                    "use the same settings, another --run-dir, or --resume never"
                )

    def load(self, checkpoint: CheckpointInfo) -> dict[str, Any]:
        """Shard states, trainer states and the driver's state."""
        path = checkpoint.path
        shards = [
            torch.load(path / f"shard-{s}.pt", weights_only=False)
            for s in range(checkpoint.manifest["servers"])
        ]
        return {
            "shards": shards,
            "trainers": torch.load(path / "trainers.pt", weights_only=False),
            "driver": torch.load(path / "driver.pt", weights_only=False),
        }

    def save(
        self,
        position: int,
        *,
        shards: list[dict[str, Any]],
        trainers: list[dict[str, Any]],
        driver: dict[str, Any],
    ) -> Path:
        final, tmp = checkpoint_paths(self.root, position)
        remove_unpublished(self.root)
        tmp.mkdir()
        for s, state in enumerate(shards):
            torch.save(state, tmp / f"shard-{s}.pt")
        torch.save(trainers, tmp / "trainers.pt")
        torch.save(driver, tmp / "driver.pt")
        publish(tmp, final, {"position": position, "servers": len(shards), "identity": self.identity})
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        return final

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
