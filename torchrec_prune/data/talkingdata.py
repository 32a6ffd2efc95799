"""TalkingData AdTracking clicks (Kaggle ``train.csv`` or its ``train_sample.csv``), sorted into time order.

The file is not in time order, so it is loaded whole (the 100k-row sample takes a few MB) and stably
sorted by ``click_time``. ``attributed_time`` is never read: it is set exactly when the label is 1.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from torchrec_prune.data.stream import DEFAULT_NUM_EMBEDDINGS, FileStream, Rows

ID_COLUMNS = ("ip", "app", "device", "os", "channel")
CATEGORICAL_COLUMNS = (*ID_COLUMNS, "hour", "day_of_week")
DENSE_COLUMNS = (
    "time_of_day_sin",
    "time_of_day_cos",
    "day_of_week_sin",
    "day_of_week_cos",
    "log_prior_clicks_ip",
    "log_prior_clicks_ip_app",
)
_DAY = 86_400
_EPOCH, _SECOND = datetime(1970, 1, 1), timedelta(seconds=1)
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
_LEADING_JUNK = re.compile(r"^[^A-Za-z_]+")


def _prior_counts(keys: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows (in stream order) have the same key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    counts = np.empty(len(keys), dtype=np.int64)
    counts[order] = np.arange(len(keys)) - group_start
    return counts


class TalkingDataStream(FileStream):
    """TalkingData clicks in ``click_time`` order; label ``is_attributed``.

    Features (names ``cat_i`` so that ``DLRMConfig(num_sparse=7, num_dense=6)`` fits):

    - categorical ``cat_0..cat_6`` = ``CATEGORICAL_COLUMNS``: ip, app, device, os, channel, hour of day
      and day of week (UTC, as in the file), each hashed ``1 + value % (num_embeddings - 1)``.
    - dense ``DENSE_COLUMNS``: sin/cos of the time of day, sin/cos of the (fractional) day of week, and
      ``log(1 + n)`` of the number of earlier clicks in the stream by the same ip and by the same
      (ip, app) -- causal counts, the classic click-fraud signal, with no look at the future.

    Ties in ``click_time`` keep file order. The header is matched by name; its first name is read
    leniently (a UTF-8 byte-order mark, or stray characters some copies have in its place, is ignored).
    Malformed rows (wrong column count, non-integer id, bad time, bad label) are dropped at load and
    counted in ``stats.malformed``, or raise ValueError with the line number if ``strict``.

    Args:
        path: the CSV file.
        num_embeddings: hash size of every table (>= 2; id 0 is reserved for missing values).
        strict: raise on the first malformed row instead of dropping it.
        max_rows: keep only the ``max_rows`` earliest clicks (default: all).

    Attributes:
        click_time: seconds since the epoch of each position, non-decreasing (for hourly windows).
    """

    def __init__(
        self,
        path: str | Path,
        num_embeddings: int = DEFAULT_NUM_EMBEDDINGS,
        strict: bool = False,
        max_rows: int | None = None,
    ):
        super().__init__(path, "TalkingData CSV", num_embeddings, strict, max_rows)
        self.num_dense = len(DENSE_COLUMNS)
        self.feature_names = [f"cat_{i}" for i in range(len(CATEGORICAL_COLUMNS))]
        raw_ids, click_time, labels = self._load()
        order = np.argsort(click_time, kind="stable")[: self.max_rows]
        raw_ids, self.click_time, self._labels = raw_ids[order], click_time[order], labels[order]
        self.num_rows = len(self._labels)
        self._dense, self._ids = self._features(raw_ids, self.click_time)

    def _load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids: list[list[int]] = []
        times: list[int] = []
        labels: list[int] = []
        with open(self.path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [_LEADING_JUNK.sub("", name.strip()) for name in next(reader, [])]
            missing = [c for c in (*ID_COLUMNS, "click_time", "is_attributed") if c not in header]
            if missing:
                raise ValueError(f"{self.path}: header lacks columns {missing}, got {header}")
            id_cols = [header.index(c) for c in ID_COLUMNS]
            time_col, label_col = header.index("click_time"), header.index("is_attributed")
            for row in reader:
                parsed = self._parse(row, len(header), id_cols, time_col, label_col)
                if isinstance(parsed, str):
                    if self.strict:
                        raise ValueError(f"{self.path}:{reader.line_num}: malformed row ({parsed})")
                    self.stats.malformed[parsed] += 1
                    continue
                ids.append(parsed[0])
                times.append(parsed[1])
                labels.append(parsed[2])
        return (
            np.array(ids, dtype=np.int64).reshape(-1, len(ID_COLUMNS)),
            np.array(times, dtype=np.int64),
            np.array(labels, dtype=np.float32),
        )

    @staticmethod
    def _parse(
        row: list[str], width: int, id_cols: list[int], time_col: int, label_col: int
    ) -> tuple[list[int], int, int] | str:
        """``(ids, click time in epoch seconds, label)`` of one row, or the reason it is malformed."""
        if len(row) != width:
            return "wrong_column_count"
        try:
            ids = [int(row[c]) for c in id_cols]
        except ValueError:
            return "bad_categorical"
        if min(ids) < 0:
            return "bad_categorical"
        try:
            stamp = datetime.fromisoformat(row[time_col])
        except ValueError:
            return "bad_click_time"
        if row[label_col] not in ("0", "1"):
            return "bad_label"
        if stamp.tzinfo is not None:
            stamp = stamp.astimezone(timezone.utc).replace(tzinfo=None)
        return ids, (stamp - _EPOCH) // _SECOND, int(row[label_col])

    def sample_rows(self) -> tuple[int, Counter[str]]:
        """Valid rows kept and malformed rows dropped by reason (the whole file was read at load)."""
        return self.num_rows, Counter(self.stats.malformed)

    def _features(self, raw_ids: np.ndarray, click_time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seconds = click_time % _DAY
        weekday = (click_time // _DAY + _EPOCH_WEEKDAY) % 7
        day_angle = 2 * np.pi * seconds / _DAY
        week_angle = 2 * np.pi * (weekday + seconds / _DAY) / 7
        dense = np.stack(
            [
                np.sin(day_angle),
                np.cos(day_angle),
                np.sin(week_angle),
                np.cos(week_angle),
                np.log1p(_prior_counts(raw_ids[:, 0])),
                np.log1p(_prior_counts(raw_ids[:, 0] * (raw_ids[:, 1].max(initial=0) + 1) + raw_ids[:, 1])),
            ],
            axis=1,
        ).astype(np.float32)
        categorical = np.concatenate([raw_ids, (seconds // 3600)[:, None], weekday[:, None]], axis=1)
        ids = 1 + categorical % (self.num_embeddings - 1)
        return dense.reshape(-1, len(DENSE_COLUMNS)), ids.astype(np.int64)

    def _read(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Rows]:
        for start, stop in ranges:
            yield Rows(self._dense[start:stop], self._ids[start:stop], self._labels[start:stop])
