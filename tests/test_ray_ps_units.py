"""The parameter-server pieces without Ray: row cache, layout, shard updates and masks, reordering,
the grow/prune driver schedule, the whole loop in one process, and the bad-input checks."""

from __future__ import annotations

import argparse
import socket

import numpy as np
import pytest
import torch

from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.distributed.ps import PSConfig
from torchrec_prune.distributed.ps.cache import RowCache
from torchrec_prune.distributed.ps.cli import add_ray_train_parser, prepare_ray_train
from torchrec_prune.distributed.ps.collector import ScoreCollector, global_ranges
from torchrec_prune.distributed.ps.driver import run_async
from torchrec_prune.distributed.ps.layout import ParamLayout, mask_buffers
from torchrec_prune.distributed.ps.messages import PullRequest, PushRequest
from torchrec_prune.distributed.ps.schedule import AsyncGrowPrune
from torchrec_prune.distributed.ps.server import ShardState
from torchrec_prune.distributed.ps.trainer import BatchScore
from torchrec_prune.masks import wrap
from torchrec_prune.metrics.window import LookAheadWindow
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.schedules.grow_prune import GrowPruneConfig, GrowPruneSchedule
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.job import JobConfig, make_stream, model_config_for
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, make_optimizer

SMALL = DLRMConfig(num_embeddings=1000, dense_arch=[16, 4], over_arch=[16, 1])


def small_job(batch_size: int = 64, rows: int = 4000, lr: float = 0.05) -> JobConfig:
    train = TrainConfig(batch_size=batch_size, lr=lr, window=500, increment_rows=1000, progress=False)
    return JobConfig(rows=rows, drift=1.0, seed=0, model=SMALL, train=train, checkpoint=False)


def tiny_model(num_embeddings: int = 12) -> torch.nn.Module:
    config = DLRMConfig(
        num_dense=3, num_sparse=2, num_embeddings=num_embeddings, dense_arch=[6, 4], over_arch=[5, 1]
    )
    torch.manual_seed(0)
    return wrap(build_dlrm(config))


def shard_of(model: torch.nn.Module, shards: int = 1, **kwargs) -> tuple[ShardState, ParamLayout]:
    layout = ParamLayout.from_model(model, shards)
    masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
    state = dict(model.named_parameters())
    shard = ShardState(0, layout, layout.split_state(state, 0), masks, TrainConfig(lr=0.1), **kwargs)
    return shard, layout


# --------------------------------------------------------------------------------------------------
def test_row_cache_evicts_least_recently_used_rows_outside_the_batch():
    cache = RowCache(3)
    slots, new = cache.assign(np.array([5, 7]))
    assert new.all()
    cache.versions[slots] = 4
    cache.assign(np.array([5]))  # 5 is now more recent than 7
    slots2, new2 = cache.assign(np.array([9, 11]))  # one free slot, then 7 (least recent) is evicted
    assert new2.all() and cache.evictions == 1
    assert set(slots2.tolist()) | {int(slots[0])} == {0, 1, 2}  # 5 kept its slot
    assert (cache.versions[slots2] == -1).all()  # a reused slot is never pulled yet
    with pytest.raises(ValueError, match="exceed the cache"):
        cache.assign(np.arange(4))


def test_row_cache_maps_ids_like_a_dictionary_lru_over_a_random_stream():
    """The sorted-array index finds the same slots and misses as an id -> slot dict, and new rows take
    the least recently used slots (free ones first), never one this batch uses."""
    rng = np.random.default_rng(0)
    cache, slot_of, used, row_of = RowCache(16), {}, np.full(16, -1), np.full(16, -1)
    for batch in range(1, 300):
        ids = np.unique(rng.integers(0, 40, rng.integers(1, 12)))
        slots, new = cache.assign(ids)
        want_new = np.array([int(i) not in slot_of for i in ids])
        assert (new == want_new).all()
        for i, slot in zip(ids[~new].tolist(), slots[~new].tolist(), strict=True):
            assert slot_of[i] == slot
            used[slot] = batch
        taken = slots[new]
        others = np.setdiff1d(np.flatnonzero(used != batch), taken)
        assert (used[taken] != batch).all()
        if len(taken) and len(others):
            assert used[taken].max() <= used[others].min()
        for i, slot in zip(ids[new].tolist(), slots[new].tolist(), strict=True):
            slot_of.pop(int(row_of[slot]), None)
            slot_of[i], row_of[slot], used[slot] = slot, i, batch
        assert len(cache) == len(slot_of)
        assert len(cache._queue) <= 2 * cache.capacity  # stale queue entries are dropped


def test_layout_shards_rows_by_id_and_round_trips_the_model():
    model = tiny_model()
    layout = ParamLayout.from_model(model, 3)
    assert layout.row_owner(np.array([0, 1, 2, 3])).tolist() == [0, 1, 2, 0]
    assert sum(layout.owned_rows("t_cat_0", s) for s in range(3)) == 12
    assert set(layout.dense_owner.values()) == {0, 1, 2}  # dense tensors spread over every shard
    state = dict(model.named_parameters())
    merged = layout.merge_states([layout.split_state(state, s) for s in range(3)])
    assert merged.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(merged[name], value.detach())


def test_shard_row_push_applies_the_library_adagrad_to_those_rows_only():
    model = tiny_model()
    shard, layout = shard_of(model)
    table = layout.tables["t_cat_0"].param
    reference = torch.nn.Parameter(dict(model.named_parameters())[table].detach().clone())
    optimizer = make_optimizer([reference], TrainConfig(lr=0.1))
    grad_rows = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    for step in range(3):
        dense = torch.zeros_like(reference)
        dense[[2, 7]] = torch.from_numpy(grad_rows)
        reference.grad = dense
        optimizer.step()
        shard.push(
            PushRequest(
                copy_version=shard.version,
                mask_version=0,
                rank=0,
                batch=step,
                keys=layout.keys("t_cat_0", np.array([2, 7])),
                rows=grad_rows,
            )
        )
    torch.testing.assert_close(shard.params[table].detach(), reference.detach(), rtol=1e-6, atol=1e-7)
    assert shard.version == 3 and shard.stats["staleness"] == {0: 3}


def test_mask_change_zeroes_closed_and_regrown_weights_and_resets_their_adagrad_state():
    model = tiny_model()
    shard, layout = shard_of(model)
    fqn = "model.dense_arch.model._mlp.0._linear"
    weight = shard.params[f"{fqn}.weight"]
    grads = {f"{fqn}.weight": np.ones(tuple(weight.shape), np.float32)}
    shard.push(PushRequest(copy_version=0, mask_version=0, rank=0, batch=0, dense=grads))
    masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
    masks[f"{fqn}.neuron_mask"][[1, 4]] = False
    assert shard.set_masks(masks) == 1
    state = shard.optimizers[0].state[weight]["sum"]
    assert (weight.detach()[[1, 4]] == 0).all() and (state[[1, 4]] == 0).all() and (state[0] > 0).all()
    # A push computed under the old mask (version 0) gives the pruned rows nothing.
    shard.push(PushRequest(copy_version=1, mask_version=0, rank=0, batch=1, dense=grads))
    assert (weight.detach()[[1, 4]] == 0).all() and shard.stats["masked_entries"] == 2 * weight.shape[1]
    # Regrow: the rows re-open at exactly 0 with fresh state, and a push computed while they were closed
    # (mask version 1) leaves them at 0 until the trainer has seen them open.
    masks[f"{fqn}.neuron_mask"][:] = True
    shard.set_masks(masks)
    shard.push(PushRequest(copy_version=2, mask_version=1, rank=0, batch=2, dense=grads))
    assert (weight.detach()[[1, 4]] == 0).all()
    assert (shard.optimizers[0].state[weight]["sum"][[1, 4]] == 0).all()
    shard.push(PushRequest(copy_version=3, mask_version=2, rank=0, batch=3, dense=grads))
    assert (weight.detach()[[1, 4]] != 0).all()
    assert shard.stats["violations"] == 0


def test_layer_mean_regrown_state_starts_reopened_accumulators_at_the_mean_of_the_open_rows():
    """``PSConfig.regrown_state="layer_mean"`` on the server: as ``set_masks_`` does in one process,
    closed rows reset, re-opened rows start at the mean of the rows that stay open."""
    model = tiny_model()
    shard, _ = shard_of(model, regrown_state="layer_mean")
    fqn = "model.dense_arch.model._mlp.0._linear"
    weight = shard.params[f"{fqn}.weight"]
    generator = np.random.default_rng(0)
    masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
    masks[f"{fqn}.neuron_mask"][[1, 4]] = False
    shard.set_masks(masks)
    for batch in range(3):
        grads = {f"{fqn}.weight": generator.normal(size=tuple(weight.shape)).astype(np.float32)}
        shard.push(PushRequest(copy_version=batch, mask_version=1, rank=0, batch=batch, dense=grads))
    sums = shard.optimizers[0].state[weight]["sum"]
    before = sums.clone()
    masks[f"{fqn}.neuron_mask"][:] = True
    masks[f"{fqn}.neuron_mask"][0] = False  # row 0 closes as rows 1, 4 re-open
    shard.set_masks(masks)
    kept = [2, 3, 5]
    assert float(before[kept].mean()) > 0
    torch.testing.assert_close(sums[[1, 4]], before[kept].double().mean().float().expand(2, weight.shape[1]))
    assert (sums[0] == 0).all() and torch.equal(sums[kept], before[kept])
    assert (weight.detach()[[0, 1, 4]] == 0).all()
    with pytest.raises(ValueError, match="--regrown-state"):
        PSConfig(regrown_state="mean")


def test_regrow_value_is_where_reopened_weights_start():
    model = tiny_model()
    shard, _ = shard_of(model, regrow_value=0.25)
    fqn = "model.dense_arch.model._mlp.0._linear"
    masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
    masks[f"{fqn}.neuron_mask"][0] = False
    shard.set_masks(masks)
    masks[f"{fqn}.neuron_mask"][0] = True
    shard.set_masks(masks)
    assert (shard.params[f"{fqn}.weight"].detach()[0] == 0.25).all()
    assert shard.traces[-1]["norms"][0] == pytest.approx(0.25 * 3**0.5)


def test_pull_returns_masks_only_when_newer_and_state_dict_round_trips():
    model = tiny_model()
    shard, layout = shard_of(model)
    assert shard.pull(PullRequest(dense=True, mask_version=0)).masks == {}
    reply = shard.pull(PullRequest(keys=layout.keys("t_cat_1", np.array([3])), dense=True, mask_version=-1))
    table = dict(model.named_parameters())[layout.tables["t_cat_1"].param]
    assert reply.masks and np.array_equal(reply.rows, table.detach()[[3]].numpy())
    state = shard.state_dict()
    other, _ = shard_of(tiny_model())
    other.load_state_dict(state)
    assert (
        other.version == shard.version
        and other.pull(PullRequest(dense=True)).dense.keys() == reply.dense.keys()
    )


def test_collector_windows_equal_look_ahead_window_in_stream_order():
    stream = SyntheticStream(1000, drift=1.0)
    ranges = global_ranges(stream, 500, 32, 2)
    assert ranges[0] == (0, 32) and ranges[1] == (32, 64)
    rng = np.random.default_rng(0)
    scores = [
        BatchScore(
            a, b, rng.normal(size=b - a).astype(np.float32), rng.integers(0, 2, b - a).astype(np.float32)
        )
        for a, b in ranges
    ]
    collector = ScoreCollector(ranges, window=100)
    order = list(range(len(scores)))
    rng.shuffle(order)
    consumed = [s.start for i in order for s in collector.add(scores[i])]
    assert consumed == [a for a, _ in ranges] and collector.complete
    reference = LookAheadWindow(100)
    expected = [
        r for s in scores for r in reference.update(torch.from_numpy(s.logits), torch.from_numpy(s.labels))
    ]
    assert collector.records == expected


def test_async_schedule_cuts_where_grow_prune_schedule_does_and_prunes_beta():
    job = small_job(batch_size=32)
    stream = make_stream(job)
    config = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=3)
    replica = wrap(build_dlrm(model_config_for(stream, job.model)))
    sync = GrowPruneSchedule(
        wrap(build_dlrm(model_config_for(stream, job.model))),
        config,
        [],
        num_rows=stream.num_rows,
        train=job.train,
        world_size=2,
    )
    schedule = AsyncGrowPrune(replica, config, num_rows=stream.num_rows, train=job.train, world=2)
    assert schedule.bounds == sync.bounds and list(schedule.layers) == list(sync.layers)
    assert schedule.advance(0) is None  # entering the first, dense phase changes nothing
    start = schedule.bounds[1][0]
    taylor = {fqn: np.arange(layer.out_features, dtype=np.float32) for fqn, layer in schedule.layers.items()}
    schedule.observe(start - 32, taylor)
    masks = schedule.advance(start)
    for fqn, layer in schedule.layers.items():
        kept = masks[f"{fqn}.neuron_mask"]
        assert kept.sum() == layer.out_features // 2 and kept[-1]  # the most important neurons stay
    assert schedule.advance(schedule.bounds[2][0])[f"{fqn}.neuron_mask"].all()  # regrown
    assert [p.mask_version for p in schedule.phases] == [0, 1, 2]


def test_one_trainer_staleness_one_follows_the_synchronous_update_rule():
    """Same init, same rows, same Adagrad: per-window CE equal up to float rounding (rel. 1e-5).

    The server applies the table rows' Adagrad step with a sparse gradient and the dense tensors' one
    by tensor, while the synchronous path steps all parameters with torch's multi-tensor kernel: the
    same arithmetic in another order, so results agree to rounding, not bit for bit.
    """
    job = small_job()
    stream = make_stream(job)
    torch.manual_seed(job.seed)
    model = wrap(build_dlrm(model_config_for(stream, job.model)))
    sync = IncrementalTrainer(model, job.train).run(stream)
    result = run_async(job, PSConfig(trainers=1, servers=2, staleness=1, cache_rows=256), backend="local")
    assert [r.samples_end for r in result.records] == [r.samples_end for r in sync.records]
    for mine, ref in zip(result.records, sync.records, strict=True):
        assert mine.ce == pytest.approx(ref.ce, rel=1e-5)
    assert result.staleness() == {0: 2 * sync.steps}  # every push (two shards) on the newest copy
    params = dict(model.named_parameters())
    for name, value in result.weights.items():
        torch.testing.assert_close(value, params[name].detach(), rtol=0, atol=2e-3)
    assert max(t["table_bytes"] for t in result.trainers) < 26 * 1000 * 4 * 4  # cache, not the tables


def test_stale_pushes_under_grow_prune_never_update_closed_weights():
    job = small_job(batch_size=32)
    config = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=5)
    result = run_async(
        job, PSConfig(trainers=2, servers=2, staleness=40, cache_rows=256), config, backend="local"
    )
    assert [s["mask_version"] for s in result.servers] == [4, 4]
    assert sum(s["masked_entries"] for s in result.servers) > 0  # stale gradients did arrive
    assert result.violations == 0
    assert all(t["norms"][0] == 0.0 for s in result.servers for t in s["traces"])  # regrown from 0
    model = wrap(build_dlrm(model_config_for(make_stream(job), job.model)))
    assert all(m.all() for n, m in result.masks.items() if n.endswith("neuron_mask"))
    assert result.masks.keys() == mask_buffers(model).keys()


# --------------------------------------------------------------------------------------------------
def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_ray_train_parser(parser.add_subparsers())
    return parser.parse_args(["ray-train", "--rows", "4000", "--increment-rows", "1000", *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--staleness", "0"], "--staleness must be an integer >= 1"),
        (["--trainers", "0"], "--trainers must be an integer >= 1"),
        (["--trainers", "9", "--batch-size", "128"], "--trainers 9 with --batch-size 128"),
        (["--servers", "0"], "--servers must be"),
        (["--optimizer", "sgd", "--momentum", "0.9"], "--momentum must be 0"),
        (["--cache-rows", "8"], "--cache-rows must be >= --batch-size"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag_before_ray_starts(flags, message):
    import ray

    with pytest.raises(ValueError, match=message) as err:
        prepare_ray_train(_args(*flags))
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()


def test_unreachable_ray_address_is_refused_before_ray_starts(monkeypatch):
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="RAY_ADDRESS=.* is unreachable") as err:
        prepare_ray_train(_args())
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()


def test_growth_jump_is_zero_for_zero_init_and_large_for_a_constant():
    from torchrec_prune.distributed.ps.smoothness import growth_jump

    assert growth_jump([0.0, 0.001, 0.003]) == 0.0
    assert growth_jump([4.5, 4.499, 4.497]) == pytest.approx(2250)
    with pytest.raises(ValueError, match="after a push"):
        growth_jump([1.0])


def test_trainer_resumes_its_partition_after_the_batches_it_trained():
    from torchrec_prune.distributed.ps.backends import LocalShards
    from torchrec_prune.distributed.ps.trainer import PSTrainer

    job = small_job(batch_size=64)
    stream = make_stream(job)
    torch.manual_seed(0)
    model = wrap(build_dlrm(model_config_for(stream, job.model)))
    layout = ParamLayout.from_model(model, 1)
    masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
    shard = ShardState(0, layout, layout.split_state(dict(model.named_parameters()), 0), masks, job.train)
    ps = PSConfig(trainers=2, cache_rows=256)
    first = PSTrainer(1, job, ps, layout, LocalShards([shard]))
    done = first.run_steps(5).scores
    resumed = PSTrainer(1, job, ps, layout, LocalShards([shard]))
    resumed.load_state_dict(first.state_dict())
    after = resumed.run_steps(1).scores[0]
    assert [s.start for s in done] == [64, 192, 320, 448, 576] and after.start == 704  # rank 1's next batch
    assert resumed.mask_version == 0  # the masks came back with the first pull


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.0}, "--beta must be in"),
        ({"d2s_r": 1, "d2s_p": 2}, "--d2s-r must be >= --d2s-p"),
        ({"window_steps": 0}, "--window-steps must be"),
        ({"schedule": "bogus"}, "--schedule must be one of"),
    ],
)
def test_ray_train_config_names_the_flag(kwargs, message):
    from torchrec_prune.distributed.ps.job import RayTrainConfig

    with pytest.raises(ValueError, match=message):
        RayTrainConfig(job=small_job(), ps=PSConfig(), **kwargs)


def test_a_push_carries_the_next_batch_pull_and_trains_as_separate_calls_do():
    """Inside a chunk each push asks for the next batch's rows; with one trainer at staleness 1 that
    pull sees the same server state as a pull of its own after the push, so the weights are equal."""
    from torchrec_prune.distributed.ps.backends import LocalShards
    from torchrec_prune.distributed.ps.trainer import PSTrainer

    class Counting(LocalShards):
        calls = 0

        def pull(self, requests):
            self.calls += 1
            return super().pull(requests)

        def push(self, requests):
            self.calls += 1
            return super().push(requests)

    job = small_job(batch_size=64)
    stream = make_stream(job)
    runs = []
    for chunk in (8, 1):
        torch.manual_seed(0)
        model = wrap(build_dlrm(model_config_for(stream, job.model)))
        layout = ParamLayout.from_model(model, 2)
        masks = {n: b.numpy().copy() for n, b in mask_buffers(model).items()}
        params = dict(model.named_parameters())
        shards = [ShardState(s, layout, layout.split_state(params, s), masks, job.train) for s in (0, 1)]
        clients = Counting(shards)
        trainer = PSTrainer(0, job, PSConfig(trainers=1, staleness=1, cache_rows=256), layout, clients)
        scores = [s for _ in range(8 // chunk) for s in trainer.run_steps(chunk).scores]
        runs.append((clients.calls, scores, layout.merge_states([s.weights() for s in shards])))
    (calls, scores, weights), (calls_alone, scores_alone, weights_alone) = runs
    assert (calls, calls_alone) == (1 + 8, 8 + 8)  # one pull call, then every pull rides on a push
    assert all(np.array_equal(a.logits, b.logits) for a, b in zip(scores, scores_alone, strict=True))
    assert all(torch.equal(weights[n], weights_alone[n]) for n in weights)
