import os
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


def run_torchrun(script: Path, args: list[str], *, nproc: int = 2, timeout: int = 240) -> None:
    """Run ``script`` as ``nproc`` real torchrun ranks on loopback; fail with every rank's output."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(
            [*cmd, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {timeout} s\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
        )


# Two cores, and torchrun children of their own: one intra-op thread per test process avoids
# oversubscription (measured: 0.5 s vs 29 s for one test under load with two threads).
torch.set_num_threads(1)


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A state-dict entry as a plain tensor: a one-rank DMP model's ``ShardedTensor`` holds its whole
    table as one local shard; any other tensor is itself."""
    return value.local_shards()[0].tensor if hasattr(value, "local_shards") else value


def wrapped_mlp(sizes: list[int]) -> torch.nn.Sequential:
    """A wrapped plain MLP (Linear/ReLU stack) for pruner tests that need no TorchRec model."""
    import torchrec_prune as tp

    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1]), torch.nn.ReLU()]
    return tp.wrap(torch.nn.Sequential(*layers[:-1]))


def free_port() -> int:
    """A free TCP port on loopback for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pruner_step(model, pruner, ctx, x: torch.Tensor, y: torch.Tensor) -> float:
    """One training step of a plain model on (x, y) with ``pruner``'s hooks around the optimizer step."""
    import torch.nn.functional as F

    for o in ctx.optimizers:
        o.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
    loss.backward()
    pruner.before_step(ctx)
    for o in ctx.optimizers:
        o.step()
    pruner.after_step(ctx)
    ctx.step += 1
    ctx.samples_seen += len(y)
    return float(loss.detach())


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun starts each rank in a session of its own, so
    killing the agent's process group would leave the ranks running)."""
    tree, frontier = [pid], [pid]
    while frontier:  # collect first: a killed parent's children are re-parented and lost from view
        frontier = [child for parent in frontier for child in children(parent)]
        tree += frontier
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def final_model(run_dir: Path, config) -> dict[str, torch.Tensor]:
    """The state dict of a run folder's final ``checkpoint/`` loaded into a wrapped DLRM of ``config``."""
    import torchrec_prune as tp
    from torchrec_prune.distributed.checkpoint import load_checkpoint
    from torchrec_prune.models import build_dlrm

    model = tp.wrap(build_dlrm(config))
    load_checkpoint(model, run_dir / "checkpoint")
    return model.state_dict()


def assert_same_run(run: Path, reference: Path, config) -> None:
    """Two grow/prune run folders hold the same windows (byte for byte), phases (but for timings) and
    final weights and masks (``torch.equal``)."""
    import json

    def phases(run_dir: Path) -> list[dict]:
        records = json.loads((run_dir / "phases.json").read_text())["phases"]
        return [{k: v for k, v in p.items() if "seconds" not in k} for p in records]

    assert (run / "windows.jsonl").read_text() == (reference / "windows.jsonl").read_text()
    assert phases(run) == phases(reference)
    mine, ref = final_model(run, config), final_model(reference, config)
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in ref), [
        k for k in ref if not torch.equal(mine[k], ref[k])
    ]
