"""`torchrec-prune d2s` on two torchrun ranks: run folder, run checkpoints and an exact resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, kill_tree

from torchrec_prune.cli import main
from torchrec_prune.distributed.run_checkpoint import RunCheckpointer

ARGS = [
    "d2s", "--rows", "8000", "--increment-rows", "2000", "--batch-size", "64", "--window", "1000",
    "--num-embeddings", "500", "--dense-arch", "32,16,4", "--over-arch", "32,1", "--r", "1", "--p", "1",
    "--with-baseline", "--no-progress", "--checkpoint-every", "4000", "--keep-checkpoints", "5",
]  # fmt: skip
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "GLOO_SOCKET_IFNAME": "lo",
}


def _d2s(run_dir: Path) -> str:
    """Run the command as 2 local torchrun ranks; whatever happens, no process of it outlives the call."""
    cmd = [sys.executable, "-m", "torchrec_prune.cli", *ARGS, "--nproc", "2", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # timed out or interrupted: the CLI, its torchrun agent and the ranks
            kill_tree(proc.pid)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("d2s")
    _d2s(run_dir)
    return run_dir


def test_d2s_on_two_ranks_writes_every_line_and_checkpoints(two_ranks):
    summary = json.loads((two_ranks / "summary.json").read_text())
    fixed = summary["lines"]["fixed"]
    assert fixed["births"] == [1, 2, 3] and fixed["max_age"] == 0  # a fresh sparse model every increment
    assert summary["lines"]["fixed_mask"]["births"] == [1]
    assert all(0.3 < s < 1 for s in fixed["sparsity"])
    for name in ("dense", "fixed", "fixed_mask"):
        ends = [json.loads(line)["samples_end"] for line in (two_ranks / name / "windows.jsonl").open()]
        assert ends == list(range(1000, 8001, 1000))
    infos = RunCheckpointer(two_ranks / "checkpoints").complete()
    assert [i.position for i in infos] == [4000, 8000]
    assert infos[0].manifest["world_size"] == 2
    # after increment 1 (of 0..3): the dense model, the snapshot of increment 1 and both serving models
    assert infos[0].manifest["replicas"] == ["dense", "line.fixed", "line.fixed_mask", "snapshot.1"]
    assert (two_ranks / "serving_checkpoint" / ".metadata").is_file()


def test_d2s_resumed_from_an_increment_boundary_equals_the_uninterrupted_run(two_ranks, tmp_path):
    shutil.copytree(
        two_ranks / "checkpoints" / "ckpt-000000004000", tmp_path / "checkpoints" / "ckpt-000000004000"
    )
    log = _d2s(tmp_path)
    assert log.count("resumed from") == 2  # both ranks
    for name in ("dense", "fixed", "fixed_mask"):
        assert (tmp_path / name / "windows.jsonl").read_text() == (
            two_ranks / name / "windows.jsonl"
        ).read_text()
    mine, ref = (json.loads((d / "summary.json").read_text())["lines"] for d in (tmp_path, two_ranks))
    assert {n: (v["births"], v["sparsity"]) for n, v in mine.items()} == {
        n: (v["births"], v["sparsity"]) for n, v in ref.items()
    }


def test_d2s_refuses_a_stream_too_short_for_its_warmup(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGS, "--rows", "2000", "--run-dir", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    assert "--rows: 2000 rows give 1 increments of 2000, but D2S warms up for 1" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
