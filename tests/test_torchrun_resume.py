"""Alternate grow/prune under real torchrun agents: two nodes on loopback, a killed rank, a killed job.

Every run trains the same stream on two ranks (gloo, one intra-op thread each); the interrupted ones
must end with exactly the uninterrupted run's window series, phases and final weights and masks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_run, children, final_model, free_port, kill_tree

import torchrec_prune as tp
from torchrec_prune.distributed.run_checkpoint import RunCheckpointer
from torchrec_prune.models import DLRMConfig, build_dlrm

ROWS = 16384
COMMAND = [
    str(REPO / "launch" / "torchrun_command.py"), "grow-prune", "--rows", str(ROWS), "--drift", "0.5",
    "--batch-size", "64", "--window", "2000", "--increment-rows", "2048", "--num-embeddings", "500",
    "--dense-arch", "32,16,4", "--over-arch", "32,1", "--window-steps", "10", "--no-progress",
    "--checkpoint-every", "2500", "--keep-checkpoints", "20",
]  # fmt: skip
TINY = DLRMConfig(num_embeddings=500, dense_arch=[32, 16, 4], over_arch=[32, 1])
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "GLOO_SOCKET_IFNAME": "lo",
    "OMP_NUM_THREADS": "1",
}


class Agents:
    """torchrun agents started in their own sessions; ``stop`` kills every process they started."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*TORCHRUN, *args],
                cwd=REPO,
                env=ENV,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not finish in {timeout} s:\n{log.read_text()[-4000:]}")
        assert code == 0, f"torchrun exited {code}:\n{log.read_text()[-4000:]}"

    def stop(self) -> None:
        for proc in self.procs:
            kill_tree(proc.pid)
            proc.wait()


@pytest.fixture
def agents():
    agents = Agents()
    try:
        yield agents
    finally:
        agents.stop()


def _standalone(run_dir: Path, max_restarts: int) -> list[str]:
    return [
        "--standalone",
        "--nproc-per-node",
        "2",
        f"--max-restarts={max_restarts}",
        *COMMAND,
        "--run-dir",
        str(run_dir),
    ]


def _wait_for_checkpoint(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    """Wait for ``count`` complete run checkpoints before the end of the stream; the last position."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [i.position for i in RunCheckpointer(run_dir / "checkpoints").complete() if i.position < ROWS]
        if len(done) >= count:
            return done[-1]
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    pytest.fail(f"no {count} run checkpoints in {timeout} s")


def _resumed_positions(log: str) -> list[int]:
    """Stream positions of the checkpoints that ranks logged they resumed from."""
    return [int(line.split("ckpt-")[1][:12]) for line in log.splitlines() if "resumed from" in line]


def _phases(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "phases.json").read_text())["phases"]


def _assert_same_run(run: Path, reference: Path) -> None:
    assert_same_run(run, reference, TINY)
    ends = [json.loads(line)["samples_end"] for line in (run / "windows.jsonl").read_text().splitlines()]
    assert ends == sorted(set(ends)) and ends[-1] == ROWS  # no gap, no duplicate
    assert len(_phases(run)) == 5


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    """The uninterrupted run: two torchrun agents (--nnodes 2, one rank each), c10d rendezvous on loopback."""
    run_dir = tmp_path_factory.mktemp("two_nodes")
    agents, port = Agents(), free_port()
    try:
        procs = []
        for node in range(2):
            args = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
            args += [
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                "--local-addr",
                "127.0.0.1",
            ]
            procs.append(
                agents.start([*args, *COMMAND, "--run-dir", str(run_dir)], run_dir / f"node{node}.log")
            )
        for node, proc in enumerate(procs):
            agents.wait(proc, run_dir / f"node{node}.log")
    finally:
        agents.stop()
    return run_dir


def test_two_nodes_run_alternate_grow_prune_to_the_end(two_nodes):
    phases = _phases(two_nodes)
    assert [p["label"] for p in phases] == ["dense0", "sparse1", "dense2", "sparse3", "dense4"]
    assert phases[1]["training_flops_per_sample"] < phases[0]["training_flops_per_sample"]
    assert json.loads((two_nodes / "summary.json").read_text())["samples"] == ROWS
    manifest = RunCheckpointer(two_nodes / "checkpoints").latest().manifest
    assert manifest["world_size"] == 2 and manifest["position"] == ROWS


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(two_nodes, tmp_path, agents):
    log = tmp_path / "torchrun.log"
    proc = agents.start(_standalone(tmp_path, max_restarts=1), log)
    position = _wait_for_checkpoint(tmp_path, 1, proc)
    ranks = [
        pid for pid in children(proc.pid) if "torchrun_command" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    agents.wait(proc, log)
    text = log.read_text()
    assert text.count("(torchrun restarts so far: 1)") == 2  # both ranks of the restarted group resumed
    assert min(_resumed_positions(text)) >= position  # each rank resumed from a checkpoint, none from 0
    _assert_same_run(tmp_path, two_nodes)


def test_a_killed_job_started_again_ends_as_if_uninterrupted(two_nodes, tmp_path, agents):
    log = tmp_path / "torchrun.log"
    proc = agents.start(_standalone(tmp_path, max_restarts=0), log)
    position = _wait_for_checkpoint(tmp_path, 2, proc)
    kill_tree(proc.pid)  # the agent and both ranks, as when the machine is lost
    proc.wait()
    again = agents.start(_standalone(tmp_path, max_restarts=0), log)
    agents.wait(again, log)
    resumed = _resumed_positions(log.read_text())
    assert len(resumed) == 2 and min(resumed) >= position
    _assert_same_run(tmp_path, two_nodes)


def test_a_two_rank_run_checkpoint_loads_into_one_process_with_its_optimizer_state(two_nodes):
    from torchrec_prune.distributed.run_checkpoint import load_into_one_process
    from torchrec_prune.train.replica import Replica

    model = tp.wrap(build_dlrm(TINY))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    info = RunCheckpointer(two_nodes / "checkpoints").latest()
    missing = load_into_one_process(info, "model", Replica(model, [optimizer]))
    final = final_model(two_nodes, TINY)
    assert all(torch.equal(value, final[key]) for key, value in model.state_dict().items())
    # Tables trained with DMP's fused Adagrad: their accumulators come from it; only Adagrad's step
    # counters of the tables (unused without lr decay) have no counterpart.
    tables = [n for n, _ in model.named_parameters() if ".embedding_bags." in n]
    assert sorted(missing) == sorted(f"{n}/step" for n in tables)
    sums = {n: optimizer.state[p]["sum"] for n, p in model.named_parameters()}
    assert all(bool((sums[n] > 0).any()) for n in tables)
    assert all(bool((sums[n] > 0).any()) for n in sums if n not in tables)
