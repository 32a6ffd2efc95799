"""A trainer's bounded embedding-row cache: global row ids -> slots of a small local table.

The trainer runs the library's DLRM with tables of ``capacity`` rows and rewrites each batch's ids to
slots, so the forward code is unchanged and the trainer's memory is set by ``capacity``, not by the
tables' size. Each slot remembers the server version its row was pulled at, to decide when to re-pull,
and the batch that last used it: eviction takes the least recently used slots, chosen with one
vectorised partial sort per batch instead of a linked list walked id by id.
"""

from __future__ import annotations

import numpy as np


class RowCache:
    """Least-recently-used map from global row ids to ``capacity`` slots.

    Example::

        cache = RowCache(4)
        slots, new = cache.assign(np.array([10, 42]))  # both new: pull them before use
        cache.versions[slots] = 7
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"RowCache capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._slot_of: dict[int, int] = {}
        self._row_of = np.full(capacity, -1, dtype=np.int64)  # -1: free slot
        self._used = np.full(capacity, -1, dtype=np.int64)  # batch that last used the slot
        self._batch = 0
        self.versions = np.full(capacity, -1, dtype=np.int64)  # -1: never pulled
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def assign(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of the distinct ``ids`` (marked used by this batch) and which of them were not cached.

        Raises:
            ValueError: more distinct ids than slots.
        """
        if len(ids) > self.capacity:
            raise ValueError(f"{len(ids)} distinct rows in one batch exceed the cache of {self.capacity}")
        self._batch += 1
        get = self._slot_of.get
        slots = np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))
        new = slots < 0
        self._used[slots[~new]] = self._batch
        if new.any():
            # Free slots have _used -1, so they come first; slots used by this batch are never taken.
            order = np.argpartition(self._used, int(new.sum()) - 1)[: int(new.sum())]
            for slot in order.tolist():
                old = int(self._row_of[slot])
                if old >= 0:
                    del self._slot_of[old]
                    self.evictions += 1
            fresh = ids[new]
            self._row_of[order] = fresh
            self._used[order] = self._batch
            self.versions[order] = -1
            self._slot_of.update(zip(fresh.tolist(), order.tolist(), strict=True))
            slots[new] = order
        return slots, new

    def clear(self) -> None:
        """Forget every row (after a mask change every weight must be pulled again)."""
        self._slot_of.clear()
        self._row_of[:] = -1
        self._used[:] = -1
        self.versions[:] = -1
