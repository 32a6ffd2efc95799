"""Bad luck while training: a diverging run keeps its last good checkpoint, a stopped rank ends the job
within --timeout naming it, and --overwrite is the one way to replace a run; every run logs to its folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, children, kill_tree

import torchrec_prune.train.trainer as trainer_module
from torchrec_prune.cli import main
from torchrec_prune.distributed.dmp import one_process_group
from torchrec_prune.distributed.run_checkpoint import RunCheckpointer
from torchrec_prune.models import DLRMConfig
from torchrec_prune.train.job import JobConfig, build_replica, non_finite_key, prepare_job, run_job
from torchrec_prune.train.trainer import NonFiniteError, TrainConfig

TINY = ["--num-embeddings", "500", "--dense-arch", "32,16,4", "--over-arch", "32,1", "--no-progress"]
LOOP = ["--rows", "2000", "--batch-size", "50", "--window", "500", "--increment-rows", "1000"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_diverging_run_stops_before_saving_and_its_last_checkpoint_survives_bit_for_bit(tmp_path):
    # lr 1e6 (the library allows any finite lr; the command line stops at 1000): NaN at the third step
    config = JobConfig(
        rows=2000,
        model=DLRMConfig(num_embeddings=500, dense_arch=[32, 16, 4], over_arch=[32, 1]),
        train=TrainConfig(
            batch_size=50, lr=1e6, optimizer="sgd", window=500, increment_rows=1000, progress=False
        ),
        run_dir=str(tmp_path),
        checkpoint_every=100,
    )
    with pytest.raises(NonFiniteError) as first:
        run_job(prepare_job(config))
    checkpoints = tmp_path / "checkpoints"
    (last,) = RunCheckpointer(checkpoints).complete()
    assert "loss is nan at step 2, look-ahead window 0 (stream row 100)" in str(first.value)
    assert f"the last good run checkpoint {str(last.path)!r} is kept" in str(first.value)
    saved = _files(checkpoints)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "summary.json").exists()

    # Started again it resumes from that checkpoint, diverges at the same step, and saves nothing.
    prepared = prepare_job(config)
    assert prepared.resume_from.path == last.path
    with pytest.raises(NonFiniteError, match="at step 2, look-ahead window 0"):
        run_job(prepared)
    assert _files(checkpoints) == saved
    with one_process_group():
        replica = build_replica(prepared, "cpu")
        RunCheckpointer(checkpoints).load_replicas(last, {"model": replica})
        assert non_finite_key(replica.model) is None  # what was kept is finite


def test_overwrite_replaces_a_run_and_every_run_logs_to_its_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", *LOOP, *TINY, "--run-dir", str(run)]) == 0
    (run / "phases.json").write_text("{}")  # a file the next run would not write: must go
    monkeypatch.setattr(trainer_module, "PROGRESS_SECONDS", 0.0)  # a progress line per batch
    args = ["train", *LOOP, "--num-embeddings", "500", "--dense-arch", "32,16,4", "--over-arch", "32,1"]
    assert main([*args, "--seed", "1", "--overwrite", "--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    assert not (run / "phases.json").exists()
    log = (run / "log.txt").read_text()
    assert "train: row 2000 of 2000 (100%)" in log  # stderr is no terminal: logged lines, no bar
    assert "\r" not in capsys.readouterr().err


@pytest.fixture
def launcher():
    """A `torchrec-prune --nproc 2` launcher in its own session; every process of it killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "torchrec_prune.cli", *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:  # the CLI, its torchrun agent and the ranks (each in a session of its own)
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait()


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun rank ``rank`` under the launcher (launcher -> torchrun agent -> ranks)."""
    for agent in children(launcher_pid):
        for pid in children(agent):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    pytest.fail(f"no rank {rank} under the launcher")


def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(tmp_path, launcher):
    log, timeout = tmp_path / "job.log", 10
    rows = ["--rows", "400000", "--batch-size", "50", "--window", "5000", "--increment-rows", "5000"]
    args = [
        "train",
        *rows,
        *TINY,
        "--nproc",
        "2",
        "--timeout",
        str(timeout),
        "--run-dir",
        str(tmp_path / "r"),
    ]
    proc = launcher(args, log)
    ranks = tmp_path / "r"
    deadline = time.monotonic() + 180
    while not (ranks / "windows.jsonl").is_file() or not (ranks / "windows.jsonl").read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)  # a window closed: both ranks are in the training loop
    rank1 = _rank_pid(proc.pid, 1)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        proc.wait(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job outlived --timeout {timeout} s by 30 s:\n{log.read_text()[-3000:]}")
    finally:
        kill_tree(rank1)  # whatever happened, the stopped rank does not outlive the test
    elapsed = time.monotonic() - stopped
    text = log.read_text()
    assert proc.returncode != 0
    assert "rank 0: rank(s) 1 stopped answering" in text, text[-3000:]
    assert elapsed < timeout + 15, elapsed
