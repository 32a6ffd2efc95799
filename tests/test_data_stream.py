"""The stream contract: rank partition, increments, batch layout, argument checks and ``open_stream``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pytest
import torch

from torchrec_prune.data import Stream, SyntheticStream, iter_increments, open_stream
from torchrec_prune.data.stream import Rows, count_batches
from torchrec_prune.models import DLRMConfig, build_dlrm


class PositionStream(Stream):
    """Rows whose dense feature and label encode their position, to see exactly what each rank reads."""

    def __init__(self, num_rows: int, skip: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.num_rows, self.num_dense, self.num_embeddings = num_rows, 1, 10
        self.feature_names = ["cat_0", "cat_1"]
        self.skip = skip

    def _read(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Rows]:
        for start, stop in ranges:
            keep = np.array([p for p in range(start, stop) if p not in self.skip], dtype=np.int64)
            self.stats.malformed["skipped"] += stop - start - len(keep)
            yield Rows(keep[:, None].astype(np.float32), np.stack([keep % 10, keep % 7], axis=1), keep % 2)


def positions(batches: Iterable) -> list[list[int]]:
    return [b.dense_features[:, 0].long().tolist() for b in batches]


@pytest.mark.parametrize(
    ("num_rows", "batch_size", "world_size"),
    [(100, 8, 2), (96, 8, 2), (17, 4, 2), (33, 5, 3), (2, 4, 3), (7, 1, 1), (50, 64, 2)],
)
def test_ranks_partition_disjointly_in_step(num_rows: int, batch_size: int, world_size: int) -> None:
    stream = PositionStream(num_rows)
    per_rank = [
        positions(stream.batches(batch_size, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    counts = {len(batches) for batches in per_rank}
    assert counts == {stream.num_batches(batch_size, world_size=world_size)}
    read = [p for batches in per_rank for batch in batches for p in batch]
    assert len(read) == len(set(read))
    remainder = num_rows % (batch_size * world_size)
    dropped = remainder if remainder < world_size else 0
    assert sorted(read) == list(range(num_rows - dropped))
    for batches in per_rank:
        flat = [p for batch in batches for p in batch]
        assert flat == sorted(flat)
        assert all(batch == list(range(batch[0], batch[0] + len(batch))) for batch in batches)
    # global batch g: rank r holds the r-th contiguous slice of it
    for g in range(len(per_rank[0])):
        starts = [per_rank[r][g][0] for r in range(world_size)]
        assert starts == sorted(starts)


def test_full_global_batch_split_by_rank_and_tail_split_evenly() -> None:
    stream = PositionStream(21)
    rank0 = positions(stream.batches(4, rank=0, world_size=2))
    rank1 = positions(stream.batches(4, rank=1, world_size=2))
    assert rank0 == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18]]
    assert rank1 == [[4, 5, 6, 7], [12, 13, 14, 15], [19, 20]]


def test_tail_smaller_than_world_size_is_dropped_on_every_rank() -> None:
    stream = PositionStream(17)
    per_rank = [positions(stream.batches(4, rank=r, world_size=2)) for r in range(2)]
    assert per_rank == [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13, 14, 15]]]
    assert count_batches(17, 4, 2) == 2 and count_batches(18, 4, 2) == 3


def test_start_row_and_num_rows_select_a_window() -> None:
    stream = PositionStream(100)
    assert positions(stream.batches(4, start_row=10, num_rows=10)) == [
        [10, 11, 12, 13],
        [14, 15, 16, 17],
        [18, 19],
    ]
    assert positions(stream.batches(4, start_row=100)) == []


def test_skipped_rows_shorten_their_batch_but_keep_ranks_in_step() -> None:
    stream = PositionStream(16, skip=frozenset({1, 2, 4, 5, 6, 7}))
    rank0 = positions(stream.batches(4, rank=0, world_size=2))
    rank1 = positions(stream.batches(4, rank=1, world_size=2))
    assert rank0 == [[0, 3], [8, 9, 10, 11]]
    assert rank1 == [[], [12, 13, 14, 15]]
    assert stream.stats.malformed["skipped"] == 6
    assert stream.stats.rows_read == 10


def test_batch_layout_matches_torchrec_and_feeds_dlrm() -> None:
    stream = SyntheticStream(64, num_dense=5, num_sparse=3, num_embeddings=50)
    batch = next(stream.batches(16))
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (16, 5)
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (16,)
    kjt = batch.sparse_features
    assert kjt.keys() == ["cat_0", "cat_1", "cat_2"] and kjt.stride() == 16
    assert torch.equal(kjt.lengths(), torch.ones(48, dtype=torch.int32))
    model = build_dlrm(DLRMConfig(num_dense=5, num_sparse=3, num_embeddings=50, dense_arch=[8, 4]))
    loss, (_, logits, labels) = model(batch)
    assert logits.shape == (16,) and torch.isfinite(loss)


def test_empty_batch_is_well_formed() -> None:
    stream = PositionStream(4, skip=frozenset(range(4)))
    (batch,) = list(stream.batches(4))
    assert batch.dense_features.shape == (0, 1) and batch.labels.shape == (0,)
    assert batch.sparse_features.stride() == 0 and batch.sparse_features.values().numel() == 0


def test_batches_are_copies_of_stream_data() -> None:
    stream = SyntheticStream(32, num_dense=2, num_sparse=2, num_embeddings=20)
    first = next(stream.batches(8))
    first.dense_features.zero_()
    assert torch.count_nonzero(next(stream.batches(8)).dense_features) > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 4, "world_size": 0}, "world_size"),
        ({"batch_size": 4, "rank": 2, "world_size": 2}, "rank"),
        ({"batch_size": 4, "rank": -1}, "rank"),
        ({"batch_size": 4, "start_row": 11}, "start_row"),
        ({"batch_size": 4, "start_row": 5, "num_rows": 6}, "num_rows"),
        ({"batch_size": 4, "num_rows": -1}, "num_rows"),
    ],
)
def test_bad_batch_arguments_name_field_and_range(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be an integer (>=|in \[)"):
        PositionStream(10).batches(**kwargs)


def test_increments_cover_the_stream_in_order() -> None:
    stream = PositionStream(50)
    increments = list(iter_increments(stream, increment_rows=16, batch_size=4, rank=1, world_size=2))
    assert [(i.index, i.start_row, i.num_rows) for i in increments] == [
        (0, 0, 16),
        (1, 16, 16),
        (2, 32, 16),
        (3, 48, 2),
    ]
    assert positions(increments[1].batches()) == [[20, 21, 22, 23], [28, 29, 30, 31]]
    assert positions(increments[3].batches()) == [[49]]
    assert [i.num_batches for i in increments] == [len(list(i.batches())) for i in increments]
    all_ranks = [
        p
        for r in range(2)
        for inc in iter_increments(stream, 16, 4, rank=r, world_size=2)
        for batch in positions(inc.batches())
        for p in batch
    ]
    assert sorted(all_ranks) == list(range(50))


def test_increment_rows_must_hold_a_global_batch() -> None:
    expected = r"increment_rows must be an integer >= batch_size \* world_size = 8, got 7"
    with pytest.raises(ValueError, match=expected):
        next(iter_increments(PositionStream(50), increment_rows=7, batch_size=4, world_size=2))
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 1\]"):
        next(iter_increments(PositionStream(50), increment_rows=8, batch_size=4, rank=2, world_size=2))


def test_open_stream_parses_specs(tmp_path) -> None:
    stream = open_stream("synthetic", num_rows=10, drift=0.5)
    assert isinstance(stream, SyntheticStream) and stream.num_rows == 10 and stream.drift == 0.5
    with pytest.raises(ValueError, match="needs num_rows"):
        open_stream("synthetic")
    for bad in ("parquet:/x", "criteo", "criteo:", "synthetic:5", ""):
        with pytest.raises(ValueError, match="expected 'synthetic', 'criteo:PATH' or 'talkingdata:PATH'"):
            open_stream(bad)
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match=f"Criteo TSV file not found: {missing}"):
        open_stream(f"criteo:{missing}")
    with pytest.raises(FileNotFoundError, match=f"TalkingData CSV file not found: {missing}"):
        open_stream(f"talkingdata:{missing}")
