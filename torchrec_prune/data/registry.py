"""Open a stream from a short spec string, as the command line and launch scripts name them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchrec_prune.data.criteo import CriteoStream
from torchrec_prune.data.stream import Stream
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.data.talkingdata import TalkingDataStream

_FILE_STREAMS: dict[str, type[CriteoStream] | type[TalkingDataStream]] = {
    "criteo": CriteoStream,
    "talkingdata": TalkingDataStream,
}
SPEC_FORMS = "'synthetic', 'criteo:PATH' or 'talkingdata:PATH'"


def open_stream(spec: str, **kwargs: Any) -> Stream:
    """Build the stream named by ``spec``; ``kwargs`` go to its constructor.

    ``synthetic`` needs ``num_rows=``. A file is checked before and after it is opened, so that a bad
    one fails with one line rather than mid-training: it must be a readable, non-empty file with valid
    rows (none valid: ValueError counting the malformed rows by reason).

    Example::

        stream = open_stream("synthetic", num_rows=50_000, drift=1.0)
        stream = open_stream("criteo:../shared/data/criteo/kaggle_head_train.tsv", num_embeddings=10_000)
    """
    kind, sep, path = spec.partition(":")
    if kind == "synthetic" and not sep:
        if "num_rows" not in kwargs:
            raise ValueError("open_stream('synthetic') needs num_rows=<number of rows>")
        return SyntheticStream(**kwargs)
    if kind in _FILE_STREAMS and path:
        _check_file(spec, Path(path))
        stream = _FILE_STREAMS[kind](path, **kwargs)
        valid, malformed = stream.sample_rows()
        if not valid and not malformed:
            raise ValueError(f"--data {spec}: the file holds no data rows")
        if not valid:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(malformed.items()))
            rows = sum(malformed.values())
            raise ValueError(f"--data {spec}: none of its first {rows} rows is valid (malformed: {reasons})")
        return stream
    raise ValueError(f"unknown stream spec {spec!r}: expected {SPEC_FORMS}")


def _check_file(spec: str, path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"--data {spec}: {str(path)!r} is a directory, not a data file")
    if not path.exists():
        return  # the stream names the missing file
    if not os.access(path, os.R_OK):
        raise PermissionError(f"--data {spec}: {str(path)!r} is not readable")
    if path.stat().st_size == 0:
        raise ValueError(f"--data {spec}: {str(path)!r} is empty")
