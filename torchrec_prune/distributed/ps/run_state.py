"""Whole-run checkpoints of an asynchronous run: what a restarted ``ray-train`` resumes from.

The driver takes one when the consumed stream passes a multiple of ``--checkpoint-every`` rows: it stops
handing out work, lets every queued call report, and saves, at that quiet point, every shard's state, every
trainer's offset and counters and its own state (open window, reorder buffer, schedule, traces, what was
lost). Nothing is in flight, so the parts agree: each batch a trainer pushed has been consumed by the
driver. Each checkpoint is a folder ``checkpoints/ckpt-<position>`` written under a temporary name and
published by one rename after ``manifest.json``; the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_CKPT = re.compile(r"ckpt-(\d+)")


@dataclass(frozen=True)
class AsyncCheckpoint:
    """One complete checkpoint folder and its manifest."""

    path: Path
    position: int
    manifest: dict[str, Any]

    def load(self) -> dict[str, Any]:
        """Shard states, trainer states and the driver's state."""
        shards = [
            torch.load(self.path / f"shard-{s}.pt", weights_only=False)
            for s in range(self.manifest["servers"])
        ]
        return {
            "shards": shards,
            "trainers": torch.load(self.path / "trainers.pt", weights_only=False),
            "driver": torch.load(self.path / "driver.pt", weights_only=False),
        }


class AsyncCheckpoints:
    """The run folder's ``checkpoints/``.

    Args:
        run_dir: the run folder.
        keep: complete checkpoints kept.
        identity: settings a resumed run must share with the one that saved (checked by ``check``).

    Example::

        checkpoints = AsyncCheckpoints(run_dir, keep=2, identity={"trainers": 2, "servers": 1})
        checkpoints.save(position, shards=..., trainers=..., driver=...)
        latest = checkpoints.latest()  # None when no complete checkpoint exists
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int, identity: dict[str, Any]) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.identity = identity

    def complete(self) -> list[AsyncCheckpoint]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _CKPT.fullmatch(path.name)
            if match and (path / "manifest.json").is_file():
                manifest = json.loads((path / "manifest.json").read_text())
                found.append(AsyncCheckpoint(path, int(match.group(1)), manifest))
        return sorted(found, key=lambda c: c.position)

    def latest(self) -> AsyncCheckpoint | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def check(self, checkpoint: AsyncCheckpoint) -> None:
        """Raise ValueError when the checkpoint was written by a run with other settings."""
        saved = checkpoint.manifest["identity"]
        for key, value in self.identity.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"{checkpoint.path} was written with {key}={saved.get(key)!r}, this run has {value!r}: "
                    "use the same settings, another --run-dir, or --resume never"
                )

    def save(
        self,
        position: int,
        *,
        shards: list[dict[str, Any]],
        trainers: list[dict[str, Any]],
        driver: dict[str, Any],
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-ckpt-{position}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for s, state in enumerate(shards):
            torch.save(state, tmp / f"shard-{s}.pt")
        torch.save(trainers, tmp / "trainers.pt")
        torch.save(driver, tmp / "driver.pt")
        manifest = {"position": position, "servers": len(shards), "identity": self.identity}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        final = self.root / f"ckpt-{position}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        return final

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
