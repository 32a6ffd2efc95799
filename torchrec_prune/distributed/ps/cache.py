"""A trainer's bounded embedding-row cache: global row ids -> slots of a small local table.

The trainer runs the library's DLRM with tables of ``capacity`` rows and rewrites each batch's ids to
slots, so the forward code is unchanged and the trainer's memory is set by ``capacity``, not by the
tables' size. Each slot remembers the server version its row was pulled at, to decide when to re-pull,
and the batch that last used it: eviction takes the least recently used slots, chosen with one
vectorised partial sort per batch instead of a linked list walked id by id. Ids are found through a
sorted array of the cached ids (one binary search for the whole batch), not a dict probed id by id:
with 26 tables and 512-row batches the dict cost 4 ms a step.
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
        self._keys = np.empty(0, dtype=np.int64)  # cached ids, sorted
        self._key_slots = np.empty(0, dtype=np.int64)  # their slots
        self._row_of = np.full(capacity, -1, dtype=np.int64)  # -1: free slot
        self._used = np.full(capacity, -1, dtype=np.int64)  # batch that last used the slot
        self._batch = 0
        self.versions = np.full(capacity, -1, dtype=np.int64)  # -1: never pulled
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._keys)

    def assign(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of the distinct ``ids`` (marked used by this batch) and which of them were not cached.

        Raises:
            ValueError: more distinct ids than slots.
        """
        if len(ids) > self.capacity:
            raise ValueError(f"{len(ids)} distinct rows in one batch exceed the cache of {self.capacity}")
        self._batch += 1
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._keys, ids)
        found = pos < len(self._keys)
        found[found] = self._keys[pos[found]] == ids[found]
        slots = np.full(len(ids), -1, dtype=np.int64)
        slots[found] = self._key_slots[pos[found]]
        new = ~found
        self._used[slots[found]] = self._batch
        count = int(new.sum())
        if count:
            # Free slots have _used -1, so they come first; slots used by this batch are never taken.
            order = np.argpartition(self._used, count - 1)[:count]
            old = self._row_of[order]
            evicted = old[old >= 0]
            self.evictions += len(evicted)
            fresh = ids[new]
            self._row_of[order] = fresh
            self._used[order] = self._batch
            self.versions[order] = -1
            slots[new] = order
            keep = ~np.isin(self._keys, evicted, assume_unique=True)
            keys = np.concatenate([self._keys[keep], fresh])
            index = np.argsort(keys, kind="stable")
            self._keys = keys[index]
            self._key_slots = np.concatenate([self._key_slots[keep], order])[index]
        return slots, new

    def clear(self) -> None:
        """Forget every row (after a mask change every weight must be pulled again)."""
        self._keys = np.empty(0, dtype=np.int64)
        self._key_slots = np.empty(0, dtype=np.int64)
        self._row_of[:] = -1
        self._used[:] = -1
        self.versions[:] = -1
