"""Window records on disk: ``windows.jsonl`` and ``windows.csv``, one line per record, flushed as written.

Flushing per record means a crashed or still-running job can be plotted from what it has written.
JSON has no NaN, so undefined metrics (NE or AUC of a single-class window) are written as ``null``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from types import TracebackType

from torchrec_prune.metrics.window import RECORD_FIELDS, WindowRecord

JSONL_NAME = "windows.jsonl"
CSV_NAME = "windows.csv"


class MetricsWriter:
    """Write ``WindowRecord``s of one run under ``run_dir`` (created if missing; existing files are replaced).

    Under ``torch.distributed`` every rank gets the same records: let one rank write.

    Example::

        with MetricsWriter("runs/dense") as writer:
            for record in window.update(logits, labels):
                writer.write(record)
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / JSONL_NAME, "w", encoding="utf-8")
        self._csv_file = open(self.run_dir / CSV_NAME, "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=RECORD_FIELDS)
        self._csv.writeheader()
        self._csv_file.flush()

    def write(self, record: WindowRecord) -> None:
        values = asdict(record)
        json_values = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}
        self._jsonl.write(json.dumps(json_values, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._csv.writerow(values)
        self._csv_file.flush()

    def write_all(self, records: Iterable[WindowRecord]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_records(path: str | Path) -> list[WindowRecord]:
    """Read back a ``windows.jsonl`` or ``windows.csv`` written by ``MetricsWriter``."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"path must end in .jsonl or .csv, got {path}")
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            return [WindowRecord.from_dict(json.loads(line)) for line in f if line.strip()]
        return [WindowRecord.from_dict(row) for row in csv.DictReader(f)]
