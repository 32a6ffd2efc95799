"""The time-ordered stream every data source presents, its rank partition and its increments (SPEC 1).

A stream is a sequence of row *positions* ``0 .. num_rows - 1`` in time order. Training reads it once,
in increments (contiguous chunks). With ``world_size`` ranks, each *global batch* of
``batch_size * world_size`` consecutive positions is split contiguously: rank ``r`` takes positions
``[r * batch_size, (r + 1) * batch_size)`` of it. A final partial global batch of ``R`` positions is split
as evenly as possible (the first ``R % world_size`` ranks take one more) when ``R >= world_size``, and
dropped on every rank otherwise, so every rank yields the same number of batches and DMP's collectives
stay in step. The partition depends only on positions, never on the rows' contents.

Categorical ids: a missing categorical value maps to the reserved id ``MISSING_ID`` (0), with length 1,
so every feature has exactly one id per row and the model can learn what missingness means (in Criteo it
is informative). Present values of file streams are hashed into ``[1, num_embeddings)``.
"""

from __future__ import annotations

from abc import ABC
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

MISSING_ID = 0
DEFAULT_NUM_EMBEDDINGS = 10_000  # the default hash size of torchrec_prune.models.DLRMConfig


def check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]``; else raise ValueError naming ``name``."""
    accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
    in_range = isinstance(value, int) and low <= value and (high is None or value <= high)
    if isinstance(value, bool) or not in_range:
        raise ValueError(f"{name} must be an integer {accepted}, got {value!r}")
    return value


@dataclass
class StreamStats:
    """What a stream has read so far, over every ``batches`` call of this object.

    ``rows_read`` counts rows yielded; ``malformed`` counts rows skipped, by reason.
    """

    rows_read: int = 0
    malformed: Counter[str] = field(default_factory=Counter)

    @property
    def malformed_rows(self) -> int:
        return sum(self.malformed.values())


@dataclass
class Rows:
    """A block of valid rows: dense float32 [n, num_dense], ids int64 [n, num_sparse], labels float32 [n]."""

    dense: np.ndarray
    ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def rank_ranges(
    start_row: int, stop_row: int, batch_size: int, rank: int, world_size: int
) -> Iterator[tuple[int, int]]:
    """Positions ``[a, b)`` of ``rank``'s batches within ``[start_row, stop_row)`` (see module doc)."""
    global_size = batch_size * world_size
    full, remainder = divmod(stop_row - start_row, global_size)
    for g in range(full):
        a = start_row + g * global_size + rank * batch_size
        yield a, a + batch_size
    if remainder >= world_size:
        base, extra = divmod(remainder, world_size)
        a = start_row + full * global_size + rank * base + min(rank, extra)
        yield a, a + base + (rank < extra)


def count_batches(num_rows: int, batch_size: int, world_size: int) -> int:
    """Batches each rank yields for ``num_rows`` positions (the same on every rank)."""
    full, remainder = divmod(num_rows, batch_size * world_size)
    return full + (remainder >= world_size)


def rows_to_batch(rows: Rows, feature_names: list[str]) -> Batch:
    """TorchRec ``Batch`` with one id per feature per row (KJT values are feature-major).

    The tensors are copies, so a consumer that edits a batch in place never alters the stream.
    """
    n, num_sparse = rows.ids.shape
    return Batch(
        dense_features=torch.tensor(rows.dense, dtype=torch.float32),
        sparse_features=KeyedJaggedTensor(
            keys=list(feature_names),
            values=torch.tensor(rows.ids.T.reshape(-1), dtype=torch.int64),
            lengths=torch.ones(n * num_sparse, dtype=torch.int32),
            stride=n,
        ),
        labels=torch.tensor(rows.labels, dtype=torch.float32),
    )


class Stream(ABC):
    """A time-ordered source of TorchRec batches.

    Subclasses set ``num_dense``, ``feature_names``, ``num_embeddings`` and ``num_rows`` and implement
    ``_read`` (sources of rows with one id per feature) or ``_batches`` (sources of ready batches, such as
    ``BatchStream``). File streams skip malformed rows, so a batch can be shorter than its position range (and
    is empty only if every row in it is malformed); the number of batches never depends on the contents,
    so a rank that gets a short batch still takes part in every step's collectives.

    Attributes:
        stats: rows yielded and malformed rows skipped, summed over every read of this object.
    """

    num_dense: int
    feature_names: list[str]
    num_embeddings: int
    num_rows: int

    def __init__(self) -> None:
        self.stats = StreamStats()

    def _read(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Rows]:
        """Yield the valid rows of each position range, in order; ranges are increasing and disjoint."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _read nor _batches")

    def _resolve(self, start_row: int, num_rows: int | None) -> int:
        check_int("start_row", start_row, 0, self.num_rows)
        if num_rows is None:
            return self.num_rows
        check_int("num_rows", num_rows, 0, self.num_rows - start_row)
        return start_row + num_rows

    def num_batches(
        self, batch_size: int, *, world_size: int = 1, start_row: int = 0, num_rows: int | None = None
    ) -> int:
        """How many batches ``batches`` yields on each rank with the same arguments."""
        check_int("batch_size", batch_size, 1)
        check_int("world_size", world_size, 1)
        stop = self._resolve(start_row, num_rows)
        return count_batches(stop - start_row, batch_size, world_size)

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start_row: int = 0,
        num_rows: int | None = None,
    ) -> Iterator[Batch]:
        """This rank's batches of positions ``[start_row, start_row + num_rows)``, in time order.

        Args:
            batch_size: rows per batch per rank (>= 1).
            rank: this rank, in ``[0, world_size)``.
            world_size: number of ranks reading the stream together (>= 1).
            start_row: first position to read, in ``[0, num_rows]``.
            num_rows: positions to read (default: to the end of the stream).
        """
        check_int("batch_size", batch_size, 1)
        check_int("world_size", world_size, 1)
        check_int("rank", rank, 0, world_size - 1)
        stop = self._resolve(start_row, num_rows)
        ranges = rank_ranges(start_row, stop, batch_size, rank, world_size)
        return self._batches(ranges)

    def _batches(self, ranges: Iterator[tuple[int, int]]) -> Iterator[Batch]:
        for rows in self._read(ranges):
            self.stats.rows_read += len(rows)
            yield rows_to_batch(rows, self.feature_names)


class BatchStream(Stream):
    """Your own time-ordered TorchRec ``Batch``es presented as a ``Stream``: re-cut into the trainer's
    batch size, split by rank and read in increments like every built-in source.

    Minimum interface of each batch: ``dense_features`` float ``[B, num_dense]``, ``labels`` ``[B]`` (0/1),
    and ``sparse_features`` a ``KeyedJaggedTensor`` with the same keys in the same order in every batch
    and ``stride() == B``; any number of ids per feature per row (multi-hot, empty allowed), and per-id
    ``weights`` when the KJT has them. Batches may have any, differing, sizes; rows keep their order.

    Args:
        batches: a sequence of batches (read again freely), a zero-argument callable returning a fresh
            iterable of them (read again by calling it), or a one-shot iterable such as a generator
            (read once, forward only; then ``num_rows`` is required).
        num_rows: rows to use (default: every row of ``batches``; counted once for a callable).
        num_embeddings: the hash size the ids fit in, for code that sizes tables from the stream (0:
            not known).

    Raises:
        ValueError: a one-shot iterable without ``num_rows``, no batches, or batches whose keys differ.

    Example::

        def days():  # e.g. one Batch per hour of a log, multi-hot "genres" and "history"
            for path in sorted(Path("log").glob("*.pt")):
                yield torch.load(path)
        stream = BatchStream(days, num_rows=1_000_000)
        IncrementalTrainer(model, TrainConfig(batch_size=256), forward_fn=my_forward).run(stream)
    """

    def __init__(
        self,
        batches: Sequence[Batch] | Callable[[], Iterable[Batch]] | Iterable[Batch],
        *,
        num_rows: int | None = None,
        num_embeddings: int = 0,
    ) -> None:
        super().__init__()
        self._source = batches
        self._one_shot: Iterator[Batch] | None = None
        if not isinstance(batches, Sequence) and not callable(batches):
            if num_rows is None:
                raise ValueError(
                    "BatchStream over a one-shot iterable needs num_rows (or pass a list/callable)"
                )
            self._one_shot = iter(batches)
        self._cursor: tuple[Iterator[Batch], int, Batch] | None = None  # iterator, start of current, current
        first = self._batch_at(0)[1] if num_rows != 0 else None
        total = num_rows if num_rows is not None else sum(b.labels.numel() for b in self._open())
        self.num_rows = check_int("num_rows", total, 0)
        self.num_embeddings = check_int("num_embeddings", num_embeddings, 0)
        self.feature_names = list(first.sparse_features.keys()) if first is not None else []
        self.num_dense = int(first.dense_features.shape[1]) if first is not None else 0

    def _open(self) -> Iterator[Batch]:
        if self._one_shot is not None:
            if self._cursor is not None:
                raise ValueError(
                    "BatchStream over a one-shot iterable reads forward only; pass a list or a callable to "
                    "read it again"
                )
            return self._one_shot
        source = self._source() if callable(self._source) else self._source
        return iter(source)  # type: ignore[arg-type]

    def _batch_at(self, position: int) -> tuple[int, Batch]:
        """The source batch holding row ``position`` and the position of its first row."""
        if self._cursor is None or position < self._cursor[1]:
            iterator = self._open()
            self._cursor = (iterator, 0, self._next(iterator, position))
        iterator, start, batch = self._cursor
        while start + batch.labels.numel() <= position:
            start, batch = start + batch.labels.numel(), self._next(iterator, position)
        self._cursor = (iterator, start, batch)
        return start, batch

    @staticmethod
    def _next(iterator: Iterator[Batch], position: int) -> Batch:
        batch = next(iterator, None)
        if batch is None:
            raise ValueError(f"BatchStream: the batches end before row {position}")
        return batch

    def _batches(self, ranges: Iterator[tuple[int, int]]) -> Iterator[Batch]:
        for a, b in ranges:
            parts: list[tuple[Batch, int, int]] = []
            position = a
            while position < b:
                start, batch = self._batch_at(position)
                stop = min(b, start + batch.labels.numel())
                parts.append((batch, position - start, stop - start))
                position = stop
            self.stats.rows_read += b - a
            yield gather_rows(parts)


def gather_rows(parts: Sequence[tuple[Batch, int, int]]) -> Batch:
    """One ``Batch`` of rows ``[lo, hi)`` of each given batch, in order (multi-hot and weighted KJTs).

    Example::

        gather_rows([(a, 96, 128), (b, 0, 32)])  # the last 32 rows of a, then the first 32 of b
    """
    if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == parts[0][0].labels.numel():
        return parts[0][0]  # a whole batch of the source, as it is (no copy)
    keys = list(parts[0][0].sparse_features.keys())
    weighted = parts[0][0].sparse_features.weights_or_none() is not None
    per_key: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [[] for _ in keys]
    for batch, lo, hi in parts:
        kjt = batch.sparse_features
        if list(kjt.keys()) != keys:
            raise ValueError(
                f"BatchStream: every batch needs the keys {keys} in this order, got {kjt.keys()}"
            )
        rows = kjt.stride()
        offsets, lengths = kjt.offsets(), kjt.lengths().view(len(keys), rows)
        weights = kjt.weights_or_none()
        for f in range(len(keys)):
            s, e = int(offsets[f * rows + lo]), int(offsets[f * rows + hi])
            per_key[f].append(
                (lengths[f, lo:hi], kjt.values()[s:e], None if weights is None else weights[s:e])
            )
    flat = [piece for key in per_key for piece in key]
    return Batch(
        dense_features=torch.cat([b.dense_features[lo:hi] for b, lo, hi in parts]),
        sparse_features=KeyedJaggedTensor(
            keys=keys,
            values=torch.cat([v for _, v, _ in flat]),
            lengths=torch.cat([n for n, _, _ in flat]),
            weights=torch.cat([w for _, _, w in flat]) if weighted else None,  # type: ignore[misc]
            stride=sum(hi - lo for _, lo, hi in parts),
        ),
        labels=torch.cat([b.labels[lo:hi] for b, lo, hi in parts]),
    )


class FileStream(Stream):
    """A stream read from a file: checks the path and the settings every file format shares.

    Args:
        path: the file (``FileNotFoundError`` naming it when absent).
        kind: format name used in messages.
        num_embeddings: hash size of every table (>= 2: id 0 is reserved for missing values).
        strict: raise on the first malformed row instead of counting and skipping it.
        max_rows: keep only the first ``max_rows`` positions (>= 0), or all when ``None``.
    """

    def __init__(self, path: str | Path, kind: str, num_embeddings: int, strict: bool, max_rows: int | None):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{kind} file not found: {self.path}")
        self.num_embeddings = check_int("num_embeddings", num_embeddings, 2)
        self.strict = strict
        self.max_rows = None if max_rows is None else check_int("max_rows", max_rows, 0)


@dataclass(frozen=True)
class Increment:
    """One contiguous chunk (Delta) of the stream, read by one rank."""

    index: int
    start_row: int
    num_rows: int
    stream: Stream = field(repr=False)
    batch_size: int
    rank: int
    world_size: int

    @property
    def num_batches(self) -> int:
        return count_batches(self.num_rows, self.batch_size, self.world_size)

    def batches(self) -> Iterator[Batch]:
        return self.stream.batches(
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            start_row=self.start_row,
            num_rows=self.num_rows,
        )


def iter_increments(
    stream: Stream, increment_rows: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[Increment]:
    """Split the whole stream into increments of ``increment_rows`` positions (the last may be shorter).

    Each increment is partitioned across ranks on its own (see module doc), so an ``increment_rows`` that
    is a multiple of ``batch_size * world_size`` gives full batches everywhere but the stream's end.
    """
    check_int("batch_size", batch_size, 1)
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0, world_size - 1)
    global_size = batch_size * world_size
    if not isinstance(increment_rows, int) or increment_rows < global_size:
        raise ValueError(
            f"increment_rows must be an integer >= batch_size * world_size = {global_size}, "
            f"got {increment_rows!r}"
        )
    for index, start in enumerate(range(0, stream.num_rows, increment_rows)):
        yield Increment(
            index=index,
            start_row=start,
            num_rows=min(increment_rows, stream.num_rows - start),
            stream=stream,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
        )
