"""A ``ray-train`` job killed as a whole (driver, its embedded Ray, every actor) and started again
resumes from its last complete whole-run checkpoint and finishes the stream.

The job runs as a real command in its own process tree; the test SIGKILLs that whole tree as soon as
the first checkpoint is published, and kills whatever is left of either run when it ends, also on
failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import children, kill_tree

COMMAND = [
    sys.executable, "-m", "torchrec_prune.cli", "ray-train", "--schedule", "alternate", "--trainers", "2",
    "--servers", "2", "--rows", "16000", "--increment-rows", "2000", "--window", "1000",
    "--num-embeddings", "500", "--dense-arch", "16,4", "--over-arch", "32,1", "--batch-size", "32",
    "--checkpoint-every", "3000", "--window-steps", "5", "--num-cpus", "2", "--no-progress",
]  # fmt: skip


def test_a_killed_ray_train_job_resumes_from_its_last_whole_run_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    command = [*COMMAND, "--run-dir", str(run_dir)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(run_dir.glob("checkpoints/ckpt-*/manifest.json")):
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        kill_tree(first.pid)
        first.wait()
    assert children(first.pid) == []
    [saved] = run_dir.glob("checkpoints/ckpt-*")
    position = int(saved.name.split("-")[1])
    assert 3000 <= position < 16000

    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = second.communicate(timeout=420)
    finally:
        kill_tree(second.pid)
    text = out.decode()
    assert second.returncode == 0, text[-3000:]
    assert f"resumed at row {position}" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == position and summary["samples"] == 16000
    windows = [json.loads(line) for line in (run_dir / "windows.jsonl").read_text().splitlines()]
    assert [w["samples_end"] for w in windows] == list(range(1000, 16001, 1000))  # none lost, none twice
    assert summary["closed_weight_violations"] == 0 and summary["mask_versions"] == [4, 4]
    assert Path(run_dir / "checkpoint").is_dir()  # the final model
