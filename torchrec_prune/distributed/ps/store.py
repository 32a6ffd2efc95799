"""A server shard's own checkpoints: whole files published by rename, so a torn write is never read.

A shard saves its state (weights, optimizer state, masks, versions, committed partition offsets) every
``--shard-checkpoint-pushes`` applied pushes and after every mask change, into its own folder. Each save
is written to ``.tmp-<n>``, flushed to disk and renamed to ``state-<n>.pt``; a process killed during the
write leaves only the temporary file, which ``latest`` never reads (and the next save removes). On a
cluster the folder must be on storage every node can reach, as for Ray Train's ``storage_path``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from torchrec_prune.distributed.run_checkpoint import fsync_dir

_STATE = re.compile(r"state-(\d+)\.pt")


class ShardStore:
    """The last ``keep`` checkpoints of one shard in ``folder``.

    Example::

        store = ShardStore(run_dir / "ps" / "shard-0")
        store.save(shard.state_dict())
        shard.load_state_dict(store.latest())  # None when nothing complete was saved
    """

    def __init__(self, folder: str | os.PathLike, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def _complete(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.folder.iterdir():
            match = _STATE.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, state: dict[str, Any]) -> Path:
        """Write ``state`` as the newest checkpoint; older ones beyond ``keep`` and torn files go."""
        complete = self._complete()
        number = complete[-1][0] + 1 if complete else 0
        for stale in self.folder.glob(".tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = self.folder / f".tmp-{number}"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        path = self.folder / f"state-{number}.pt"
        os.replace(tmp, path)
        fsync_dir(self.folder)
        for _, old in complete[: max(0, len(complete) + 1 - self.keep)]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint, or ``None``."""
        complete = self._complete()
        if not complete:
            return None
        return torch.load(complete[-1][1], weights_only=False)
