"""The driver's view of the asynchronous scores: batches put back in stream order, then windowed.

Trainers finish batches out of order; the look-ahead windows must still be the stream's consecutive
samples, exactly as in one process. ``ScoreCollector`` knows every batch range all trainers will produce
(the same partition the trainers read) and feeds ``LookAheadWindow`` in position order, so window ``k``
covers the same samples as in the synchronous run with the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from torchrec_prune.data.stream import Stream, iter_increments, rank_ranges
from torchrec_prune.distributed.ps.messages import as_tensor
from torchrec_prune.distributed.ps.trainer import BatchScore
from torchrec_prune.metrics.window import LookAheadWindow, WindowRecord


def partition_ranges(
    stream: Stream, increment_rows: int, batch_size: int, rank: int, world: int
) -> list[tuple[int, int]]:
    """The batch ranges of trainer ``rank``, in the order it trains them (index = batch number)."""
    ranges: list[tuple[int, int]] = []
    for inc in iter_increments(stream, increment_rows, batch_size * world, 0, 1):
        ranges += list(rank_ranges(inc.start_row, inc.start_row + inc.num_rows, batch_size, rank, world))
    return ranges


def global_ranges(stream: Stream, increment_rows: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Every batch range of every trainer, in stream order."""
    return sorted(
        r for rank in range(world) for r in partition_ranges(stream, increment_rows, batch_size, rank, world)
    )


class ScoreCollector:
    """Reorder batch scores by stream position and close look-ahead windows as ``LookAheadWindow`` does.

    Args:
        ranges: every batch range that will arrive (``global_ranges``).
        window: look-ahead window size in samples.

    Example::

        collector = ScoreCollector(global_ranges(stream, 20_000, 128, 2), window=5_000)
        for score in collector.add(batch_score):  # in stream order, possibly none yet
            ...
        records = collector.records + collector.finish()
    """

    def __init__(self, ranges: list[tuple[int, int]], window: int) -> None:
        self.ranges = ranges
        self.window = LookAheadWindow(window)
        self.records: list[WindowRecord] = []
        self._next = 0
        self._pending: dict[int, BatchScore] = {}

    @property
    def position(self) -> int:
        """Stream position up to which every batch has been consumed."""
        return self.ranges[self._next][0] if self._next < len(self.ranges) else self.ranges[-1][1]

    @property
    def complete(self) -> bool:
        return self._next == len(self.ranges)

    @property
    def pending(self) -> int:
        """Batches received ahead of a missing earlier one (the reorder buffer's size)."""
        return len(self._pending)

    def add(self, score: BatchScore) -> Iterator[BatchScore]:
        """Accept one batch; yield, in stream order, every batch that is now consumable.

        Windows close as batches are yielded, so a consumer that acts between batches (a schedule)
        sees ``position`` move one batch at a time.
        """
        if score.start in self._pending or self._consumed(score.start):
            raise RuntimeError(f"the batch at stream position {score.start} arrived twice")
        self._pending[score.start] = score
        while self._next < len(self.ranges) and self.ranges[self._next][0] in self._pending:
            ready = self._pending.pop(self.ranges[self._next][0])
            self._next += 1
            if len(ready.labels):
                self.records += self.window.update(as_tensor(ready.logits), as_tensor(ready.labels))
            yield ready

    def skip(self, start: int, end: int) -> Iterator[BatchScore]:
        """Accept a batch trained without a score (its trainer died before reporting it): it counts as
        consumed and adds nothing to its window. Yields what ``add`` would."""
        empty = np.zeros(0, np.float32)
        yield from self.add(BatchScore(start, end, empty, empty))

    def _consumed(self, start: int) -> bool:
        return self._next > 0 and start <= self.ranges[self._next - 1][0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "records": list(self.records),
            "next": self._next,
            "pending": dict(self._pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])
        self.records = list(state["records"])
        self._next = int(state["next"])
        self._pending = dict(state["pending"])

    def finish(self) -> list[WindowRecord]:
        """Close the partial last window; returns it (empty list when none)."""
        last = self.window.flush()
        if last is not None:
            self.records.append(last)
            return [last]
        return []
