"""The incremental trainer: look-ahead scoring, hooks, drift behaviour, and 2 torchrun ranks vs 1 process."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_torchrun
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

import torchrec_prune as tp
from torchrec_prune.data import SyntheticStream, iter_increments
from torchrec_prune.distributed.dmp import one_process_group, shard
from torchrec_prune.metrics.functional import bce_sum
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.train.hooks import BaseHook, StepContext
from torchrec_prune.train.job import (
    JobConfig,
    PreparedJob,
    build_replica,
    make_stream,
    run_job,
    sharding_config,
)
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, default_forward

TINY = DLRMConfig(num_embeddings=500, dense_arch=[32, 16, 4], over_arch=[32, 1])


def _trainer(**kwargs) -> IncrementalTrainer:
    torch.manual_seed(0)
    config = TrainConfig(
        **{"batch_size": 64, "window": 1000, "increment_rows": 1000, "progress": False, **kwargs}
    )
    return IncrementalTrainer(tp.wrap(build_dlrm(TINY)), config)


def test_every_batch_is_scored_before_the_model_learns_it():
    stream = SyntheticStream(2000, drift=0.0, seed=1, num_embeddings=500)
    trainer = _trainer()
    expected_sum, n = 0.0, 0
    for batch in stream.batches(64):
        with torch.no_grad():
            _, (_, logits, _) = trainer.model(batch)  # the model as it is before this batch's step
        expected_sum += float(bce_sum(logits.reshape(-1), batch.labels))
        n += batch.labels.numel()
        trainer.step(batch)
    trainer.window.flush()
    records = trainer.result.records + ([] if trainer.result.records[-1].samples_end == n else [])
    got = sum(r.ce * r.n for r in records)
    assert sum(r.n for r in records) == n
    assert got == pytest.approx(expected_sum, rel=1e-6)


class Recorder(BaseHook):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def before_step(self, ctx: StepContext) -> None:
        assert ctx.batch is not None and ctx.loss is not None
        grads = [p.grad for p in ctx.model.parameters() if p.grad is not None]
        assert grads, "before_step must see this batch's gradients"
        self.events.append(("before", ctx.step))

    def after_step(self, ctx: StepContext) -> None:
        self.events.append(("after", ctx.step))

    def on_increment_end(self, ctx: StepContext) -> None:
        self.events.append(("increment", ctx.increment))


def test_hooks_fire_in_order_with_gradients_and_increment_boundaries():
    stream = SyntheticStream(640, seed=0, num_embeddings=500)
    recorder = Recorder()
    trainer = _trainer(increment_rows=320, window=320)
    trainer.hooks.append(recorder)
    result = trainer.run(stream)
    assert result.samples == 640 and result.steps == 10
    assert recorder.events[:2] == [("before", 0), ("after", 0)]
    assert ("increment", 0) in recorder.events and recorder.events[-1] == ("increment", 1)
    assert recorder.events.index(("increment", 0)) == 10  # after the 5 steps of the first increment
    assert [r.samples_end for r in result.records] == [320, 640]


def _frozen_vs_incremental(drift: float) -> tuple[list[float], list[float]]:
    stream = SyntheticStream(16_000, drift=drift, seed=0, num_embeddings=500)
    runs = []
    for freeze_after in (None, 2):
        trainer = _trainer(window=2000, increment_rows=2000)
        for increment in iter_increments(stream, 2000, 64):
            if freeze_after is not None and increment.index >= freeze_after:
                trainer.score_increment(increment)
            else:
                trainer.train_increment(increment)
        runs.append([r.ce for r in trainer.result.records])
    return runs[0], runs[1]


def test_frozen_model_gets_steadily_worse_under_drift_but_not_without():
    incremental, frozen = _frozen_vs_incremental(drift=0.5)
    gap = [f - i for f, i in zip(frozen, incremental, strict=True)]
    # Under drift the frozen model's CE rises window after window and the gap to the incremental model
    # keeps growing; measured here: frozen CE 0.47 -> 0.62, gap 0.007 -> 0.18 over windows 2..7.
    assert frozen[-1] - frozen[2] > 0.08
    assert sum(gap[-2:]) / 2 > 3 * sum(gap[2:4]) / 2 > 0
    assert gap[-1] > 0.1

    incremental0, frozen0 = _frozen_vs_incremental(drift=0.0)
    gap0 = [f - i for f, i in zip(frozen0, incremental0, strict=True)]
    # Stationary: the frozen model stays where it was (it only misses further learning).
    assert abs(sum(frozen0[-2:]) / 2 - frozen0[2]) < 0.05
    assert gap0[-1] < 0.5 * gap[-1]


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size must be an integer >= 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"TrainConfig.optimizer must be one of \('sgd', 'adagrad'\)"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match=r"TrainConfig.momentum must be in \[0, 1\)"):
        TrainConfig(momentum=1.5)


def test_two_torchrun_ranks_match_one_process_and_agree_on_masks(tmp_path: Path):
    rows, window = 6000, 1500
    run_torchrun(
        REPO / "tests" / "dist_workers" / "trainer_worker.py",
        [str(tmp_path / "dist"), str(rows), "64", str(window)],
    )
    ranks = json.loads((tmp_path / "dist" / "ranks.json").read_text())
    assert ranks["overlap"] == 0
    assert ranks["rows_per_rank"] == [rows // 2, rows // 2]
    assert ranks["distinct"] == rows
    # Pruners under DMP (AUX on the top MLP, Taylor on the bottom MLP and embedding dims): every rank
    # reached the same masks from different rows, and pruned sharded columns are exact zeros.
    assert ranks["masks_identical"]
    assert ranks["pruned_columns_zero"]
    sparsity = ranks["mask_sparsity"]
    assert any(v > 0 for k, v in sparsity.items() if "over_arch" in k)
    assert all(
        v == pytest.approx(0.5, abs=0.02) for k, v in sparsity.items() if "dense_arch" in k and "mlp.0" in k
    )
    assert all(v == pytest.approx(0.25) for k, v in sparsity.items() if k.startswith("dim_masks."))

    single = run_job(
        JobConfig(
            data="synthetic",
            rows=rows,
            drift=0.5,
            model=TINY,
            train=TrainConfig(batch_size=128, window=window, increment_rows=window, progress=False),
            run_dir=str(tmp_path / "single"),
            checkpoint=False,
        )
    )
    ce_single = [r.ce for r in single.records]
    ce_dist = ranks["ce"]
    assert len(ce_single) == len(ce_dist) == rows // window
    # Same global batches (2 x 64 vs 128) and definitions; initial weights and the embedding-gradient
    # reduction order differ. Tolerance: 5% relative per window after the first, 10% on the first.
    assert ce_dist[0] == pytest.approx(ce_single[0], rel=0.10)
    for a, b in zip(ce_dist[1:], ce_single[1:], strict=True):
        assert a == pytest.approx(b, rel=0.05)


def test_momentum_reaches_the_dense_optimizer_of_the_jobs_replicas():
    """``--momentum`` moves the dense layers of a job (the fused exact SGD of the tables has none), in one
    process and in a DMP replica alike."""
    train = TrainConfig(batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9, progress=False)
    job = JobConfig(rows=640, model=TINY, train=train, checkpoint=False)
    with one_process_group():
        fused = build_replica(PreparedJob(job, make_stream(job), {}, None), "cpu")
        sharded = shard(tp.wrap(build_dlrm(TINY, device="meta")), torch.device("cpu"), sharding_config(train))
        for optimizer in (*fused.optimizers, sharded.optimizer):
            assert {group["momentum"] for group in optimizer.param_groups} == {0.9}


def test_one_process_jobs_train_tables_like_elementwise_adagrad():
    """The job's one-process replica (tables in a ``FusedEmbeddingBagCollection`` with fused exact
    Adagrad, no DMP) follows ``torch.optim.Adagrad`` over every parameter, up to summation order (eps
    matched: fbgemm's is 1e-8)."""
    torch.manual_seed(0)
    plain = tp.wrap(build_dlrm(TINY))
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    optimizer = torch.optim.Adagrad(plain.parameters(), lr=0.05, eps=1e-8)
    job = JobConfig(rows=640, model=TINY, train=TrainConfig(batch_size=64, progress=False), checkpoint=False)
    with one_process_group():
        replica = build_replica(PreparedJob(job, make_stream(job), {}, None), "cpu")
        assert isinstance(
            replica.model.model.sparse_arch.embedding_bag_collection.ebc, FusedEmbeddingBagCollection
        )
        with torch.no_grad():
            for name, value in replica.model.state_dict().items():
                value.copy_(initial[name])
        (dense,) = replica.optimizers
        for group in dense.param_groups:
            group["eps"] = 1e-8
        for batch in make_stream(job).batches(64):
            for model, opt in ((plain, optimizer), (replica.model, dense)):
                opt.zero_grad()
                default_forward(model, batch)[0].backward()
                opt.step()
        trained = replica.model.state_dict()
    table = "model.sparse_arch.embedding_bag_collection.ebc.embedding_bags.t_cat_0.weight"
    assert not torch.equal(trained[table], initial[table])
    for name, expected in plain.state_dict().items():
        torch.testing.assert_close(trained[name], expected, rtol=1e-3, atol=1e-4)
