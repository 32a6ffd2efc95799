"""Fault tolerance of the asynchronous run without Ray: shard checkpoints (torn writes never read),
restored shards and what trainers lose with them, a dead trainer resumed after the last batch the shards
took, and a driver resumed from a whole-run checkpoint, bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from torchrec_prune.distributed.ps import PSConfig
from torchrec_prune.distributed.ps.backends import LocalBackend, LocalShards, TrainerLost
from torchrec_prune.distributed.ps.driver import run_async
from torchrec_prune.distributed.ps.layout import ParamLayout, mask_buffers
from torchrec_prune.distributed.ps.messages import PushRequest
from torchrec_prune.distributed.ps.run_state import AsyncCheckpoints
from torchrec_prune.distributed.ps.server import ShardState
from torchrec_prune.distributed.ps.store import ShardStore
from torchrec_prune.distributed.ps.trainer import ChunkReport, PSTrainer
from torchrec_prune.masks import wrap
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for
from torchrec_prune.train.trainer import TrainConfig

SMALL = DLRMConfig(num_embeddings=1000, dense_arch=[16, 4], over_arch=[16, 1])


def small_job(rows: int = 4000, batch_size: int = 32, **settings) -> JobConfig:
    train = TrainConfig(batch_size=batch_size, window=500, increment_rows=1000, progress=False)
    return JobConfig(rows=rows, drift=1.0, seed=0, model=SMALL, train=train, checkpoint=False, **settings)


def tiny_shard(store: ShardStore | None = None, checkpoint_pushes: int = 0) -> ShardState:
    config = DLRMConfig(num_dense=3, num_sparse=2, num_embeddings=12, dense_arch=[6, 4], over_arch=[5, 1])
    torch.manual_seed(0)
    model = wrap(build_dlrm(config))
    layout = ParamLayout.from_model(model, 1)
    masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
    init = layout.split_state(dict(model.named_parameters()), 0)
    return ShardState(
        0, layout, init, masks, TrainConfig(lr=0.1), store=store, checkpoint_pushes=checkpoint_pushes
    )


def push(shard: ShardState, batch: int, rank: int = 0) -> None:
    name = "model.over_arch.model.1.weight"
    grad = np.ones(tuple(shard.params[name].shape), np.float32)
    shard.push(
        PushRequest(copy_version=shard.version, mask_version=0, rank=rank, batch=batch, dense={name: grad})
    )


def test_a_torn_shard_checkpoint_is_never_restored_the_previous_one_is(tmp_path):
    """A process killed (SIGKILL) in the middle of writing its second checkpoint."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from torchrec_prune.distributed.ps.store import ShardStore
        store = ShardStore({str(tmp_path)!r})
        store.save({{"version": 1, "weights": torch.ones(1000)}})
        real_save = torch.save
        def torn(obj, f):
            f.write(b"\\x80\\x02partial")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = torn
        store.save({{"version": 2, "weights": torch.zeros(1000)}})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-1", "state-0.pt"]  # the torn file stayed
    latest = ShardStore(tmp_path).latest()
    assert latest["version"] == 1 and bool(latest["weights"].eq(1).all())
    ShardStore(tmp_path).save({"version": 3})  # the next save removes the torn file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-0.pt", "state-1.pt"]


def test_a_restored_shard_is_a_new_incarnation_and_takes_no_batch_twice(tmp_path):
    store = ShardStore(tmp_path)
    shard = tiny_shard(store, checkpoint_pushes=2)
    for batch in range(3):
        push(shard, batch)
    assert shard.version == 3 and shard.stats["checkpoints"] == 1  # saved at version 2
    restored = tiny_shard()
    restored.restore(store.latest())
    assert (restored.version, restored.incarnation, restored.committed) == (2, 1, {0: 1})
    push(restored, 1)  # Ray retrying a call the dead incarnation had already applied and saved
    assert restored.version == 2 and restored.stats["duplicate_pushes"] == 1
    push(restored, 2)  # the push lost with the dead incarnation arrives again: applied
    assert restored.version == 3 and restored.committed == {0: 2}
    saved = shard.state_dict()
    again = tiny_shard()
    again.load_state_dict(saved)
    for name, value in saved["weights"].items():
        np.testing.assert_array_equal(again.weights()[name], value)


def test_a_trainer_seeing_a_restored_shard_reports_the_updates_lost_and_pulls_everything_again(tmp_path):
    job = small_job()
    stream = make_stream(job)
    torch.manual_seed(0)
    model = wrap(build_dlrm(model_config_for(stream, job.model)))
    layout = ParamLayout.from_model(model, 1)
    masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
    init = layout.split_state(dict(model.named_parameters()), 0)
    store = ShardStore(tmp_path)
    shard = ShardState(0, layout, init, masks, job.train, store=store, checkpoint_pushes=4)
    clients = LocalShards([shard])
    trainer = PSTrainer(0, job, PSConfig(trainers=1, cache_rows=256), layout, clients)
    assert trainer.run_steps(6).restarts == []
    restored = ShardState(0, layout, init, masks, job.train)
    restored.restore(store.latest())  # the shard died at version 6, its last checkpoint was at 4
    clients.shards[0] = restored
    report = trainer.run_steps(2)
    assert [(r.shard, r.incarnation, r.last_seen, r.restored, r.lost) for r in report.restarts] == [
        (0, 1, 6, 4, 2)
    ]
    assert restored.version == 6 and restored.committed == {0: 7}  # batches 6, 7 applied once each
    trainer._seen(0, 9, incarnation=0)  # a late reply of the dead incarnation (a push it had answered)
    assert trainer.restarts == [] and trainer.known[0] == 6 and trainer.incarnation[0] == 1


class DyingLocalBackend(LocalBackend):
    """A local backend whose trainer ``rank`` dies once, after it trained and pushed a chunk it never
    reports (the worst case for the driver: batches trained and not scored)."""

    def __init__(self, setup, rank: int, at_call: int) -> None:
        super().__init__(setup)
        self.rank, self.at_call, self.calls = rank, at_call, 0

    def next_report(self) -> ChunkReport:
        rank, _ = self._queue[0]
        report = super().next_report()
        self.calls += rank == self.rank
        if rank == self.rank and self.calls == self.at_call:
            raise TrainerLost(rank, "killed by the test")
        return report


def test_a_dead_trainer_resumes_after_the_last_batch_the_shards_took_and_trains_no_batch_twice(monkeypatch):
    from torchrec_prune.distributed.ps import driver as driver_module

    job = small_job()
    ps = PSConfig(trainers=2, servers=2, staleness=2, cache_rows=256, chunk_steps=4)
    monkeypatch.setattr(driver_module, "LocalBackend", lambda setup: DyingLocalBackend(setup, 1, 3))
    with pytest.raises(RuntimeError, match="trainer 1 died: killed by the test"):
        run_async(job, ps, backend="local")  # restarts are off by default for the local backend

    seen: list[tuple[int, int]] = []
    real_add = driver_module.ScoreCollector.add

    def record(self, score):
        seen.append((score.start, score.end))
        return real_add(self, score)

    monkeypatch.setattr(driver_module.ScoreCollector, "add", record)
    result = run_async(job, ps, backend="local", max_restarts=1)
    assert len(seen) == len(set(seen))  # no batch arrived twice: none was trained twice
    [restart] = result.lost["trainer_restarts"]
    assert restart["rank"] == 1 and restart["unscored_batches"] == 4  # the chunk it never reported
    assert restart["resumed_at_batch"] == 12 and result.lost["unscored_rows"] == 4 * 32
    assert result.samples == 4000  # every row trained once ...
    assert (
        result.records[-1].samples_end == sum(r.n for r in result.records) == 4000 - 4 * 32
    )  # ... not scored
    assert sum(s["duplicate_pushes"] for s in result.servers) == 0


def test_a_driver_resumed_from_its_run_checkpoint_finishes_exactly_as_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    """Local backend, grow/prune with a mask change after the checkpoint: records, weights, masks and
    counters equal bit for bit (the quiet point and the full re-pull happen in both runs)."""
    job = small_job(rows=4000, checkpoint_every=1600, resume="auto")
    ps = PSConfig(trainers=2, servers=2, staleness=3, cache_rows=256, shard_checkpoint_pushes=0)
    plan = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=5)
    whole = run_async(job, ps, plan, backend="local", run_dir=tmp_path / "whole")

    class DriverDied(Exception):
        pass

    real_save = AsyncCheckpoints.save

    def save_then_die(self, position, **parts):
        real_save(self, position, **parts)
        raise DriverDied

    monkeypatch.setattr(AsyncCheckpoints, "save", save_then_die)
    with pytest.raises(DriverDied):
        run_async(job, ps, plan, backend="local", run_dir=tmp_path / "cut")
    monkeypatch.setattr(AsyncCheckpoints, "save", real_save)
    resumed = run_async(job, ps, plan, backend="local", run_dir=tmp_path / "cut")
    [saved] = AsyncCheckpoints(tmp_path / "whole", keep=2, identity={}).complete()
    assert resumed.resumed_from == saved.position and whole.resumed_from is None
    assert [p for p in whole.phases if p.entered_at_position > saved.position]  # masks change after it
    assert resumed.records == whole.records
    for name, value in whole.weights.items():
        torch.testing.assert_close(resumed.weights[name], value, rtol=0, atol=0)
    assert all(np.array_equal(resumed.masks[n], m) for n, m in whole.masks.items())
    assert [p.mask_version for p in resumed.phases] == [p.mask_version for p in whole.phases]
    assert resumed.samples == whole.samples == 4000

    with pytest.raises(ValueError, match="trainers=2, this run has 1"):
        run_async(job, replace(ps, trainers=1), plan, backend="local", run_dir=tmp_path / "cut")


class StallingLocalBackend(LocalBackend):
    """Trainer 1 stalls: its calls are served only when no other trainer's call is queued."""

    def next_report(self) -> ChunkReport:
        others = [i for i, (rank, _) in enumerate(self._queue) if rank != 1]
        if others:
            self._queue.rotate(-others[0])
        return super().next_report()


@pytest.mark.parametrize("lead", [0, 2])
def test_a_stalled_trainer_holds_the_others_back_within_the_lead_bound(monkeypatch, lead):
    from torchrec_prune.distributed.ps import driver as driver_module

    job = small_job()
    ps = PSConfig(trainers=2, staleness=2, cache_rows=256, chunk_steps=2, max_lead_chunks=lead)
    monkeypatch.setattr(driver_module, "LocalBackend", StallingLocalBackend)
    result = run_async(job, ps, backend="local")
    half = 4000 // 32 // 2  # batches per trainer
    if lead == 0:
        assert result.max_pending >= half - 1  # trainer 0 ran through its whole partition first
    else:
        bound = lead * ps.chunk_steps * ps.trainers  # in single-trainer batches of 32 rows
        assert result.max_pending <= bound // 2 + 2 * ps.chunk_steps  # its half, plus one queued chunk
    assert result.samples == 4000 and result.records[-1].samples_end == 4000
