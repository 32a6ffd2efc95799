"""Files of a run folder: window records (``windows.jsonl``/``windows.csv``) and whole-file writes.

Window records are one line each, flushed as written, so a crashed or still-running job can be plotted
from what it has written. JSON has no NaN, so undefined metrics (NE or AUC of a single-class window) are
written as ``null``.

Nothing already in a run folder is lost half-way: whole files (``config.json``, ``summary.json``) are
written under a temporary name and renamed over the old one (``write_text_atomic``), and a window series
starts the same way (header and the records a resumed run restored), so at every moment a file is either
its old complete self or the new one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType

from torchrec_prune.metrics.window import RECORD_FIELDS, WindowRecord

JSONL_NAME = "windows.jsonl"
CSV_NAME = "windows.csv"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one ``rename``: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_line(record: WindowRecord) -> str:
    values = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(record).items()}
    return json.dumps(values, allow_nan=False) + "\n"


def _csv_text(records: Iterable[WindowRecord], header: bool) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS)
    if header:
        writer.writeheader()
    writer.writerows(asdict(r) for r in records)
    return out.getvalue()


class MetricsWriter:
    """Write ``WindowRecord``s of one run under ``run_dir`` (created if missing).

    The files start as ``records`` (e.g. the windows a resumed run restored), each replaced in one
    rename, so an earlier series is never seen truncated; later records are appended and flushed.
    Under ``torch.distributed`` every rank gets the same records: let one rank write.

    Example::

        with MetricsWriter("runs/dense") as writer:
            for record in window.update(logits, labels):
                writer.write(record)
    """

    def __init__(self, run_dir: str | Path, records: Sequence[WindowRecord] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / JSONL_NAME, "".join(_json_line(r) for r in records))
        write_text_atomic(self.run_dir / CSV_NAME, _csv_text(records, header=True))
        self._jsonl = open(self.run_dir / JSONL_NAME, "a", encoding="utf-8")
        self._csv_file = open(self.run_dir / CSV_NAME, "a", encoding="utf-8", newline="")

    def write(self, record: WindowRecord) -> None:
        self._jsonl.write(_json_line(record))
        self._jsonl.flush()
        self._csv_file.write(_csv_text([record], header=False))
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
