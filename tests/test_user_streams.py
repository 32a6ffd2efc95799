"""Issue 12: your own multi-hot batches as a stream, a custom forward, pruners started late, grow/prune."""

from __future__ import annotations

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.test_your_model import KEYS, MODELS, forward_fn, make_batch, wrap_quietly
from torchrec_prune.data.stream import BatchStream, gather_rows, iter_increments
from torchrec_prune.pruners.gradual import GradualConfig, magnitude_pruner
from torchrec_prune.schedules.grow_prune import GrowPruneConfig, run_grow_prune
from torchrec_prune.schedules.phases import PhasePlan
from torchrec_prune.train.delayed import Delayed
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig


def rows_of(
    batches: list[Batch],
) -> list[tuple[list[float], list[list[int]], list[list[float] | None], float]]:
    """Every row as (dense, ids per feature, weights per feature, label), to compare re-cut streams."""
    out = []
    for batch in batches:
        per_key = batch.sparse_features.to_dict()
        for i in range(batch.labels.numel()):
            ids, weights = [], []
            for key in KEYS:
                jt = per_key[key]
                a, b = int(jt.offsets()[i]), int(jt.offsets()[i + 1])
                ids.append(jt.values()[a:b].tolist())
                w = jt.weights_or_none()
                weights.append(None if w is None else w[a:b].tolist())
            out.append((batch.dense_features[i].tolist(), ids, weights, float(batch.labels[i])))
    return out


def weighted(batch: Batch) -> Batch:
    kjt = batch.sparse_features
    values = kjt.values()
    return Batch(
        batch.dense_features,
        KeyedJaggedTensor(kjt.keys(), values, weights=values.float() / 10, lengths=kjt.lengths()),
        batch.labels,
    )


def test_batch_stream_recuts_and_partitions_weighted_multi_hot_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    source = [weighted(make_batch(generator, size)) for size in (5, 11, 3, 9)]  # 28 rows, uneven batches
    stream = BatchStream(source)
    assert (stream.num_rows, stream.feature_names, stream.num_dense) == (28, KEYS, 5)
    one = list(stream.batches(4))
    assert rows_of(one) == rows_of(source) and {b.labels.numel() for b in one} == {4}
    ranks = [list(stream.batches(4, rank=r, world_size=2, start_row=8)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 20 rows: two global batches of 8 and 4 split 2 + 2
    expected = rows_of(source)[8:]
    assert rows_of(ranks[0]) == expected[0:4] + expected[8:12] + expected[16:18]
    assert rows_of(ranks[1]) == expected[4:8] + expected[12:16] + expected[18:20]
    assert rows_of([gather_rows([(source[0], 3, 5), (source[1], 0, 2)])]) == rows_of(source)[3:7]


def test_one_shot_iterable_needs_num_rows_and_reads_forward() -> None:
    generator = torch.Generator().manual_seed(0)
    source = [make_batch(generator, 6) for _ in range(3)]
    with pytest.raises(ValueError, match="needs num_rows"):
        BatchStream(iter(source))
    stream = BatchStream(iter(source), num_rows=18)
    assert rows_of(list(stream.batches(6, start_row=6))) == rows_of(source[1:])
    with pytest.raises(ValueError, match="reads forward only"):
        list(stream.batches(6))
    again = BatchStream(lambda: iter(source))  # a callable reads again
    assert rows_of(list(again.batches(9))) == rows_of(list(again.batches(9))) == rows_of(source)


def test_delayed_pruner_starts_its_phase_at_the_sample_offset() -> None:
    generator = torch.Generator().manual_seed(0)
    stream = BatchStream([make_batch(generator, 8) for _ in range(8)])
    model = wrap_quietly(MODELS["embedding_collection"]())
    pruner = magnitude_pruner(model, GradualConfig(sparsity=0.5, phase_steps=2))
    delayed = Delayed(pruner, start_sample=40)
    train = TrainConfig(batch_size=8, increment_rows=16, window=16, progress=False)
    trainer = IncrementalTrainer(model, train, hooks=[delayed], forward_fn=forward_fn)
    sparsity = []
    for increment in iter_increments(stream, 16, 8):
        trainer.train_increment(increment)
        sparsity.append(max(s.sparsity for s in delayed.stats().values()))
    assert sparsity[:2] == [0.0, 0.0] and sparsity[-1] == pytest.approx(0.5, abs=0.05)
    assert delayed.state_dict()["started"] and delayed.state_dict()["hook"] == pruner.state_dict()


@pytest.mark.parametrize("name", ["embedding_collection", "deepfm"])
def test_grow_prune_on_a_user_stream_with_a_custom_forward(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    stream = BatchStream([make_batch(generator, 10) for _ in range(20)])  # 200 rows
    model = wrap_quietly(MODELS[name]())
    train = TrainConfig(batch_size=8, increment_rows=40, window=40, progress=False)
    plan = PhasePlan.every(0.2)
    result = run_grow_prune(
        model, stream, train, GrowPruneConfig(plan, beta=0.5, window_steps=2), forward_fn=forward_fn
    )
    assert [p.label for p in result.phases] == [f"{p.kind}{i}" for i, p in enumerate(plan.phases)]
    assert all(p.steps > 0 for p in result.phases) and result.run.steps == 25
    sparse = [p for p in result.phases if p.kind == "sparse"]
    assert sparse and all(p.neurons_kept for p in sparse)


@pytest.mark.parametrize("name", ["embedding_collection", "deepfm"])
def test_d2s_on_a_user_stream_with_a_custom_forward(name: str) -> None:
    from torchrec_prune.pruners.aux import AuxConfig
    from torchrec_prune.schedules.d2s import D2SConfig, D2SController

    generator = torch.Generator().manual_seed(0)
    stream = BatchStream([make_batch(generator, 10) for _ in range(24)])  # 240 rows, 6 increments
    model = wrap_quietly(MODELS[name]())
    train = TrainConfig(batch_size=8, increment_rows=40, window=40, progress=False)
    config = D2SConfig(r=2, p=1, aux=AuxConfig(lam=1.5, eps=1.0), lines=("fixed", "fixed_mask"))
    result = D2SController(model, stream, train, config, forward_fn=forward_fn).run()
    fixed = result.lines["fixed"]
    assert fixed.births == [1, 3, 5] and fixed.max_age <= 1
    assert all(s > 0 for s in fixed.sparsity)  # AUX pruned the user's MLP through the custom forward
    for records in (result.dense, fixed.records, result.lines["fixed_mask"].records):
        assert [r.samples_end for r in records] == list(range(40, 241, 40))
