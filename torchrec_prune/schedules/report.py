"""Comparison tables and plots of schedule runs against their dense reference.

Every row compares a run with the dense model on the same samples: pooled relative look-ahead CE over the
compared period and over its last quarter, relative accuracy, training FLOPs and measured training time.
Structured sparsity (grow/prune) saves counted FLOPs; AUX's element sparsity only saves *effective*
FLOPs (nonzeros), which the table labels as such.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchrec_prune.metrics.window import WindowRecord, relative_ce  # noqa: E402
from torchrec_prune.plots import plot_series  # noqa: E402
from torchrec_prune.schedules.compare import last_quarter_relative_ce, pooled_relative  # noqa: E402
from torchrec_prune.schedules.d2s import D2SResult  # noqa: E402
from torchrec_prune.schedules.grow_prune import GrowPruneResult  # noqa: E402


@dataclass(frozen=True)
class ComparisonRow:
    """One run against the dense reference (relative figures: 0.01 means +1%).

    Args:
        name: the run.
        relative_ce: pooled look-ahead CE over the compared period, relative to dense.
        last_quarter_relative_ce: the same over the last quarter of its windows.
        relative_accuracy: pooled accuracy at threshold 0.5, relative to dense.
        flops_vs_dense: training FLOPs / dense training FLOPs - 1.
        flops_kind: ``structured`` (counted FLOPs) or ``effective`` (nonzero weights only).
        time_vs_dense: measured training wall time / dense training wall time - 1.
        cpu_time_vs_dense: the same with CPU time of the process (less disturbed by other jobs).
        sparse_step_vs_dense_step: mean CPU time of a step in sparse phases / in dense phases - 1, within
            the run (same process, same moment: the least noisy view of what the compacted forward saves).
    """

    name: str
    relative_ce: float
    last_quarter_relative_ce: float
    relative_accuracy: float
    flops_vs_dense: float
    flops_kind: str
    time_vs_dense: float
    cpu_time_vs_dense: float = math.nan
    sparse_step_vs_dense_step: float = math.nan


def grow_prune_rows(results: Mapping[str, GrowPruneResult], dense: str = "dense") -> list[ComparisonRow]:
    """Rows for grow/prune runs (including the dense one) against ``results[dense]``."""
    ref = results[dense]
    rows = []
    for name, result in results.items():
        records = result.run.records
        rows.append(
            ComparisonRow(
                name=name,
                relative_ce=pooled_relative(records, ref.run.records),
                last_quarter_relative_ce=last_quarter_relative_ce(records, ref.run.records),
                relative_accuracy=pooled_relative(records, ref.run.records, field="accuracy"),
                flops_vs_dense=result.run.flops.actual / ref.run.flops.actual - 1.0,
                flops_kind="structured",
                time_vs_dense=result.seconds / ref.seconds - 1.0,
                cpu_time_vs_dense=result.cpu_seconds / ref.cpu_seconds - 1.0,
                sparse_step_vs_dense_step=(
                    result.kind_seconds_per_step("sparse", cpu=True)
                    / result.kind_seconds_per_step("dense", cpu=True)
                    - 1.0
                ),
            )
        )
    return rows


def d2s_rows(result: D2SResult) -> list[ComparisonRow]:
    """Rows for the dense model and each serving line, compared after the warm-up.

    A line's FLOPs and time are its serving models' training plus its pruning jobs, against the dense
    job's over the same span: the stream after the warm-up, when sparse models serve (the dense model's
    per-sample FLOPs are constant, so its FLOPs over the span are exact; its time is prorated by
    samples). D2S also keeps running the dense job, which this does not add.
    """
    since = result.warmup_rows
    dense = result.dense_flops
    share = (dense.samples - since) / dense.samples if dense.samples else 0.0
    dense_flops, dense_seconds = dense.dense * share, result.dense_seconds * share
    rows = [ComparisonRow("dense", 0.0, 0.0, 0.0, 0.0, "structured", 0.0)]
    for name, line in result.lines.items():
        flops = line.serving_flops + line.pruning_flops
        rows.append(
            ComparisonRow(
                name=name,
                relative_ce=pooled_relative(line.records, result.dense, since=since),
                last_quarter_relative_ce=last_quarter_relative_ce(line.records, result.dense, since=since),
                relative_accuracy=pooled_relative(line.records, result.dense, since=since, field="accuracy"),
                flops_vs_dense=flops.effective / dense_flops - 1.0,
                flops_kind="effective",
                time_vs_dense=(line.serving_seconds + line.pruning_seconds) / dense_seconds - 1.0,
            )
        )
    return rows


_COLUMNS = (
    ("run", "name", "{}"),
    ("rel CE", "relative_ce", "{:+.2%}"),
    ("last-quarter rel CE", "last_quarter_relative_ce", "{:+.2%}"),
    ("rel acc", "relative_accuracy", "{:+.2%}"),
    ("train FLOPs vs dense", "flops_vs_dense", "{:+.1%}"),
    ("FLOPs kind", "flops_kind", "{}"),
    ("wall time vs dense", "time_vs_dense", "{:+.1%}"),
    ("CPU time vs dense", "cpu_time_vs_dense", "{:+.1%}"),
    ("sparse vs dense step (CPU)", "sparse_step_vs_dense_step", "{:+.1%}"),
)


def _cell(fmt: str, value: object) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def format_table(rows: Sequence[ComparisonRow], *, markdown: bool = False) -> str:
    """The rows as a fixed-width console table, or as a markdown table."""
    header = [title for title, _, _ in _COLUMNS]
    body = [[_cell(fmt, getattr(row, key)) for _, key, fmt in _COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body])


def write_csv(rows: Sequence[ComparisonRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    return path


def plot_relative_ce(
    runs: Mapping[str, Sequence[WindowRecord]],
    reference: Sequence[WindowRecord],
    path: str | Path,
    title: str = "",
) -> Path:
    """Per-window relative look-ahead CE of each run against the reference, over the stream."""
    series = {
        name: ([r.samples_end for r in records], [100 * x for x in relative_ce(records, reference)])
        for name, records in runs.items()
    }
    return plot_series(
        series,
        path,
        xlabel="samples seen (stream position)",
        ylabel="relative look-ahead CE vs dense (%)",
        title=title,
    )


def plot_phase_curves(
    results: Mapping[str, GrowPruneResult], out_dir: str | Path, prefix: str = ""
) -> list[Path]:
    """Training FLOPs and open FC parameters over the stream for each schedule (cf. growth paper Fig. 6).

    ``{prefix}flops.png``: cumulative training FLOPs of the FC layers against samples, one line per run.
    ``{prefix}fc_params.png``: open FC parameters against samples, one panel per run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        xs, ys, total = [0], [0.0], 0.0
        for phase in result.phases:
            total += phase.samples * phase.report.training / 1e9
            xs.append(phase.end)
            ys.append(total)
        ax.plot(xs, ys, label=f"{name} ({result.run.flops.actual / 1e9:.0f} GFLOPs)")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("cumulative training GFLOPs (FC layers)")
    ax.set_title("training FLOPs over the stream")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    flops = out / f"{prefix}flops.png"
    fig.savefig(flops, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(
        len(results), 1, figsize=(7, 1.4 * len(results) + 0.8), sharex=True, squeeze=False
    )
    for ax, (name, result) in zip(axes[:, 0], results.items(), strict=True):
        xs = [x for p in result.phases for x in (p.start, p.end)]
        ax.plot(xs, [p.fc_params / 1e3 for p in result.phases for _ in (0, 1)])
        ax.set_ylim(bottom=0)
        ax.set_ylabel("k params")
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("samples seen")
    fig.suptitle("open FC parameters over the stream")
    fig.tight_layout()
    params = out / f"{prefix}fc_params.png"
    fig.savefig(params, dpi=110)
    plt.close(fig)
    return [flops, params]
