"""The demo command end to end on a tiny model, its validation, and the comparison helpers it prints."""

import json
import math

import pytest

from torchrec_prune.cli import build_parser
from torchrec_prune.demo import prepare_demo
from torchrec_prune.metrics import WindowRecord
from torchrec_prune.schedules import last_quarter_relative_ce, pooled_relative
from torchrec_prune.schedules.report import ComparisonRow, format_table

TINY = ["--num-embeddings", "20", "--dense-arch", "16,8,4", "--over-arch", "16,8,1", "--no-progress"]


def _args(tmp_path, *extra: str):
    argv = ["demo", "--rows", "3000", "--increment-rows", "500", "--window", "250", "--batch-size", "50"]
    return build_parser().parse_args([*argv, *TINY, "--run-dir", str(tmp_path), *extra])


def test_demo_runs_every_comparison_and_writes_the_run_folder(tmp_path, capsys):
    assert prepare_demo(_args(tmp_path))() == 0
    out = capsys.readouterr().out
    for name in (
        "fixed",
        "adaptive",
        "fixed_mask",
        "adaptation",
        "alternate",
        "prune_only",
        "grow_only",
        "dsd",
    ):
        assert name in out
    assert "Denormal values" in out and "sparsity" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["name"] for row in summary["grow_prune"]["table"]][1:] == [
        "alternate",
        "prune_only",
        "grow_only",
        "dsd",
    ]
    assert all(line["max_age"] < 2 for name, line in summary["d2s"]["lines"].items() if name == "fixed")
    for path in ("d2s/dense/windows.jsonl", "d2s/fixed/windows.csv", "grow_prune/dsd/windows.jsonl"):
        assert (tmp_path / path).stat().st_size > 0
    for png in ("d2s_window_ce", "d2s_relative_ce", "grow_prune_flops", "grow_prune_fc_params"):
        assert (tmp_path / f"{png}.png").stat().st_size > 0
    assert (tmp_path / "comparison_grow_prune.csv").read_text().startswith("name,relative_ce")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rows", "1000"], "at least 5 increments"),
        (["--lr", "0"], "lr"),
        (["--drift", "-1"], "drift"),
        (["--data", "criteo:/nonexistent/file.tsv"], "nonexistent"),
    ],
)
def test_demo_validates_before_training(tmp_path, extra, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        prepare_demo(_args(tmp_path, *extra))
    assert not (tmp_path / "summary.json").exists()


def _record(i: int, ce: float, n: int = 100, accuracy: float = 0.5) -> WindowRecord:
    return WindowRecord(i, (i + 1) * n, n, ce, math.nan, 0.2, accuracy, math.nan)


def test_pooled_relative_weights_windows_by_samples_and_restricts_the_period():
    dense = [_record(i, 1.0) for i in range(8)]
    model = [_record(i, 1.0 + 0.01 * i) for i in range(8)]
    assert pooled_relative(model, dense) == pytest.approx(0.035)
    assert pooled_relative(model, dense, since=400) == pytest.approx(0.055)  # windows 4..7
    assert last_quarter_relative_ce(model, dense) == pytest.approx(0.065)  # windows 6, 7
    assert last_quarter_relative_ce(model, dense, since=400) == pytest.approx(0.07)  # window 7
    short = [_record(0, 1.0, n=50)] + dense[1:]
    assert pooled_relative([_record(0, 2.0, n=50)] + dense[1:], short) == pytest.approx(50 / 750)
    with pytest.raises(ValueError, match="same windows"):
        pooled_relative(model[:-1], dense)
    with pytest.raises(ValueError, match="last_fraction"):
        pooled_relative(model, dense, last_fraction=0)


def test_format_table_marks_undefined_figures():
    rows = [
        ComparisonRow("dense", 0.0, 0.0, 0.0, 0.0, "structured", 0.0),
        ComparisonRow("x", 0.01, 0.02, -0.001, -0.3, "structured", 0.05),
    ]
    text = format_table(rows, markdown=True)
    assert text.splitlines()[0].startswith("| run | rel CE")
    assert "| x | +1.00% | +2.00% | -0.10% | -30.0% | structured | +5.0% | - | - |" in text
