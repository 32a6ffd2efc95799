"""Criteo click logs (Kaggle ``train.txt`` / Terabyte day files), streamed from the TSV in time order.

A line is ``label``, 13 integer features, 26 hex-hashed categorical features, tab-separated; an empty
field is missing, and lines may drop trailing empty fields. Transforms follow the DLRM reference
(facebookresearch/dlrm ``data_utils``): a missing dense value is 0, negatives are clipped to 0, then
``log(x + 1)``. TorchRec's ``criteo_kaggle`` preprocessing instead shifts by the file's global minimum,
which needs the whole file before the first row, so it does not suit a stream. Categorical values are
hashed like TorchRec's (``int(x, 16)`` modulo the table size), into ``[1, num_embeddings)`` so that
``MISSING_ID`` stays reserved for missing values.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from torchrec.datasets.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES, INT_FEATURE_COUNT

from torchrec_prune.data.stream import DEFAULT_NUM_EMBEDDINGS, MISSING_ID, FileStream, Rows

NUM_COLUMNS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT
_INT = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")


def count_lines(path: Path, limit: int | None = None, chunk_bytes: int = 1 << 20) -> int:
    """Number of lines (a last line without a newline counts), by scanning bytes; stops at ``limit``."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while (limit is None or lines < limit) and (chunk := f.read(chunk_bytes)):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"
    return lines if limit is None else min(lines, limit)


class CriteoStream(FileStream):
    """Rows of a Criteo TSV file; positions are the file's lines.

    Malformed lines (bad label, non-integer dense value, bad hex, more than 40 columns) are skipped and
    counted in ``stats.malformed`` by reason, or raise ValueError with the line number if ``strict``.
    Only the lines of the requested batches are parsed; the file is read sequentially and never held.

    Args:
        path: the TSV file.
        num_embeddings: hash size of every table (>= 2; id 0 is reserved for missing values).
        strict: raise on the first malformed line instead of skipping it.
        max_rows: read only the first ``max_rows`` lines (default: the whole file).

    Example::

        stream = CriteoStream("../shared/data/criteo/kaggle_head_train.tsv", num_embeddings=10_000)
        for batch in stream.batches(256):
            ...
    """

    def __init__(
        self,
        path: str | Path,
        num_embeddings: int = DEFAULT_NUM_EMBEDDINGS,
        strict: bool = False,
        max_rows: int | None = None,
    ):
        super().__init__(path, "Criteo TSV", num_embeddings, strict, max_rows)
        self.num_dense = INT_FEATURE_COUNT
        self.feature_names = list(DEFAULT_CAT_NAMES)
        self.num_rows = count_lines(self.path, self.max_rows)

    def sample_rows(self, limit: int = 10_000) -> tuple[int, Counter[str]]:
        """Valid rows and malformed rows by reason among the first ``limit`` (a cheap look at a file that
        is read lazily; ``stats`` is left alone)."""
        malformed: Counter[str] = Counter()
        valid = 0
        with open(self.path, "rb") as f:
            for raw in islice(f, min(limit, self.num_rows)):
                parsed = self._parse_fields(raw.rstrip(b"\r\n").decode("utf-8", errors="replace").split("\t"))
                if isinstance(parsed, str):
                    malformed[parsed] += 1
                else:
                    valid += 1
        return valid, malformed

    def _read(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Rows]:
        with open(self.path, "rb") as f:
            position = 0
            for start, stop in ranges:
                next(islice(f, start - position, start - position), None)
                lines = list(islice(f, stop - start))
                position = stop
                yield self._parse(lines, first_line=start + 1)

    def _parse(self, lines: list[bytes], first_line: int) -> Rows:
        dense: list[list[int]] = []
        ids: list[list[int]] = []
        labels: list[int] = []
        for offset, raw in enumerate(lines):
            fields = raw.rstrip(b"\r\n").decode("utf-8", errors="replace").split("\t")
            parsed = self._parse_fields(fields)
            if isinstance(parsed, str):
                if self.strict:
                    raise ValueError(f"{self.path}:{first_line + offset}: malformed row ({parsed})")
                self.stats.malformed[parsed] += 1
                continue
            labels.append(parsed[0])
            dense.append(parsed[1])
            ids.append(parsed[2])
        dense_np = np.log1p(np.maximum(np.array(dense, dtype=np.float64).reshape(-1, INT_FEATURE_COUNT), 0))
        return Rows(
            dense=dense_np.astype(np.float32),
            ids=np.array(ids, dtype=np.int64).reshape(-1, CAT_FEATURE_COUNT),
            labels=np.array(labels, dtype=np.float32),
        )

    def _parse_fields(self, fields: list[str]) -> tuple[int, list[int], list[int]] | str:
        """``(label, dense, ids)`` of one line, or the reason it is malformed."""
        if len(fields) > NUM_COLUMNS:
            return "too_many_columns"
        if fields[0] not in ("0", "1"):
            return "bad_label"
        fields = fields + [""] * (NUM_COLUMNS - len(fields))
        dense = []
        for value in fields[1 : 1 + INT_FEATURE_COUNT]:
            if value and not _INT.fullmatch(value):
                return "bad_dense"
            dense.append(int(value) if value else 0)
        ids = []
        for value in fields[1 + INT_FEATURE_COUNT :]:
            if value and not _HEX.fullmatch(value):
                return "bad_categorical"
            ids.append(1 + int(value, 16) % (self.num_embeddings - 1) if value else MISSING_ID)
        return int(fields[0]), dense, ids
