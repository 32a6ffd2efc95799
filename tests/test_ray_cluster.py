"""Placement on a multi-node Ray cluster: two nodes on this machine (``ray.cluster_utils.Cluster``), each
with its own CPUs, on loopback and with token authentication; shards and trainers spread over them.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from torchrec_prune.distributed.ps import PSConfig  # before ray: loopback
from torchrec_prune.distributed.ps.actors import ActorPool
from torchrec_prune.distributed.ps.auth import ensure_token, token_auth
from torchrec_prune.distributed.ps.job import RayTrainConfig, run_ray_job
from torchrec_prune.models import DLRMConfig
from torchrec_prune.train.job import JobConfig
from torchrec_prune.train.trainer import TrainConfig


def _processes_of(folder: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if folder in line and not line.startswith("Z")]


@pytest.fixture
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("cl")  # short: Ray's socket paths live under the temp dir
    with token_auth(ensure_token(root)):
        nodes = Cluster()
        try:
            common = dict(num_cpus=2, node_ip_address="127.0.0.1", temp_dir=str(root / "ray"))
            nodes.add_node(**common, include_dashboard=False)
            nodes.add_node(**common)
            ray.init(address=nodes.address)
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()
    assert not _processes_of(str(root)), "processes of the test's cluster left running"


def test_shards_and_trainers_spread_over_nodes_with_their_cpus_reserved(cluster, tmp_path):
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2
    job = JobConfig(
        rows=4000,
        model=DLRMConfig(num_embeddings=500, dense_arch=[32, 16, 4], over_arch=[32, 1]),
        train=TrainConfig(window=1000, increment_rows=1000, progress=False),
        run_dir=str(tmp_path),
        checkpoint=False,
    )
    config = RayTrainConfig(job=job, ps=PSConfig(trainers=2, servers=1), schedule="alternate", window_steps=5)
    config.check()
    # One CPU per actor: 3 actors cannot fit one 2-CPU node, so the run needs both nodes whatever the load
    # (with no CPUs reserved, SPREAD is best effort: under load all actors once landed on one node).
    pool = ActorPool(server_cpus=1, trainer_cpus=1)
    result = run_ray_job(config, pool=pool)
    assert result.samples == 4000 and result.violations == 0

    (server,) = ray.get([a.node_id.remote() for a in pool.servers])
    trainers = ray.get([a.node_id.remote() for a in pool.trainers])
    assert {server, *trainers} == node_ids  # every node holds an actor
    assert any(t != server for t in trainers)  # a trainer runs on another node than the shard
    for actor in (*pool.servers, *pool.trainers):  # free their CPUs for the next check
        ray.kill(actor)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)

    # --server-cpus / --trainer-cpus: both fit this node, where Ray's default policy would put both (it
    # packs the local node up to half its CPUs); SPREAD puts them on different nodes
    reserved = ActorPool(server_cpus=0.5, trainer_cpus=0.5)
    servers, trainers = reserved.take(1, 1)
    nodes = ray.get([a.node_id.remote() for a in (*servers, *trainers)])  # both up
    assert nodes[0] != nodes[1]
    assert ray.available_resources().get("CPU", 0) == 4 - 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trainer-cpus", "-1"], "--trainer-cpus must be >= 0"),
        (["--server-cpus", "nan"], "--server-cpus must be a finite number"),
        (["--schedule", "d2s", "--server-cpus", "1"], "--server-cpus applies to the asynchronous schedules"),
    ],
)
def test_bad_actor_resources_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    from torchrec_prune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ray-train", "--rows", "4000", "--increment-rows", "1000", "--run-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
