"""Look-ahead window metrics (CE, NE, CTR, accuracy, AUC), their writers and relative comparisons."""

from torchrec_prune.metrics.functional import binary_auc, normalized_entropy
from torchrec_prune.metrics.window import (
    LookAheadWindow,
    StreamTotals,
    WindowRecord,
    relative_accuracy,
    relative_ce,
)
from torchrec_prune.metrics.writer import MetricsWriter, read_records

__all__ = [
    "LookAheadWindow",
    "MetricsWriter",
    "StreamTotals",
    "WindowRecord",
    "binary_auc",
    "normalized_entropy",
    "read_records",
    "relative_accuracy",
    "relative_ce",
]
