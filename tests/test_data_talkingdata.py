"""TalkingDataStream: time order, no label leak, features, malformed rows, and the real 100k sample."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_prune.data import TalkingDataStream
from torchrec_prune.data.talkingdata import CATEGORICAL_COLUMNS, DENSE_COLUMNS
from torchrec_prune.models import DLRMConfig, build_dlrm

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "talkingdata" / "train_sample.csv"
HEADER = "ip,app,device,os,channel,click_time,attributed_time,is_attributed"


def write(tmp_path: Path, rows: list[str], header: str = "\ufeff" + HEADER, name: str = "clicks.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def read(stream: TalkingDataStream, batch_size: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batches = list(stream.batches(batch_size))
    ids = torch.cat([b.sparse_features.values().view(len(CATEGORICAL_COLUMNS), -1).T for b in batches])
    return torch.cat([b.dense_features for b in batches]), ids, torch.cat([b.labels for b in batches])


UNSORTED = [
    "5,1,1,1,10,2017-11-07 10:00:00,,0",
    "7,2,1,1,11,2017-11-06 16:30:00,2017-11-06 16:31:00,1",
    "5,1,1,1,12,2017-11-06 23:59:59,,0",
    "9,3,1,1,13,2017-11-06 16:30:00,,0",
    "5,2,1,1,14,2017-11-07 10:00:00,,0",
]


def test_rows_sorted_by_click_time_with_ties_in_file_order(tmp_path: Path) -> None:
    stream = TalkingDataStream(write(tmp_path, UNSORTED), num_embeddings=1000)
    _, ids, labels = read(stream)
    assert np.all(np.diff(stream.click_time) >= 0)
    assert ids[:, CATEGORICAL_COLUMNS.index("channel")].tolist() == [1 + c for c in (11, 13, 12, 10, 14)]
    assert labels.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    first = datetime(2017, 11, 6, 16, 30, tzinfo=timezone.utc).timestamp()
    assert stream.click_time[0] == first


def test_attributed_time_is_not_a_feature(tmp_path: Path) -> None:
    blanked = [",".join(r.split(",")[:6] + ["", r.split(",")[7]]) for r in UNSORTED]
    with_leak = read(TalkingDataStream(write(tmp_path, UNSORTED, name="a.csv")))
    without = read(TalkingDataStream(write(tmp_path, blanked, name="b.csv")))
    for a, b in zip(with_leak, without, strict=True):
        assert torch.equal(a, b)


def test_time_features_and_causal_counts(tmp_path: Path) -> None:
    stream = TalkingDataStream(write(tmp_path, UNSORTED), num_embeddings=1000)
    dense, ids, _ = read(stream)
    assert stream.num_dense == len(DENSE_COLUMNS) == dense.shape[1]
    hour = CATEGORICAL_COLUMNS.index("hour")
    assert ids[:, hour].tolist() == [1 + 16, 1 + 16, 1 + 23, 1 + 10, 1 + 10]
    weekday = CATEGORICAL_COLUMNS.index("day_of_week")
    assert ids[:, weekday].tolist() == [1 + 0, 1 + 0, 1 + 0, 1 + 1, 1 + 1]  # 2017-11-06 was a Monday
    angle = 2 * math.pi * (16.5 / 24)
    assert dense[0, :2].tolist() == pytest.approx([math.sin(angle), math.cos(angle)], abs=1e-6)
    # ip 5 clicks at positions 2, 3, 4; (ip 5, app 1) at positions 2, 3
    prior_ip = torch.expm1(dense[:, DENSE_COLUMNS.index("log_prior_clicks_ip")]).round().tolist()
    prior_ip_app = torch.expm1(dense[:, DENSE_COLUMNS.index("log_prior_clicks_ip_app")]).round().tolist()
    assert prior_ip == [0, 0, 0, 1, 2]
    assert prior_ip_app == [0, 0, 0, 1, 0]


def test_header_read_by_name_with_lenient_first_column(tmp_path: Path) -> None:
    reordered = "is_attributed,click_time,attributed_time,channel,os,device,app,..ip"
    rows = ["1,2017-11-06 16:00:00,,4,3,2,1,0"]
    stream = TalkingDataStream(write(tmp_path, rows, header=reordered), num_embeddings=100)
    _, ids, labels = read(stream)
    assert ids[0, :5].tolist() == [1, 2, 3, 4, 5] and labels.tolist() == [1.0]
    with pytest.raises(ValueError, match=r"header lacks columns \['click_time'\]"):
        TalkingDataStream(write(tmp_path, rows, header="ip,app,device,os,channel,when,is_attributed"))


MALFORMED = [
    ("5,1,1,1,10,2017-11-07 10:00:00,0", "wrong_column_count"),
    ("x,1,1,1,10,2017-11-07 10:00:00,,0", "bad_categorical"),
    ("-5,1,1,1,10,2017-11-07 10:00:00,,0", "bad_categorical"),
    ("5,1,1,1,10,yesterday,,0", "bad_click_time"),
    ("5,1,1,1,10,2017-11-07 10:00:00,,2", "bad_label"),
]


def test_malformed_rows_are_counted_and_dropped(tmp_path: Path) -> None:
    stream = TalkingDataStream(write(tmp_path, UNSORTED[:2] + [bad for bad, _ in MALFORMED]))
    assert stream.num_rows == 2
    assert dict(stream.stats.malformed) == {
        "wrong_column_count": 1,
        "bad_categorical": 2,
        "bad_click_time": 1,
        "bad_label": 1,
    }


@pytest.mark.parametrize(("bad", "reason"), MALFORMED)
def test_strict_raises_with_line_number(tmp_path: Path, bad: str, reason: str) -> None:
    path = write(tmp_path, [UNSORTED[0], bad])
    with pytest.raises(ValueError, match=rf"clicks.csv:3: malformed row \({reason}\)"):
        TalkingDataStream(path, strict=True)


@pytest.fixture(scope="module")
def real() -> TalkingDataStream:
    if not DATA.is_file():
        pytest.skip(f"real TalkingData sample {DATA} is absent (see shared/data/README.md)")
    return TalkingDataStream(DATA, num_embeddings=5000)


def test_real_sample_is_sorted_complete_and_trainable(real: TalkingDataStream) -> None:
    assert real.num_rows == 100_000 and real.stats.malformed_rows == 0
    assert np.all(np.diff(real.click_time) >= 0)
    start = datetime(2017, 11, 6, 16, tzinfo=timezone.utc).timestamp()
    assert real.click_time[0] == start and real.click_time[-1] < start + 3 * 86_400
    labels = np.concatenate([b.labels.numpy() for b in real.batches(4096)])
    assert labels.sum() == 227
    config = DLRMConfig(num_dense=real.num_dense, num_sparse=len(real.feature_names), num_embeddings=5000)
    loss, _ = build_dlrm(config)(next(real.batches(64, start_row=50_000)))
    assert torch.isfinite(loss)


def test_real_two_ranks_read_disjoint_time_slices(real: TalkingDataStream) -> None:
    parts = [list(real.batches(1000, rank=r, world_size=2, num_rows=10_001)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 5  # the one-row tail (< world_size) is dropped on both
    interleaved = torch.cat([b.dense_features for pair in zip(*parts, strict=True) for b in pair])
    whole = torch.cat([b.dense_features for b in real.batches(1000, num_rows=10_000)])
    assert torch.equal(interleaved, whole)


def test_max_rows_keeps_the_earliest_clicks(tmp_path: Path) -> None:
    stream = TalkingDataStream(write(tmp_path, UNSORTED), max_rows=3)
    assert stream.num_rows == 3 and len(stream.click_time) == 3
    full = TalkingDataStream(write(tmp_path, UNSORTED, name="full.csv"))
    assert np.array_equal(stream.click_time, full.click_time[:3])
    assert torch.equal(read(stream)[1], read(full)[1][:3])
    with pytest.raises(ValueError, match="max_rows must be an integer >= 0"):
        TalkingDataStream(write(tmp_path, UNSORTED), max_rows=-2)
