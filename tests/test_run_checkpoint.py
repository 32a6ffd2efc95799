"""Full-state run checkpoints in one process: exact resume, atomic saves, refusals with clear messages."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_run, final_model, local_tensor

import torchrec_prune as tp
from torchrec_prune.cli import main
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.distributed.checkpoint import CheckpointMismatchError
from torchrec_prune.distributed.dmp import one_process_group, shard
from torchrec_prune.distributed.fused_tables import table_optimizer
from torchrec_prune.distributed.run_checkpoint import CheckpointWorldSizeError, RunCheckpointer
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.schedules.jobs import run_grow_prune_job
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.job import JobConfig, prepare_job, run_job, sharding_config
from torchrec_prune.train.replica import Replica
from torchrec_prune.train.trainer import TrainConfig, default_forward

TINY = DLRMConfig(num_embeddings=500, dense_arch=[32, 16, 4], over_arch=[32, 1])
GROW_PRUNE = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=5)


def _job(run_dir: Path, **train: object) -> JobConfig:
    loop = {"batch_size": 64, "window": 1000, "increment_rows": 2000, "progress": False, **train}
    return JobConfig(
        data="synthetic",
        rows=6000,
        drift=0.5,
        model=TINY,
        train=TrainConfig(**loop),
        run_dir=str(run_dir),
        checkpoint_every=1500,
        keep_checkpoints=10,
    )


def _grow_prune(run_dir: Path) -> None:
    run_grow_prune_job(prepare_job(_job(run_dir), extra={"grow_prune": "alternate"}), GROW_PRUNE)


def _assert_same_run(run: Path, reference: Path) -> None:
    assert_same_run(run, reference, TINY)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted alternate grow/prune run with a run checkpoint every 1500 rows."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("reference")
    _grow_prune(run_dir)
    return run_dir


def test_checkpoints_land_at_batch_boundaries_and_the_end(reference):
    positions = [info.position for info in RunCheckpointer(reference / "checkpoints").complete()]
    # 2000-row increments of 31 full batches of 64 and one of 16: due positions move to the next batch
    # boundary; the end of the stream is saved once, after the last window closed.
    assert positions == [1536, 3024, 4512, 6000]
    manifest = RunCheckpointer(reference / "checkpoints").latest().manifest
    assert manifest["world_size"] == 1 and manifest["replicas"] == ["model"]
    assert manifest["config"]["grow_prune"] == "alternate"


@pytest.mark.parametrize("position", [1536, 3024, 4512])
def test_resume_from_any_checkpoint_equals_the_uninterrupted_run(reference, tmp_path, position):
    # 1536 and 4512 lie in sparse phases (pruned neurons, reset optimizer state), 3024 inside the Taylor
    # importance window before a sparse phase (half-accumulated scores).
    name = f"ckpt-{position:012d}"
    shutil.copytree(reference / "checkpoints" / name, tmp_path / "checkpoints" / name)
    _grow_prune(tmp_path)
    _assert_same_run(tmp_path, reference)
    assert json.loads((tmp_path / "summary.json").read_text())["resume_seconds"] > 0


def test_a_run_killed_during_a_save_resumes_from_the_previous_checkpoint(reference, tmp_path):
    # A real SIGKILL while the second checkpoint is being published: its folder stays ".tmp-".
    script = textwrap.dedent(
        f"""
        import os, pathlib, signal, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_run_checkpoint import _grow_prune
        rename, saves = pathlib.Path.rename, []
        def killing_rename(self, target):
            if self.name.startswith(".tmp-ckpt-"):
                saves.append(self)
                if len(saves) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return rename(self, target)
        pathlib.Path.rename = killing_rename
        _grow_prune(pathlib.Path({str(tmp_path)!r}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".tmp-ckpt-000000003024",
        "ckpt-000000001536",
    ]
    assert RunCheckpointer(tmp_path / "checkpoints").latest().position == 1536
    _grow_prune(tmp_path)
    _assert_same_run(tmp_path, reference)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_lazily_created_optimizer_state_resumes_exactly(tmp_path):
    # SGD's momentum buffers exist only after a first step: they are allocated from the checkpoint.
    full, part = tmp_path / "full", tmp_path / "part"
    run_job(_job(full, optimizer="sgd", lr=0.5, momentum=0.9))
    shutil.copytree(full / "checkpoints" / "ckpt-000000003024", part / "checkpoints" / "ckpt-000000003024")
    run_job(_job(part, optimizer="sgd", lr=0.5, momentum=0.9))
    assert (part / "windows.jsonl").read_text() == (full / "windows.jsonl").read_text()
    mine, ref = final_model(part, TINY), final_model(full, TINY)
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


def test_keep_and_resume_never(reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    config = _job(tmp_path)
    config.keep_checkpoints, config.resume = 2, "never"
    result = run_job(config)
    assert result.resume_seconds is None and result.samples == 6000
    assert [i.position for i in RunCheckpointer(tmp_path / "checkpoints").complete()] == [4512, 6000]


def test_incomplete_folders_are_never_loaded(tmp_path):
    model = tp.wrap(build_dlrm(TINY))
    checkpointer = RunCheckpointer(tmp_path, keep=3)
    checkpointer.save(100, {"model": Replica(model)}, {"n": 1}, {"config": {}})
    (tmp_path / ".tmp-ckpt-000000000200").mkdir()  # cut short before the rename
    shutil.copytree(tmp_path / "ckpt-000000000100", tmp_path / "ckpt-000000000300")
    (tmp_path / "ckpt-000000000300" / "manifest.json").unlink()  # no manifest: not complete
    info = checkpointer.latest()
    assert info.position == 100
    assert checkpointer.load_state(info) == {"n": 1}


# ------------------------------------------------------------------------------------------------------
# Refusals: before anything is built or trained, naming what differs.


def test_resume_into_another_model_names_the_key_and_both_shapes(reference, tmp_path):
    other = JobConfig(
        **{**_job(reference).__dict__, "model": DLRMConfig(num_embeddings=500, dense_arch=[16, 4])}
    )
    with pytest.raises(CheckpointMismatchError) as err:
        prepare_job(other)
    message = err.value.one_line()
    assert "dense_arch.model._mlp.0._linear.weight" in message
    assert "checkpoint has shape (32, 13) float32, model has shape (16, 13) float32" in message


def test_resume_with_another_world_size_is_refused(reference):
    with pytest.raises(CheckpointWorldSizeError, match="written by 1 rank\\(s\\), this run has 2"):
        prepare_job(_job(reference), extra={"grow_prune": "alternate"}, world_size=2)


CLI = [
    "train", "--drift", "0.5", "--batch-size", "64", "--window", "1000",
    "--increment-rows", "2000", "--num-embeddings", "500", "--dense-arch", "32,16,4", "--over-arch", "32,1",
    "--no-progress", "--checkpoint-every", "1500",
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--lr", "0.1"], "--lr (train.lr) is 0.1 on the command line but 0.05 in the run checkpoint"),
        (["--seed", "3"], "--seed (seed) is 3 on the command line but 0 in the run checkpoint"),
        (["--dense-arch", "16,4"], "checkpoint has shape (32, 13) float32, model has shape (16, 13) float32"),
        (["--checkpoint-every", "10"], "--checkpoint-every must be 0 (off) or >= --batch-size (64) rows"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be an integer >= 1, got 0"),
    ],
)
def test_cli_refuses_a_conflicting_resume_and_leaves_the_run_folder_untouched(
    tmp_path, capsys, change, message
):
    run_dir = tmp_path / "run"
    assert main([*CLI, "--rows", "3000", "--run-dir", str(run_dir)]) == 0  # a finished short run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*CLI, "--rows", "3000", *change, "--run-dir", str(run_dir)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_checkpoint_of_an_older_one_process_run_loads_into_fused_tables(tmp_path):
    """Before one process trained like a DMP rank, a table's Adagrad accumulator was the dense
    optimizer's ``sum``: it becomes the fused optimizer's ``momentum1`` (the same quantity)."""
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(TINY))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for batch in SyntheticStream(256, num_embeddings=500, seed=0).batches(64):
        optimizer.zero_grad()
        default_forward(model, batch)[0].backward()
        optimizer.step()
    checkpointer = RunCheckpointer(tmp_path)
    checkpointer.save(256, {"model": Replica(model, [optimizer])}, {}, {})
    with one_process_group():
        sharded = shard(
            tp.wrap(build_dlrm(TINY, device="meta")), torch.device("cpu"), sharding_config(TrainConfig())
        )
        checkpointer.load_replicas(
            checkpointer.latest(), {"model": Replica(sharded.model, [sharded.optimizer])}
        )
        fused = sharded.model.fused_optimizer.state_dict()["state"]
        dense = dict(sharded.optimizer.params)
        for name, param in model.named_parameters():
            value = sharded.model.state_dict()[name]
            if hasattr(value, "local_shards"):  # a table, trained by the fused optimizer now
                table = name.rsplit(".", 2)[-2]
                assert torch.equal(value.local_shards()[0].tensor, param)
                momentum = fused[name][f"{table}.momentum1"].local_shards()[0].tensor
                assert torch.equal(momentum, optimizer.state[param]["sum"])
                assert bool((momentum > 0).any())
            else:
                assert torch.equal(value, param)
                assert torch.equal(sharded.optimizer.state[dense[name]]["sum"], optimizer.state[param]["sum"])


def test_prune_starts_from_a_run_checkpoint_with_its_optimizer_state(reference, tmp_path):
    """``prune`` trains fused tables like the run did: weights, the dense optimizer's state and the
    tables' fused state all come from the run checkpoint, as a DMP replica of the run reads them."""
    from torchrec_prune.pruners.run import PruneConfig, PruneJobConfig, prepare_prune_job

    job = _job(tmp_path / "prune")
    config = PruneJobConfig(str(reference), job, PruneConfig("mp", sparsity=0.5, prune_rows=1000), 0)
    prepared = prepare_prune_job(config)  # a run folder: its newest complete run checkpoint
    info = RunCheckpointer(reference / "checkpoints").latest()
    mine = prepared.model.state_dict()
    my_fused = table_optimizer(prepared.model).state_dict()["state"]
    my_dense = prepared.optimizer
    with one_process_group():  # the run's model as a one-rank DMP replica reads it
        sharded = shard(
            tp.wrap(build_dlrm(TINY, device="meta")), torch.device("cpu"), sharding_config(job.train)
        )
        RunCheckpointer(reference / "checkpoints").load_replicas(
            info, {"model": Replica(sharded.model, [sharded.optimizer])}
        )
        fused = sharded.model.fused_optimizer.state_dict()["state"]
        for name, value in sharded.model.state_dict().items():
            assert torch.equal(mine[name], local_tensor(value)), name
        assert my_fused.keys() == fused.keys()
        for key, entries in fused.items():
            for state, value in entries.items():
                assert torch.equal(my_fused[key][state], value.local_shards()[0].tensor), key
        for name, param in sharded.optimizer.params.items():
            assert torch.equal(
                my_dense.state[my_dense.params[name]]["sum"], sharded.optimizer.state[param]["sum"]
            )
    assert any(bool((entries[s] > 0).any()) for entries in my_fused.values() for s in entries)
    assert any(bool((state["sum"] > 0).any()) for state in my_dense.state.values())
    with pytest.raises(ValueError, match="--optimizer is 'sgd' but the run checkpoint"):
        sgd = JobConfig(**{**job.__dict__, "train": TrainConfig(optimizer="sgd", progress=False)})
        prepare_prune_job(PruneJobConfig(str(info.path), sgd, config.prune, 0))
