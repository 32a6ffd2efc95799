"""A trainer's bounded embedding-row cache: global row ids -> slots of a small local table.

The trainer runs the library's DLRM with tables of ``capacity`` rows and rewrites each batch's ids to
slots, so the forward code is unchanged and the trainer's memory is set by ``capacity``, not by the
tables' size. Each slot remembers the server version its row was pulled at, to decide when to re-pull,
and the batch that last used it: eviction takes the least recently used slots from a queue of slots in
order of use (an entry is stale once its slot is used again, and skipped), so a batch costs what it
touches, not a pass over every slot (a partial sort of 106k slots took 4.8 ms). Ids are found through a
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
        self._queue = np.arange(capacity, dtype=np.int64)  # slots, least recently used first (+ stale)
        self._queued_at = np.full(capacity, -1, dtype=np.int64)  # batch of each queue entry
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
            order = self._least_recent(count)
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
        self._queue = np.concatenate([self._queue, slots])
        self._queued_at = np.concatenate([self._queued_at, np.full(len(slots), self._batch)])
        if len(self._queue) > 2 * self.capacity:  # mostly stale entries (hits): keep the current ones
            current = self._used[self._queue] == self._queued_at
            self._queue, self._queued_at = self._queue[current], self._queued_at[current]
        return slots, new

    def _least_recent(self, count: int) -> np.ndarray:
        """Take the ``count`` least recently used slots off the queue (free ones come first: they were
        queued at -1). An entry whose slot was used after it was queued is stale and dropped; slots this
        batch uses are stale by now, so they are never taken."""
        taken: list[np.ndarray] = []
        head = 0
        while count:
            end = min(len(self._queue), head + 2 * count + 64)
            queued = self._queue[head:end]
            current = np.flatnonzero(self._used[queued] == self._queued_at[head:end])[:count]
            taken.append(queued[current])
            count -= len(current)
            head = head + int(current[-1]) + 1 if count == 0 else end
        self._queue, self._queued_at = self._queue[head:], self._queued_at[head:]
        return np.concatenate(taken)

    def clear(self) -> None:
        """Forget every row (after a mask change every weight must be pulled again)."""
        self._keys = np.empty(0, dtype=np.int64)
        self._key_slots = np.empty(0, dtype=np.int64)
        self._row_of[:] = -1
        self._used[:] = -1
        self._queue = np.arange(self.capacity, dtype=np.int64)
        self._queued_at = np.full(self.capacity, -1, dtype=np.int64)
        self.versions[:] = -1
