"""Summaries of one run against the dense reference on the same samples (SPEC 2).

Per-window relative CE is noisy; the headline figures pool the windows first (sample-weighted CE of the
model over sample-weighted CE of the reference, minus 1), over the serving period or its last quarter.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchrec_prune.metrics.window import WindowRecord, relative_ce


def _pooled(records: Sequence[WindowRecord], field: str) -> float:
    n = sum(r.n for r in records)
    return sum(getattr(r, field) * r.n for r in records) / n if n else float("nan")


def pooled_relative(
    records: Sequence[WindowRecord],
    reference: Sequence[WindowRecord],
    *,
    since: int = 0,
    last_fraction: float = 1.0,
    field: str = "ce",
) -> float:
    """``pooled(model) / pooled(reference) - 1`` over the windows that end after ``since`` samples,
    restricted to the last ``last_fraction`` of them (at least one window).

    Raises:
        ValueError: windows that do not cover the same samples (see ``relative_ce``), or a fraction
            outside (0, 1].
    """
    if not 0 < last_fraction <= 1:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction!r}")
    relative_ce(records, reference)  # checks that both runs cut the same windows
    pairs = [(m, r) for m, r in zip(records, reference, strict=True) if m.samples_end > since]
    if not pairs:
        return float("nan")
    pairs = pairs[len(pairs) - max(1, round(len(pairs) * last_fraction)) :]
    mine, ref = _pooled([m for m, _ in pairs], field), _pooled([r for _, r in pairs], field)
    return mine / ref - 1.0


def last_quarter_relative_ce(
    records: Sequence[WindowRecord], reference: Sequence[WindowRecord], *, since: int = 0
) -> float:
    """Pooled relative CE of the last quarter of the windows after ``since``."""
    return pooled_relative(records, reference, since=since, last_fraction=0.25)
