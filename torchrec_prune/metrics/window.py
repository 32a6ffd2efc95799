"""Look-ahead window evaluation (SPEC 2): each batch is scored before the optimizer sees it.

The scores are cut into windows of exactly ``window_size`` samples of the *global* stream (all ranks
together, a batch that straddles a boundary is split), so a window's metrics describe the same samples
whether the run used one rank or many, and two runs can be compared window by window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist

from torchrec_prune.metrics.functional import bce_sum, binary_auc, correct_sum, normalized_entropy

_INT_FIELDS = frozenset({"window", "samples_end", "n"})
_STATE_KEYS = frozenset(
    "window_size index samples filled rank rank_counts scores labels device totals pending".split()
)
_OPTIONAL_KEYS = frozenset({"pending"})  # absent from states written before batch sizes were deferred


@dataclass(frozen=True)
class WindowRecord:
    """Metrics of one window of the global stream.

    Args:
        window: index of the window, from 0.
        samples_end: global samples seen at the end of the window (the window is the ``n`` samples
            before it).
        n: samples in the window (``window_size`` except for a flushed last window).
        ce: mean binary cross-entropy in nats.
        ne: ``ce / H(ctr)``; NaN when the window has a single class.
        ctr: fraction of positive labels.
        accuracy: accuracy at threshold 0.5.
        auc: ROC AUC (ties count half); NaN when the window has a single class.
    """

    window: int
    samples_end: int
    n: int
    ce: float
    ne: float
    ctr: float
    accuracy: float
    auc: float

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> WindowRecord:
        """Inverse of ``dataclasses.asdict``, also accepting CSV strings and ``None`` for NaN."""
        kwargs: dict[str, int | float] = {}
        for f in fields(cls):
            raw = values[f.name]
            if f.name in _INT_FIELDS:
                kwargs[f.name] = int(raw)  # type: ignore[arg-type]
            else:
                kwargs[f.name] = math.nan if raw is None or raw == "" else float(raw)  # type: ignore[arg-type]
        return cls(**kwargs)  # type: ignore[arg-type]


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WindowRecord))


@dataclass(frozen=True)
class StreamTotals:
    """Whole-stream metrics over every window closed so far (flushed windows included)."""

    n: int
    ce: float
    ne: float
    ctr: float
    accuracy: float


class LookAheadWindow:
    """Accumulate look-ahead scores into fixed-size windows of the global stream.

    Call ``update`` with each batch's logits computed *before* the optimizer step. Under
    ``torch.distributed`` every rank must call ``update`` (and ``flush``) the same number of times; the
    global order of a step's samples is rank 0's batch, then rank 1's, and so on. Sums are all-reduced
    and the window's (score, label) pairs are all-gathered for AUC when a window closes, so every rank
    returns identical records. Collectives run on the device of the logits (CUDA for NCCL).

    Where a window ends depends on every rank's batch size. With ``max_batch`` (a bound on any rank's
    batch) each rank counts its batches locally and the sizes are exchanged in one collective only when
    the bound says a window may have closed, so a training step pays no collective and no host sync for
    metrics; records still come back from the very ``update`` that closes their window. Without it the
    sizes are gathered at every ``update`` (batches of unknown size).

    Args:
        window_size: global samples per window (>= 1).
        process_group: group to reduce over; the default group when ``None`` and distributed is
            initialised.
        max_batch: the most samples any rank passes to one ``update`` (>= 1), or ``None``.

    Example::

        window = LookAheadWindow(1024)
        for batch in stream:
            _, (_, logits, labels) = model(batch)  # before optimizer.step()
            for record in window.update(logits, labels):
                writer.write(record)
        last = window.flush()
    """

    def __init__(
        self,
        window_size: int,
        process_group: dist.ProcessGroup | None = None,
        *,
        max_batch: int | None = None,
    ) -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an int >= 1, got {window_size!r}")
        if max_batch is not None and (
            isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
        ):
            raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
        self.window_size = window_size
        self.max_batch = max_batch
        self._group = process_group
        self._world_rank: tuple[int, int] | None = None
        # Batches of this rank whose global placement is not known yet (max_batch under a process group).
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._index = 0
        self._samples = 0
        self._filled = 0
        self._rank_counts: list[int] = []
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._device = torch.device("cpu")
        # Whole-stream sums over closed windows: bce, positives, correct, n.
        self._totals = [0.0, 0.0, 0.0, 0]

    @property
    def samples_seen(self) -> int:
        """Global samples consumed so far, including those in the open window (under a process group with
        ``max_batch``: as of the last exchange of batch sizes)."""
        return self._samples

    def _world(self) -> tuple[int, int]:
        if self._world_rank is not None:
            return self._world_rank
        if dist.is_available() and dist.is_initialized():
            # Fixed for the group's life: asked once, not at every update (a few calls into c10d).
            self._world_rank = dist.get_world_size(self._group), dist.get_rank(self._group)
            return self._world_rank
        return 1, 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> list[WindowRecord]:
        """Add one batch of this rank; returns the windows this batch completed (usually none or one)."""
        logits = logits.detach().flatten()
        labels = labels.detach().flatten()
        if logits.numel() != labels.numel():
            raise ValueError(f"logits has {logits.numel()} elements but labels has {labels.numel()}")
        self._device = logits.device
        world, rank = self._world()
        if len(self._rank_counts) != world:
            self._rank_counts = [0] * world
        if world == 1:
            n = logits.numel()
            if self._filled + n < self.window_size:  # the usual step: inside the open window
                self._scores.append(logits)
                self._labels.append(labels.float())
                self._rank_counts[0] += n
                self._filled += n
                self._samples += n
                return []
            return self._place([n], rank, logits, labels)
        if self.max_batch is None:
            self._pending.append((logits, labels))
            return self._settle(world, rank)
        if logits.numel() > self.max_batch:
            raise ValueError(f"a batch of {logits.numel()} samples exceeds max_batch={self.max_batch}")
        self._pending.append((logits, labels))
        # Identical on every rank: the same number of updates and the same global counts so far.
        if self._filled + len(self._pending) * world * self.max_batch < self.window_size:
            return []
        return self._settle(world, rank)

    def _settle(self, world: int, rank: int) -> list[WindowRecord]:
        """Exchange the pending batches' sizes (one collective) and place them in windows, in order."""
        pending, self._pending = self._pending, []
        mine = torch.tensor([logits.numel() for logits, _ in pending], dtype=torch.int64, device=self._device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=self._group)
        table = torch.stack(everyone, dim=1).tolist()  # one row per pending batch, one column per rank
        records: list[WindowRecord] = []
        for (logits, labels), sizes in zip(pending, table, strict=True):
            records += self._place(sizes, rank, logits, labels)
        return records

    def _place(
        self, sizes: list[int], rank: int, logits: torch.Tensor, labels: torch.Tensor
    ) -> list[WindowRecord]:
        """Cut one step (``sizes[r]`` samples on rank ``r``) into windows; this rank's part is ``logits``."""
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        records: list[WindowRecord] = []
        start = 0
        while start < bounds[-1]:
            stop = start + min(self.window_size - self._filled, bounds[-1] - start)
            for r in range(len(sizes)):
                self._rank_counts[r] += max(0, min(stop, bounds[r + 1]) - max(start, bounds[r]))
            lo, hi = max(start, bounds[rank]) - bounds[rank], min(stop, bounds[rank + 1]) - bounds[rank]
            if hi > lo:
                whole = hi - lo == logits.numel()  # the usual case: no views to make
                self._scores.append(logits if whole else logits[lo:hi])
                self._labels.append((labels if whole else labels[lo:hi]).float())
            self._filled += stop - start
            self._samples += stop - start
            start = stop
            if self._filled == self.window_size:
                records.append(self._close())
        return records

    def flush(self) -> WindowRecord | None:
        """Close the open, partial window (``None`` when it is empty). Call on every rank."""
        if self._pending:
            world, rank = self._world()
            closed = self._settle(world, rank)
            assert not closed, "a window that could close was settled by its update"
        return self._close() if self._filled else None

    def totals(self) -> StreamTotals:
        """CE, NE, CTR and accuracy over every closed window, weighted by samples."""
        bce, pos, correct, n = self._totals
        if n == 0:
            return StreamTotals(0, math.nan, math.nan, math.nan, math.nan)
        return StreamTotals(n, bce / n, normalized_entropy(bce, pos, n), pos / n, correct / n)

    def state_dict(self) -> dict[str, Any]:
        """This rank's view of the window, for exact resume: counters, the whole-stream sums, and the
        open window's counts per rank with this rank's part of its scores and labels (CPU copies),
        followed by the batches whose sizes were not exchanged yet (``pending``: their sizes).

        Every rank saves its own state, since each holds only its part of the open window.
        """
        _, rank = self._world()
        parts = [*self._scores, *(logits for logits, _ in self._pending)]
        label_parts = [*self._labels, *(labels.float() for _, labels in self._pending)]
        scores = torch.cat(parts) if parts else torch.empty(0)
        labels = torch.cat(label_parts) if label_parts else torch.empty(0)
        return {
            "window_size": self.window_size,
            "index": self._index,
            "samples": self._samples,
            "filled": self._filled,
            "rank": rank,
            "rank_counts": list(self._rank_counts),
            "scores": scores.cpu(),  # cat made a copy: no alias of the live parts
            "labels": labels.cpu(),
            "device": str(self._device),
            "totals": list(self._totals),
            "pending": [logits.numel() for logits, _ in self._pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` of the same rank onto a fresh window; the open window's scores go back
        to the device they came from (the one the collectives of a closing window run on).

        Raises:
            ValueError: keys or ``window_size`` differ, or the open window is non-empty and the state
                comes from another number of ranks or another rank: its partial sums are per rank.
        """
        if not _STATE_KEYS - _OPTIONAL_KEYS <= set(state) <= _STATE_KEYS:
            raise ValueError(
                f"LookAheadWindow state must have keys {sorted(_STATE_KEYS)}, got {sorted(state)}"
            )
        pending = list(state.get("pending", []))
        if state["window_size"] != self.window_size:
            raise ValueError(
                f"LookAheadWindow state has window_size {state['window_size']}, this window has "
                f"{self.window_size}"
            )
        world, rank = self._world()
        saved_world = len(state["rank_counts"])
        if (state["filled"] or pending) and (saved_world, state["rank"]) != (world, rank):
            raise ValueError(
                f"LookAheadWindow state of rank {state['rank']} of {saved_world} cannot be loaded on rank "
                f"{rank} of {world}: its open window holds {state['filled']} samples (and "
                f"{len(pending)} batches not placed yet) whose partial sums are per rank; resume with the "
                "same world size, or from a checkpoint at a window boundary"
            )
        self._index = state["index"]
        self._samples = state["samples"]
        self._filled = state["filled"]
        self._rank_counts = list(state["rank_counts"])
        self._device = torch.device(state["device"])
        scores = state["scores"].to(self._device, copy=True)
        labels = state["labels"].to(self._device, copy=True)
        placed = scores.numel() - sum(pending)
        self._scores = [scores[:placed]] if placed else []
        self._labels = [labels[:placed]] if placed else []
        self._pending = list(zip(scores[placed:].split(pending), labels[placed:].split(pending), strict=True))
        self._totals = list(state["totals"])

    def _close(self) -> WindowRecord:
        if self._scores:
            scores, labels = torch.cat(self._scores), torch.cat(self._labels)
        else:
            scores = labels = torch.empty(0, dtype=torch.float32, device=self._device)
        sums = torch.stack([bce_sum(scores, labels), labels.double().sum(), correct_sum(scores, labels)])
        if len(self._rank_counts) > 1:
            dist.all_reduce(sums, group=self._group)
            scores, labels = self._gather_pairs(scores, labels)
        bce, pos, correct = sums.tolist()
        n = self._filled
        record = WindowRecord(
            window=self._index,
            samples_end=self._samples,
            n=n,
            ce=bce / n,
            ne=normalized_entropy(bce, pos, n),
            ctr=pos / n,
            accuracy=correct / n,
            auc=binary_auc(scores, labels),
        )
        for i, value in enumerate((bce, pos, correct, n)):
            self._totals[i] += value
        self._index += 1
        self._filled = 0
        self._rank_counts = [0] * len(self._rank_counts)
        self._scores, self._labels = [], []
        return record

    def _gather_pairs(self, scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(self._rank_counts)
        mine = torch.zeros(2, width, dtype=torch.float64, device=self._device)
        mine[0, : scores.numel()] = scores.double()
        mine[1, : labels.numel()] = labels.double()
        everyone = [torch.empty_like(mine) for _ in self._rank_counts]
        dist.all_gather(everyone, mine, group=self._group)
        pairs = torch.cat([t[:, :count] for t, count in zip(everyone, self._rank_counts, strict=True)], dim=1)
        return pairs[0], pairs[1]


def _relative(records: Sequence[WindowRecord], reference: Sequence[WindowRecord], field: str) -> list[float]:
    if len(records) != len(reference):
        raise ValueError(
            f"relative {field} needs the same windows: {len(records)} vs {len(reference)} in the reference"
        )
    out: list[float] = []
    for mine, ref in zip(records, reference, strict=True):
        if mine.samples_end != ref.samples_end or mine.n != ref.n:
            raise ValueError(
                f"relative {field}: window {mine.window} covers {mine.n} samples ending at {mine.samples_end}"
                f" but reference window {ref.window} covers {ref.n} ending at {ref.samples_end}"
            )
        out.append(getattr(mine, field) / getattr(ref, field) - 1.0)
    return out


def relative_ce(records: Sequence[WindowRecord], reference_records: Sequence[WindowRecord]) -> list[float]:
    """Per window ``CE(model) / CE(reference) - 1`` on the same samples (|value| > 1e-3 is significant).

    Raises:
        ValueError: when the two runs' windows do not cover the same samples.
    """
    return _relative(records, reference_records, "ce")


def relative_accuracy(
    records: Sequence[WindowRecord], reference_records: Sequence[WindowRecord]
) -> list[float]:
    """Per window ``accuracy(model) / accuracy(reference) - 1`` on the same samples.

    Raises:
        ValueError: when the two runs' windows do not cover the same samples.
    """
    return _relative(records, reference_records, "accuracy")
