"""Training paradigms: alternate grow/prune and its baselines (SPEC 5), Dense-to-Sparse (SPEC 6)."""

from torchrec_prune.schedules.compare import last_quarter_relative_ce, pooled_relative
from torchrec_prune.schedules.d2s import (
    LINES,
    Birth,
    D2SConfig,
    D2SController,
    D2SResult,
    DenseJob,
    LineResult,
    PruningJob,
    ServingJob,
    Snapshot,
    SparseModel,
)
from torchrec_prune.schedules.grow_prune import (
    GrowPruneConfig,
    GrowPruneResult,
    GrowPruneSchedule,
    PhaseRecord,
    run_grow_prune,
)
from torchrec_prune.schedules.phases import DENSE, SCHEMES, SPARSE, Phase, PhasePlan, scheme

__all__ = [
    "DENSE",
    "LINES",
    "SCHEMES",
    "SPARSE",
    "Birth",
    "D2SConfig",
    "D2SController",
    "D2SResult",
    "DenseJob",
    "GrowPruneConfig",
    "GrowPruneResult",
    "GrowPruneSchedule",
    "LineResult",
    "Phase",
    "PhasePlan",
    "PhaseRecord",
    "PruningJob",
    "ServingJob",
    "Snapshot",
    "SparseModel",
    "last_quarter_relative_ce",
    "pooled_relative",
    "run_grow_prune",
    "scheme",
]
