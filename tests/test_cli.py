"""`torchrec-prune train`: run folder contents, and one-line errors with exit code 2 on bad input."""

import json
import subprocess
import sys

import pytest

from torchrec_prune.cli import main
from torchrec_prune.metrics.writer import read_records

TINY = ["--num-embeddings", "200", "--dense-arch", "16,4", "--over-arch", "16,1", "--no-progress"]


def test_train_writes_a_complete_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--rows", "1200", "--batch-size", "50", "--window", "400"]
    assert main([*args, "--increment-rows", "400", "--run-dir", str(run_dir), *TINY]) == 0
    assert "trained 1200 samples" in capsys.readouterr().out
    for name in ("config.json", "windows.jsonl", "windows.csv", "summary.json", "window_ce.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoint" / ".metadata").is_file()
    records = read_records(run_dir / "windows.jsonl")
    assert [r.samples_end for r in records] == [400, 800, 1200]
    assert read_records(run_dir / "windows.csv") == records
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == 1200 and summary["training_flops"] > 0
    assert json.loads((run_dir / "config.json").read_text())["train"]["window"] == 400


def test_criteo_head_runs_from_the_command_line(tmp_path, shared_data):
    path = shared_data / "criteo" / "kaggle_first_1k.tsv"
    run_dir = tmp_path / "criteo"
    args = ["train", "--data", f"criteo:{path}", "--rows", "0", "--batch-size", "50", "--window", "500"]
    assert main([*args, "--increment-rows", "500", "--run-dir", str(run_dir), "--no-checkpoint", *TINY]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == 1000  # ragged lines of this file are accepted
    assert summary["malformed_rows"] == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--data", "criteo:/no/such/file.tsv"], "Criteo TSV file not found: /no/such/file.tsv"),
        (["train", "--data", "parquet:x"], "unknown stream spec 'parquet:x'"),
        (["train", "--batch-size", "0"], "TrainConfig.batch_size must be an integer >= 1, got 0"),
        (["train", "--nproc", "0"], "--nproc must be in [1, "),
        (["train", "--drift", "-1"], "JobConfig.drift (--drift) must be a finite number >= 0"),
        (["train", "--dense-arch", "16,8"], "DLRMConfig.dense_arch must end with embedding_dim=4"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--run-dir", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    error_lines = [line for line in stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], stderr
    assert not (tmp_path / "never").exists()  # nothing started


def test_console_script_reports_errors_the_same_way():
    proc = subprocess.run(
        [sys.executable, "-m", "torchrec_prune.cli", "train", "--rows", "-5"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "torchrec-prune: error: JobConfig.rows must be an integer >= 0 (0 = whole file), got -5"
    )
