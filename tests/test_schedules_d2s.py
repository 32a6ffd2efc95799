"""Dense-to-Sparse on a tiny DLRM (SPEC 6): jobs, serving-model age, adaptive trigger, validation."""

import copy

import pytest
import torch
from torch import nn

import torchrec_prune as tp
from torchrec_prune.data.stream import iter_increments
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.metrics import relative_ce
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import AuxConfig, AuxPruner, overall_sparsity
from torchrec_prune.schedules import D2SConfig, D2SController, DenseJob, PruningJob, ServingJob
from torchrec_prune.train.trainer import TrainConfig, default_forward

CONFIG = DLRMConfig(
    num_dense=3, num_sparse=3, num_embeddings=20, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
TRAIN = TrainConfig(
    batch_size=50, lr=0.05, optimizer="adagrad", window=200, increment_rows=200, progress=False
)
AUX = AuxConfig(lam=1.75, eps=0.3)


def _model() -> nn.Module:
    return tp.wrap(build_dlrm(CONFIG))


def _stream(increments: int = 12) -> SyntheticStream:
    return SyntheticStream(increments * 200, drift=2.0, num_dense=3, num_sparse=3, num_embeddings=20)


def _run(config: D2SConfig, increments: int = 12):
    return D2SController(_model(), _stream(increments), TRAIN, config).run()


def test_fixed_mode_never_serves_a_model_older_than_r_increments():
    result = _run(D2SConfig(r=3, p=2, warmup=2, aux=AUX, lines=("fixed", "fixed_mask")))
    fixed = result.lines["fixed"]
    assert fixed.births == [2, 5, 8, 11]
    assert fixed.sources == [0, 3, 6, 9]  # pruned from the dense snapshot p increments back
    assert [k for k, _ in fixed.history] == list(range(2, 12))
    assert all(0 <= k - birth < 3 for k, birth in fixed.history)
    assert fixed.max_age == 2
    single = result.lines["fixed_mask"]
    assert single.births == [2] and single.max_age == 9
    assert all(0 < s < 1 for s in fixed.sparsity + single.sparsity)


def test_lines_are_scored_on_the_same_samples_as_the_dense_model():
    result = _run(D2SConfig(r=2, p=1, warmup=3, aux=AUX, lines=("fixed", "adaptation")))
    assert result.warmup_rows == 600
    for line in result.lines.values():
        rel = relative_ce(line.records, result.dense)  # raises unless the windows cover the same samples
        warm = [x for x, r in zip(rel, result.dense, strict=True) if r.samples_end <= result.warmup_rows]
        assert warm == [0.0, 0.0, 0.0]  # the dense model served during the warm-up
        assert any(x != 0 for x in rel[3:])
    assert result.dense[-1].samples_end == 12 * 200


def test_adaptive_mode_replaces_the_serving_model_early_when_the_gap_grows():
    never = _run(D2SConfig(r=4, p=1, warmup=1, threshold=1e9, aux=AUX, lines=("fixed", "adaptive")))
    assert never.lines["adaptive"].births == never.lines["fixed"].births == [1, 5, 9]
    eager = _run(D2SConfig(r=4, p=1, warmup=1, threshold=1e-3, aux=AUX, lines=("adaptive",)))
    line = eager.lines["adaptive"]
    gap_at = dict(line.gaps)
    early = [k + 1 for k, gap in line.gaps if gap > 1e-3 and k + 1 < 12]
    assert early and set(early) <= set(line.births)
    for before, birth in zip(line.births, line.births[1:], strict=False):
        assert birth - before == 4 or gap_at[birth - 1] > 1e-3  # on schedule, or early after a large gap
    assert len(line.births) > 3 and line.max_age < 4


def test_the_adaptation_variant_keeps_learning_its_mask_while_serving():
    controller = D2SController(
        _model(), _stream(), TRAIN, D2SConfig(r=2, p=1, aux=AUX, lines=("adaptation",))
    )
    result = controller.run()
    serving = controller.lines["adaptation"].current
    assert serving is not None and len(serving.hooks) == 1
    pruner = serving.hooks[0]
    assert isinstance(pruner, AuxPruner) and not pruner.finalized
    assert pruner.steps == 12 * 4  # pruning job on increment 0, then serving increments 1..11; 4 batches each
    assert overall_sparsity(pruner.stats()) != result.lines["adaptation"].sparsity[0]  # the mask moved


def test_dense_job_keeps_independent_snapshots_of_the_last_p_increments():
    model = _model()
    initial = copy.deepcopy(model.state_dict())
    job = DenseJob(model, TRAIN, keep=2)
    for increment in list(iter_increments(_stream(4), 200, 50)):
        job.train(increment)
    assert sorted(job.snapshots) == [2, 3]
    with pytest.raises(KeyError, match="no dense snapshot of increment 0"):
        job.snapshot(0)
    job2 = DenseJob(_model(), TRAIN, keep=1)
    job2.model.load_state_dict(initial)
    first = next(iter(iter_increments(_stream(4), 200, 50)))
    job2.train(first)
    snap = job2.snapshot(0).replica.model.state_dict()
    assert all(torch.equal(snap[k], v) for k, v in initial.items())
    assert any(not torch.equal(snap[k], v) for k, v in job2.model.state_dict().items())


def test_serving_scores_each_batch_before_training_on_it():
    increments = list(iter_increments(_stream(4), 200, 50))
    dense = DenseJob(_model(), TRAIN, keep=1)
    dense.train(increments[0])
    sparse = PruningJob(dense.factory, TRAIN, AUX, prune_fraction=0.5).run(
        dense.snapshot(0), increments[:1], birth=1
    )
    assert sparse.source == 0 and sparse.birth == 1 and 0 < sparse.sparsity < 1
    frozen = copy.deepcopy(sparse.model)
    line = ServingJob("fixed", TRAIN)
    line.install(sparse)
    scores = line.serve(increments[1])
    first_batch = next(increments[1].batches())
    with torch.no_grad():
        _, expected = default_forward(frozen, first_batch)
    torch.testing.assert_close(scores.logits[0], expected)
    assert not torch.equal(scores.logits[-1], default_forward(frozen, list(increments[1].batches())[-1])[1])
    assert line.history == [(1, 1)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 1, "p": 2}, "r must be >= p"),
        ({"r": 0, "p": 1}, "r must be an integer >= 1"),
        ({"r": 2, "p": 0}, "p must be an integer >= 1"),
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"threshold": -0.1}, "threshold must be > 0"),
        ({"p": 2, "r": 2, "warmup": 1}, "warmup must be an integer >= 2"),
        ({"prune_fraction": 0.0}, "prune_fraction"),
        ({"min_age": 0}, "min_age must be an integer >= 1"),
        ({"r": 3, "p": 1, "min_age": 4}, "min_age must be <= r=3"),
        ({"lines": ("fixed", "sometimes")}, "lines"),
        ({"lines": ()}, "lines"),
    ],
)
def test_bad_d2s_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D2SConfig(**kwargs)


def test_a_stream_too_short_to_serve_fails_before_training():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="warms up for 3"):
        D2SController(model, _stream(3), TRAIN, D2SConfig(r=3, p=1, warmup=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("p", "min_age", "spacing"), [(2, None, 2), (1, 3, 3), (1, 1, 1)])
def test_adaptive_mode_honours_a_minimum_age(p, min_age, spacing):
    # A threshold nearly every serving model exceeds: only the minimum age (default p) keeps the line
    # from re-pruning at every increment; min_age=1 shows what it prevents.
    config = D2SConfig(r=6, p=p, min_age=min_age, warmup=2, threshold=1e-9, aux=AUX, lines=("adaptive",))
    line = _run(config).lines["adaptive"]
    spacings = [b - a for a, b in zip(line.births, line.births[1:], strict=False)]
    assert spacings and min(spacings) == spacing  # early replacements happen, never before min_age
    assert max(spacings) <= 6


def test_a_pruning_job_never_sees_the_increment_its_model_will_serve():
    controller = D2SController(_model(), _stream(10), TRAIN, D2SConfig(r=2, p=2, aux=AUX, lines=("fixed",)))
    seen: list[tuple[int, list[int]]] = []
    run = controller.pruning.run

    def recording(snapshot, increments, birth, **kwargs):
        seen.append((birth, [inc.index for inc in increments]))
        assert snapshot.increment == birth - 2  # the dense state from before the first of them
        return run(snapshot, increments, birth, **kwargs)

    controller.pruning.run = recording
    controller.run()
    assert seen == [(2, [0, 1]), (4, [2, 3]), (6, [4, 5]), (8, [6, 7])]


def test_d2s_flops_are_compared_with_the_dense_job_over_the_same_span():
    from torchrec_prune.schedules.report import d2s_rows

    result = _run(D2SConfig(r=2, p=1, warmup=4, aux=AUX, lines=("fixed",)))
    line = result.lines["fixed"]
    per_sample = result.dense_flops.dense / result.dense_flops.samples  # the dense model is never pruned
    span = 12 * 200 - result.warmup_rows  # the serving line's own models train only after the warm-up
    assert line.serving_flops.samples == span
    expected = (line.serving_flops + line.pruning_flops).effective / (per_sample * span) - 1.0
    (row,) = [r for r in d2s_rows(result) if r.name == "fixed"]
    assert row.flops_vs_dense == pytest.approx(expected, rel=1e-12)
