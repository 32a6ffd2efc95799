"""Alternate grow/prune and its baselines on a tiny DLRM (SPEC 5)."""

import pytest
import torch
from torch import nn

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.masks import MaskedLinear
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import neuron_successors
from torchrec_prune.schedules import (
    DENSE,
    SCHEMES,
    SPARSE,
    GrowPruneConfig,
    GrowPruneSchedule,
    PhasePlan,
    run_grow_prune,
    scheme,
)
from torchrec_prune.train.flops import integrate_phases
from torchrec_prune.train.hooks import BaseHook, StepContext
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, make_optimizer

CONFIG = DLRMConfig(
    num_dense=3, num_sparse=3, num_embeddings=20, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
ROWS = 2_000
TRAIN = TrainConfig(
    batch_size=50, lr=0.05, optimizer="adagrad", window=500, increment_rows=400, progress=False
)


def _model() -> nn.Module:
    return tp.wrap(build_dlrm(CONFIG))


def _stream(rows: int = ROWS) -> SyntheticStream:
    return SyntheticStream(rows, drift=1.0, num_dense=3, num_sparse=3, num_embeddings=20)


def _open(model: nn.Module) -> bool:
    return all(
        bool(m.neuron_mask.all() and m.input_mask.all())
        for m in model.modules()
        if isinstance(m, MaskedLinear)
    )


def test_alternate_prunes_in_sparse_phases_and_ends_dense():
    model = _model()
    result = run_grow_prune(
        model, _stream(), TRAIN, GrowPruneConfig(PhasePlan.every(0.2), beta=0.7, window_steps=3)
    )
    assert [p.kind for p in result.phases] == [DENSE, SPARSE, DENSE, SPARSE, DENSE]
    assert [p.label for p in result.phases] == ["dense0", "sparse1", "dense2", "sparse3", "dense4"]
    assert [(p.start, p.end) for p in result.phases] == [
        (0, 400),
        (400, 800),
        (800, 1200),
        (1200, 1600),
        (1600, 2000),
    ]
    for phase in result.phases:
        assert phase.steps == 8 and phase.seconds > 0
        if phase.kind == SPARSE:
            # 30% of each prunable layer's neurons stay: 16 -> 5, 8 -> 2
            assert set(phase.neurons_kept.values()) == {5, 2}
            assert phase.report.training < result.phases[0].report.training
            assert phase.fc_params < result.phases[0].fc_params
    assert _open(model)  # the schedule ends dense
    assert result.run.samples == ROWS


@pytest.mark.parametrize("name", SCHEMES)
def test_flops_of_the_run_equal_the_integral_over_its_phases(name):
    result = run_grow_prune(
        _model(), _stream(), TRAIN, GrowPruneConfig(scheme(name), beta=0.5, window_steps=2)
    )
    assert (
        result.run.flops
        == result.planned_flops()
        == integrate_phases((p.samples, p.report) for p in result.phases)
    )
    assert set(result.flops_by_phase) == {p.label for p in result.phases}
    for phase in result.phases:
        assert result.flops_by_phase[phase.label] == integrate_phases([(phase.samples, phase.report)])
    assert 0 < result.run.flops.saving < 0.5


def test_importance_is_averaged_over_the_window_just_before_each_sparse_phase():
    model = _model()
    optimizer = make_optimizer(model.parameters(), TRAIN)
    schedule = GrowPruneSchedule(
        model, GrowPruneConfig(PhasePlan.every(0.2), window_steps=3), [optimizer], num_rows=ROWS, train=TRAIN
    )
    observed: list[int] = []  # phase index in progress at each observed batch
    observe = schedule.scorer.observe
    schedule.scorer.observe = lambda layers: (observed.append(len(schedule.phases) - 1), observe(layers))
    IncrementalTrainer(model, TRAIN, optimizers=[optimizer], hooks=[schedule]).run(_stream())
    assert observed == [0, 0, 0, 2, 2, 2]  # the last 3 batches of the dense phases before each sparse one


class _GrowthCheck(BaseHook):
    """Right after the schedule regrows (before the first optimizer step), inspect the re-opened entries."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.successors = neuron_successors(model)
        self.closed: dict[str, torch.Tensor] = {}
        self.checked = 0
        self.reopened: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight view, where) of regrown entries

    def before_step(self, ctx: StepContext) -> None:
        if ctx.phase.startswith(SPARSE):
            self.closed = {f: ~self.modules[f].neuron_mask.clone() for f in self.successors}
            return
        if not self.closed:
            return
        for fqn, closed in self.closed.items():
            layer, consumer = self.modules[fqn], self.modules[self.successors[fqn]]
            assert layer.neuron_mask.all() and consumer.input_mask.all()
            for param, where in ((layer.weight, closed.unsqueeze(1)), (consumer.weight, closed.unsqueeze(0))):
                where = where.expand_as(param)
                assert torch.equal(param.detach()[where], torch.zeros(int(where.sum())))
                for optimizer in ctx.optimizers:
                    for key, value in optimizer.state[param].items():
                        if isinstance(value, torch.Tensor) and value.shape == param.shape:
                            assert torch.equal(value[where], torch.zeros(int(where.sum()))), key
                self.reopened.append((param, where))
        self.checked += 1
        self.closed = {}


@pytest.mark.parametrize("optimizer, momentum", [("adagrad", 0.0), ("sgd", 0.9)])
def test_regrown_weights_and_their_optimizer_state_are_exactly_zero_at_the_first_step(optimizer, momentum):
    model = _model()
    train = TrainConfig(
        batch_size=50,
        lr=0.05,
        optimizer=optimizer,
        momentum=momentum,
        window=500,
        increment_rows=400,
        progress=False,
    )
    opt = make_optimizer(model.parameters(), train)
    schedule = GrowPruneSchedule(
        model,
        GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=2),
        [opt],
        num_rows=ROWS,
        train=train,
    )
    check = _GrowthCheck(model)
    IncrementalTrainer(model, train, optimizers=[opt], hooks=[schedule, check]).run(_stream())
    assert check.checked == 2  # both sparse phases were left
    # ... and the regrown weights then learn: the kept biases restart their signal
    assert any(bool((param.detach()[where] != 0).any()) for param, where in check.reopened)


def test_grow_only_starts_from_a_seeded_random_mask():
    def first_mask(seed: int) -> dict[str, torch.Tensor]:
        model = _model()
        optimizer = make_optimizer(model.parameters(), TRAIN)
        config = GrowPruneConfig(scheme("grow_only"), beta=0.7, seed=seed)
        schedule = GrowPruneSchedule(model, config, [optimizer], num_rows=ROWS, train=TRAIN)
        batch = next(_stream().batches(TRAIN.batch_size))
        schedule.before_batch(StepContext(model=model, optimizers=[optimizer], batch=batch))
        assert [p.kind for p in schedule.phases] == [SPARSE]
        return {f: schedule.layers[f].neuron_mask.clone() for f in schedule.layers}

    a, b, c = first_mask(0), first_mask(0), first_mask(1)
    assert all(torch.equal(a[f], b[f]) for f in a)
    assert any(not torch.equal(a[f], c[f]) for f in a)
    assert {int(m.sum()) for m in a.values()} == {5, 2}


class _PhaseMasks(BaseHook):
    """Per step: the phase label and whether any neuron was closed during that batch's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: list[tuple[str, bool]] = []

    def before_step(self, ctx: StepContext) -> None:
        self.seen.append((ctx.phase, not _open(self.model)))


def test_masks_change_at_the_batch_boundary_where_a_phase_starts():
    model = _model()
    optimizer = make_optimizer(model.parameters(), TRAIN)
    schedule = GrowPruneSchedule(
        model, GrowPruneConfig(PhasePlan.every(0.2), window_steps=2), [optimizer], num_rows=ROWS, train=TRAIN
    )
    probe = _PhaseMasks(model)
    IncrementalTrainer(model, TRAIN, optimizers=[optimizer], hooks=[schedule, probe]).run(_stream())
    assert len(probe.seen) == ROWS // TRAIN.batch_size
    assert all(phase.startswith(SPARSE) == closed for phase, closed in probe.seen)


@pytest.mark.parametrize("beta", [0, 1, 1.5, -0.2, True])
def test_beta_outside_the_open_unit_interval_is_rejected(beta):
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        GrowPruneConfig(PhasePlan.every(0.2), beta=beta)


def test_bad_window_and_plan_are_rejected():
    with pytest.raises(ValueError, match="window_steps"):
        GrowPruneConfig(PhasePlan.every(0.2), window_steps=0)
    with pytest.raises(ValueError, match="PhasePlan"):
        GrowPruneConfig([(DENSE, 0.0, 1.0)])  # type: ignore[arg-type]


def test_a_phase_too_short_for_the_stream_fails_before_training():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = PhasePlan.alternate((0.001, 0.002))
    with pytest.raises(ValueError, match="empty"):
        run_grow_prune(model, _stream(), TRAIN, GrowPruneConfig(plan))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
