"""Time-ordered click streams (Criteo, TalkingData, synthetic with drift) as TorchRec batches."""

from torchrec_prune.data.criteo import CriteoStream
from torchrec_prune.data.registry import open_stream
from torchrec_prune.data.stream import (
    MISSING_ID,
    Increment,
    Stream,
    StreamStats,
    iter_increments,
)
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.data.talkingdata import TalkingDataStream

__all__ = [
    "MISSING_ID",
    "CriteoStream",
    "Increment",
    "Stream",
    "StreamStats",
    "SyntheticStream",
    "TalkingDataStream",
    "iter_increments",
    "open_stream",
]
