"""Plots a person reads: metrics over the stream, written as PNG (headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchrec_prune.metrics.window import WindowRecord  # noqa: E402


def plot_window_metric(
    runs: Mapping[str, Sequence[WindowRecord]],
    path: str | Path,
    *,
    metric: str = "ce",
    title: str = "",
) -> Path:
    """One line per run: ``metric`` of each look-ahead window against samples seen."""
    series = {
        label: ([r.samples_end for r in rs], [getattr(r, metric) for r in rs]) for label, rs in runs.items()
    }
    return plot_series(
        series,
        path,
        xlabel="samples seen (stream position)",
        ylabel=f"look-ahead window {metric.upper()}",
        title=title,
    )


def plot_series(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """Generic line plot: ``{label: (xs, ys)}``."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
