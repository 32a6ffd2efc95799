"""Faults on real Ray (loopback, 2 cores): a trainer actor and a server shard killed mid-run.

Each run trains 2 trainers x 32 rows over 8,000 rows of the drifting synthetic stream; the reference is
an uninterrupted run of the same job on the same actors. The fixture shuts Ray down even when a test
fails, which stops every actor.
"""

from __future__ import annotations

import threading
import time

import pytest

from torchrec_prune.distributed.ps import PSConfig, ray_session  # before ray: loopback
from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.driver import AsyncRunResult, run_async
from torchrec_prune.models import DLRMConfig
from torchrec_prune.schedules.grow_prune import GrowPruneConfig
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.job import JobConfig
from torchrec_prune.train.trainer import TrainConfig

SMALL = DLRMConfig(num_embeddings=1000, dense_arch=[16, 4], over_arch=[32, 1])
PS = PSConfig(trainers=2, servers=2, staleness=2, cache_rows=256, chunk_steps=4, shard_checkpoint_pushes=20)
PLAN = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=5)
ROWS = 8000


def job() -> JobConfig:
    train = TrainConfig(batch_size=32, window=1000, increment_rows=1000, progress=False)
    return JobConfig(rows=ROWS, drift=1.0, seed=0, model=SMALL, train=train, checkpoint=False)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    with ray_session(None, num_cpus=2):
        yield ActorPool(max_restarts=2, home=tmp_path_factory.mktemp("actors"))


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory) -> AsyncRunResult:
    return run_async(job(), PS, PLAN, pool=pool, run_dir=tmp_path_factory.mktemp("reference"))


def total_ce(result: AsyncRunResult) -> float:
    return sum(r.ce * r.n for r in result.records) / sum(r.n for r in result.records)


def run_with_kill(pool: ActorPool, run_dir, kill) -> AsyncRunResult:
    """Run the job while a thread waits until shard 0 has applied 60 pushes, then calls ``kill``."""
    import ray

    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 120
        restarted = False  # the shard's version went back to 0: this run's start() ran
        while time.monotonic() < deadline:
            try:
                version = ray.get(pool.servers[0].summary.remote(), timeout=10)["version"]
            except Exception:  # the shard has not been started yet
                version = 0
            restarted |= version < 60
            if restarted and version >= 60:
                kill()
                killed.set()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_async(job(), PS, PLAN, pool=pool, run_dir=run_dir)
    thread.join(timeout=5)
    assert killed.is_set(), "the run ended before the kill"
    return result


def test_a_killed_trainer_is_restarted_after_its_last_pushed_batch_and_the_run_completes(
    pool, reference, tmp_path
):
    """Tolerance: whole-stream look-ahead CE within 5% (relative) of the uninterrupted run. Five
    uninterrupted runs of this job spread over 1.0% (0.4952 to 0.5004: which trainer's push lands first
    changes from run to run); the fault itself costs more: while the trainer restarts, its partition
    stalls and the other trainer waits at the lead bound or runs ahead of it (+3.0% measured once on a
    loaded machine). The rows the dead trainer trained but never reported are left out of the windows,
    so the CEs cover slightly different samples."""
    import ray

    result = run_with_kill(pool, tmp_path, lambda: ray.kill(pool.trainers[1], no_restart=False))
    [restart] = result.lost["trainer_restarts"]
    assert restart["rank"] == 1 and restart["resumed_at_batch"] > 0
    assert result.samples == ROWS  # every row trained, none twice (the driver refuses a batch twice)
    assert sum(r.n for r in result.records) == ROWS - result.lost["unscored_rows"]
    assert sum(s["duplicate_pushes"] for s in result.servers) == 0
    assert result.violations == 0 and [s["mask_version"] for s in result.servers] == [4, 4]
    assert total_ce(result) == pytest.approx(total_ce(reference), rel=0.05)


def test_a_killed_server_shard_restores_its_checkpoint_and_the_lost_updates_are_reported(
    pool, reference, tmp_path
):
    """Pushes to the restarting shard wait (Ray holds the calls) and are applied after it restores; the
    pushes it applied after its last checkpoint (every 20) are lost and counted. Same CE tolerance (5%)."""
    import ray

    result = run_with_kill(pool, tmp_path, lambda: ray.kill(pool.servers[0], no_restart=False))
    shards = result.lost["shard_restarts"]
    assert [(s["shard"], s["incarnation"]) for s in shards] == [(0, 1)]
    assert 0 <= shards[0]["lost_updates"] < 20 + 2 * PS.chunk_steps  # since the last save, about
    assert result.servers[0]["incarnation"] == 1 and result.servers[1]["incarnation"] == 0
    assert result.servers[0]["committed"] == result.servers[1]["committed"]  # it took every last push
    assert result.lost["trainer_restarts"] == [] and result.samples == ROWS
    assert sum(r.n for r in result.records) == ROWS  # no trainer died: every batch scored once
    assert result.violations == 0 and [s["mask_version"] for s in result.servers] == [4, 4]
    assert total_ce(result) == pytest.approx(total_ce(reference), rel=0.05)
