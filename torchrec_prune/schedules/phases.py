"""Dense and sparse phases of a training schedule, as fractions of the stream (SPEC 5).

A ``PhasePlan`` is checked once, at construction, so a bad schedule fails before any training: its phases
must tile ``[0, 1]`` exactly (first starts at 0, last ends at 1, each starts where the previous ended) and
alternate between dense and sparse. The four schemes of the growth paper's comparison are presets.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

DENSE = "dense"
SPARSE = "sparse"
KINDS = (DENSE, SPARSE)
_TOLERANCE = 1e-9  # fractions such as 0.1 + 0.2 are compared up to float noise


@dataclass(frozen=True)
class Phase:
    """One stretch of the stream trained with every neuron (``dense``) or with pruned neurons (``sparse``).

    Args:
        kind: ``dense`` or ``sparse``.
        start: fraction of the stream where the phase begins, in [0, 1).
        end: fraction where it ends, in (start, 1].
    """

    kind: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Phase.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1
            ):
                raise ValueError(f"Phase.{name} must be a fraction of the stream in [0, 1], got {value!r}")
        if not self.end - self.start > _TOLERANCE:
            raise ValueError(f"Phase.end must be > Phase.start, got [{self.start}, {self.end}]")

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class PhasePlan:
    """An ordered, gap-free, non-overlapping cover of the stream by alternating dense and sparse phases.

    Args:
        phases: the phases in stream order.
        name: label used in tables and plots.

    Raises:
        ValueError: no phases; a first start other than 0 or a last end other than 1; a gap or overlap
            between consecutive phases; two consecutive phases of the same kind.

    Example::

        plan = PhasePlan.alternate((0.2, 0.4, 0.6, 0.8))  # dense, sparse, dense, sparse, dense
        plan.sparse_fraction  # 0.4
    """

    phases: tuple[Phase, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        phases = tuple(self.phases)
        object.__setattr__(self, "phases", phases)
        if not phases:
            raise ValueError("PhasePlan.phases must hold at least one phase")
        if abs(phases[0].start) > _TOLERANCE:
            raise ValueError(f"PhasePlan: the first phase must start at 0, got {phases[0].start}")
        if abs(phases[-1].end - 1) > _TOLERANCE:
            raise ValueError(f"PhasePlan: the last phase must end at 1, got {phases[-1].end}")
        for i, (before, after) in enumerate(zip(phases, phases[1:], strict=False)):
            if after.start < before.end - _TOLERANCE:
                raise ValueError(
                    f"PhasePlan: phase {i + 1} starts at {after.start}, before phase {i} ends at {before.end}"
                    " (phases overlap)"
                )
            if after.start > before.end + _TOLERANCE:
                raise ValueError(
                    f"PhasePlan: gap between phase {i} ending at {before.end} and phase {i + 1} starting at "
                    f"{after.start}; phases must cover [0, 1] without gaps"
                )
            if after.kind == before.kind:
                raise ValueError(
                    f"PhasePlan: phases {i} and {i + 1} are both {before.kind}; consecutive phases must "
                    "alternate (merge them into one)"
                )

    @classmethod
    def alternate(cls, boundaries: Sequence[float], name: str = "alternate") -> PhasePlan:
        """Alternate grow/prune: dense, sparse, dense, ... switching at ``boundaries``; starts and ends dense.

        Raises:
            ValueError: boundaries not strictly increasing inside (0, 1), or an odd count (the plan would
                end sparse).
        """
        cuts = list(boundaries)
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in cuts):
            raise ValueError(f"PhasePlan.alternate boundaries must be numbers, got {cuts}")
        if len(cuts) < 2:
            raise ValueError(
                f"PhasePlan.alternate needs at least two boundaries (dense, sparse, dense), got {cuts}"
            )
        if any(not (0 < b < 1) for b in cuts) or any(b >= c for b, c in zip(cuts, cuts[1:], strict=False)):
            raise ValueError(
                f"PhasePlan.alternate boundaries must be strictly increasing fractions in (0, 1), got {cuts}"
            )
        if len(cuts) % 2:
            raise ValueError(
                f"PhasePlan.alternate needs an even number of boundaries so that it ends dense, got {cuts}"
            )
        return cls(_from_cuts(DENSE, [float(c) for c in cuts]), name=name)

    @classmethod
    def every(cls, fraction: float = 0.2, name: str = "alternate") -> PhasePlan:
        """The paper's default alternate scheme: switch every ``fraction`` of the stream (0.2: D,S,D,S,D).

        Raises:
            ValueError: ``fraction`` not of the form 1/n for an odd n >= 3.
        """
        ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1
        n = round(1 / fraction) if ok else 0
        if not (ok and abs(n * fraction - 1) < 1e-6 and n >= 3 and n % 2 == 1):
            raise ValueError(
                "PhasePlan.every fraction must be 1/n for an odd n >= 3 (start and end dense), "
                f"got {fraction!r}"
            )
        return cls.alternate([i / n for i in range(1, n)], name=name)

    @classmethod
    def dense(cls) -> PhasePlan:
        """No sparse phase: the dense reference run."""
        return cls((Phase(DENSE, 0.0, 1.0),), name="dense")

    @classmethod
    def prune_only(cls, sparse_from: float = 0.6) -> PhasePlan:
        """Dense first, then sparse to the end (paper: dense 60%, sparse 40%)."""
        return cls((Phase(DENSE, 0.0, sparse_from), Phase(SPARSE, sparse_from, 1.0)), name="prune_only")

    @classmethod
    def grow_only(cls, dense_from: float = 0.4) -> PhasePlan:
        """Sparse first, then grown to dense with zero init (paper: sparse 40%, then dense)."""
        return cls((Phase(SPARSE, 0.0, dense_from), Phase(DENSE, dense_from, 1.0)), name="grow_only")

    @classmethod
    def dsd(cls, sparse_from: float = 0.3, dense_from: float = 0.7) -> PhasePlan:
        """Dense-sparse-dense (paper: dense 30%, sparse 40%, dense 30%)."""
        return cls(_from_cuts(DENSE, [sparse_from, dense_from]), name="dsd")

    @property
    def sparse_fraction(self) -> float:
        return sum(p.length for p in self.phases if p.kind == SPARSE)

    @property
    def starts_dense(self) -> bool:
        return self.phases[0].kind == DENSE

    @property
    def ends_dense(self) -> bool:
        return self.phases[-1].kind == DENSE

    def sample_bounds(self, num_rows: int, increment_rows: int, global_batch: int) -> list[tuple[int, int]]:
        """``[start, end)`` stream positions of each phase, cut where a training batch starts.

        Batches start every ``global_batch`` positions within each increment of ``increment_rows`` (an
        increment's last batch may be short), so each cut moves to the nearest batch start and no batch
        straddles two phases. The last phase ends at ``num_rows``.

        Raises:
            ValueError: a phase that would be empty at this stream length and batch size.
        """
        starts = batch_starts(num_rows, increment_rows, global_batch)
        cuts = [0]
        for phase in self.phases[1:]:
            target = phase.start * num_rows
            i = bisect.bisect_left(starts, target)
            near = [starts[j] for j in (i - 1, i) if 0 <= j < len(starts)]
            cuts.append(min(near, key=lambda s: (abs(s - target), s)))
        cuts.append(num_rows)
        bounds = list(zip(cuts, cuts[1:], strict=False))
        for phase, (a, b) in zip(self.phases, bounds, strict=True):
            if b <= a:
                raise ValueError(
                    f"PhasePlan {self.name!r}: the {phase.kind} phase [{phase.start}, {phase.end}] is "
                    f"empty for {num_rows} rows in batches of {global_batch}; use a longer stream or "
                    "smaller batches"
                )
        return bounds


def batch_starts(num_rows: int, increment_rows: int, global_batch: int) -> list[int]:
    """Stream positions where the trainer's batches start: every ``global_batch`` rows within each
    increment of ``increment_rows`` (an increment's last batch may be short)."""
    for name, value in (("num_rows", num_rows), ("increment_rows", increment_rows), ("batch", global_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return [
        s
        for first in range(0, num_rows, increment_rows)
        for s in range(first, min(first + increment_rows, num_rows), global_batch)
    ]


def _from_cuts(first: str, cuts: Sequence[float]) -> tuple[Phase, ...]:
    other = SPARSE if first == DENSE else DENSE
    edges = [0.0, *cuts, 1.0]
    return tuple(
        Phase(first if i % 2 == 0 else other, a, b)
        for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False))
    )


SCHEMES = ("alternate", "prune_only", "grow_only", "dsd")


def scheme(name: str) -> PhasePlan:
    """A growth-paper scheme with its default phases (each spends 40% of the stream sparse)."""
    if name == "alternate":
        return PhasePlan.every(0.2)
    if name == "prune_only":
        return PhasePlan.prune_only()
    if name == "grow_only":
        return PhasePlan.grow_only()
    if name == "dsd":
        return PhasePlan.dsd()
    raise ValueError(f"unknown scheme {name!r}; expected one of {SCHEMES}")
