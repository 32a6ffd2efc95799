"""Open a stream from a short spec string, as the command line and launch scripts name them."""

from __future__ import annotations

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

    ``synthetic`` needs ``num_rows=``; file kinds raise FileNotFoundError naming a missing path.

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
        return _FILE_STREAMS[kind](path, **kwargs)
    raise ValueError(f"unknown stream spec {spec!r}: expected {SPEC_FORMS}")
