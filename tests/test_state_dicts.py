"""Exact resume: every stateful part of a run besides model and optimizer saves and restores its state.

The pattern: run k steps, take the state (through a ``torch.save``/``torch.load`` round trip, as a
checkpoint stores it) with copies of the model and optimizer state, run m more steps (A); build everything
afresh, restore model and optimizer, load the state, run the same m steps (B); A and B must be
bit-identical. ``torch.load`` keeps its default ``weights_only=True``, so states must be plain values and
tensors.
"""

import copy
import io
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, pruner_step, wrapped_mlp
from torch import nn

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.importance import Momentum, NeuronTaylor, Taylor
from torchrec_prune.masks import MaskedLinear
from torchrec_prune.metrics import LookAheadWindow
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import (
    AuxConfig,
    AuxPruner,
    GradualConfig,
    NeuronPruner,
    StructuredConfig,
    magnitude_pruner,
    momentum_pruner,
    taylor_pruner,
)
from torchrec_prune.schedules import GrowPruneConfig, GrowPruneSchedule, PhasePlan
from torchrec_prune.train.flops import FlopsMeter
from torchrec_prune.train.hooks import StepContext
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, make_optimizer

BATCH = 64


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only=True: fails on anything but plain values and tensors


def _assert_same(a, b, path: str = "state") -> None:
    """Bitwise equality of two state trees (tensors by value and dtype, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def _differs(a, b) -> bool:
    try:
        _assert_same(a, b)
    except AssertionError:
        return True
    return False


# ---- pruners on a small MLP ---------------------------------------------------------------------------
def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 8, generator=g)
    return x, (x[:, 0] - 2 * x[:, 1] + x[:, 2] * x[:, 3] > 0).float()


def _train(model: nn.Module, pruner, ctx: StepContext, steps: range) -> None:
    for step in steps:
        pruner_step(model, pruner, ctx, *_batch(step))


# name -> (pruner factory, steps before the cut, steps in all)
PRUNERS = {
    "aux": (lambda m: AuxPruner(m, AuxConfig(lam=1.0, eps=0.3, phase_steps=6)), 3, 8),
    "aux-finalized": (lambda m: AuxPruner(m, AuxConfig(lam=1.0, eps=0.3, phase_steps=2)), 3, 6),
    "aux-adaptation": (lambda m: AuxPruner(m, AuxConfig(lam=1.0, eps=0.3, phase_steps=None)), 3, 6),
    "mp": (lambda m: magnitude_pruner(m, GradualConfig(sparsity=0.6, phase_steps=6, update_every=2)), 3, 8),
    "tp": (lambda m: taylor_pruner(m, GradualConfig(sparsity=0.6, phase_steps=6, update_every=2)), 3, 8),
    "mop-finalized": (lambda m: momentum_pruner(m, GradualConfig(sparsity=0.6, phase_steps=2)), 3, 6),
    "mop-adaptation": (
        lambda m: momentum_pruner(m, GradualConfig(sparsity=0.6, phase_steps=2, reselect_every_samples=128)),
        3,
        8,
    ),
    "neuron": (lambda m: NeuronPruner(m, StructuredConfig(beta=0.5, window_steps=5)), 3, 7),
}


def _fresh(build):
    torch.manual_seed(0)
    model = wrapped_mlp([8, 16, 8, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    return model, optimizer, build(model)


def _capture_flags(model: nn.Module) -> list[bool]:
    return [m.capture_effective_grad for m in model.modules() if isinstance(m, MaskedLinear)]


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_pruner_resumed_from_its_state_ends_bit_identical(name):
    build, cut, total = PRUNERS[name]
    model, optimizer, pruner = _fresh(build)
    ctx = StepContext(model=model, optimizers=[optimizer])
    _train(model, pruner, ctx, range(cut))
    state = pruner.state_dict()
    saved = _roundtrip(state)
    model_state, optimizer_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(model, pruner, ctx, range(cut, total))
    _assert_same(state, saved)  # the state holds copies: training on did not change it

    def resumed(load: bool):
        # The trainer builds its hooks before the checkpoint is loaded into model and optimizer.
        model_b, optimizer_b, pruner_b = _fresh(build)
        model_b.load_state_dict(model_state)
        optimizer_b.load_state_dict(optimizer_state)
        if load:
            pruner_b.load_state_dict(saved)
        ctx_b = StepContext(model=model_b, optimizers=[optimizer_b], step=cut, samples_seen=cut * BATCH)
        _train(model_b, pruner_b, ctx_b, range(cut, total))
        return model_b, optimizer_b, pruner_b

    model_b, optimizer_b, pruner_b = resumed(load=True)
    _assert_same(model.state_dict(), model_b.state_dict())  # weights and masks
    _assert_same(optimizer.state_dict(), optimizer_b.state_dict())
    _assert_same(pruner.state_dict(), pruner_b.state_dict())  # steps, latent scores, scorer sums, ...
    assert _capture_flags(model) == _capture_flags(model_b)
    # The state is what made B match: without it the same model and optimizer end elsewhere.
    model_c, _, pruner_c = resumed(load=False)
    assert _differs((model.state_dict(), pruner.state_dict()), (model_c.state_dict(), pruner_c.state_dict()))


def test_a_pruner_state_of_other_layers_is_refused_naming_the_layer_and_both_shapes():
    state = AuxPruner(wrapped_mlp([8, 16, 8, 1]), AuxConfig()).state_dict()
    with pytest.raises(ValueError, match=r"'0' has shape \(16, 8\) in the state but \(12, 8\) here"):
        AuxPruner(wrapped_mlp([8, 12, 8, 1]), AuxConfig()).load_state_dict(state)
    with pytest.raises(ValueError, match=r"the state lacks \['2', '4'\]"):
        AuxPruner(wrapped_mlp([8, 16, 8, 4, 1]), AuxConfig()).load_state_dict(
            AuxPruner(wrapped_mlp([8, 16, 1]), AuxConfig()).state_dict()
        )
    with pytest.raises(ValueError, match=r"missing keys \['latent'\]"):
        AuxPruner(wrapped_mlp([8, 16, 8, 1]), AuxConfig()).load_state_dict(
            {k: v for k, v in state.items() if k != "latent"}
        )


def test_a_state_of_another_method_is_refused_by_the_scorer():
    config = GradualConfig(sparsity=0.5)
    state = taylor_pruner(wrapped_mlp([8, 16, 8, 1]), config).state_dict()
    with pytest.raises(ValueError, match=r"Momentum state does not fit: missing keys \['ema'\]"):
        momentum_pruner(wrapped_mlp([8, 16, 8, 1]), config).load_state_dict(state)


def test_aux_state_taken_inside_a_step_is_refused():
    model = wrapped_mlp([8, 16, 8, 1])
    pruner = AuxPruner(model, AuxConfig())
    model(_batch(0)[0]).sum().backward()
    pruner.before_step(StepContext(model=model, optimizers=[]))
    with pytest.raises(RuntimeError, match="between before_step and after_step"):
        pruner.state_dict()


@pytest.mark.parametrize("scorer", [Taylor, Momentum, NeuronTaylor])
def test_restored_scorer_sums_are_checked_against_the_layers_they_meet(scorer):
    def observed(model: nn.Module):
        layers = {fqn: m for fqn, m in tp.masked_modules(model) if isinstance(m, MaskedLinear)}
        model(_batch(0)[0]).sum().backward()
        return layers

    source = scorer()
    source.observe(observed(wrapped_mlp([8, 16, 8, 1])))
    target = scorer()
    target.load_state_dict(_roundtrip(source.state_dict()))
    layers = observed(wrapped_mlp([8, 12, 8, 1]))
    with pytest.raises(
        ValueError, match=r"'0' have shape \((16, 8|16,)\) but the layer needs \((12, 8|12,)\)"
    ):
        target.observe(layers)


# ---- the trainer's parts and the hooks on a tiny DLRM -------------------------------------------------
CONFIG = DLRMConfig(
    num_dense=3, num_sparse=3, num_embeddings=20, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
ROWS = 1_000
TRAIN = TrainConfig(batch_size=50, lr=0.05, window=120, increment_rows=200, progress=False)


def _dlrm_batches() -> list:
    return list(SyntheticStream(ROWS, drift=1.0, num_dense=3, num_sparse=3, num_embeddings=20).batches(50))


def _dlrm_trainer(make_hook) -> IncrementalTrainer:
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(CONFIG))
    optimizer = make_optimizer(model.parameters(), TRAIN)
    return IncrementalTrainer(model, TRAIN, optimizers=[optimizer], hooks=[make_hook(model, optimizer)])


def _states(trainer: IncrementalTrainer) -> dict:
    return {
        "window": trainer.window.state_dict(),
        "flops": trainer.flops.state_dict(),
        "hook": trainer.hooks[0].state_dict(),
    }


def _resume(make_hook, cut: int):
    """Trainer A runs every batch; B is built afresh, restored at ``cut`` batches and runs the rest."""
    batches = _dlrm_batches()
    a = _dlrm_trainer(make_hook)
    for batch in batches[:cut]:
        a.step(batch)
    saved = _roundtrip(_states(a))
    model_state = copy.deepcopy(a.model.state_dict())
    optimizer_state = copy.deepcopy(a.optimizers[0].state_dict())
    b = _dlrm_trainer(make_hook)
    b.model.load_state_dict(model_state)
    b.optimizers[0].load_state_dict(optimizer_state)
    b.window.load_state_dict(saved["window"])
    b.flops.load_state_dict(saved["flops"])
    b.hooks[0].load_state_dict(saved["hook"])
    b.ctx.step, b.ctx.samples_seen, b.ctx.position = a.ctx.step, a.ctx.samples_seen, a.ctx.position
    records = []
    for trainer in (a, b):
        closed = [r for batch in batches[cut:] for r in trainer.step(batch)]
        records.append([asdict(r) for r in [*closed, trainer.window.flush()]])
    return a, b, saved, records


def test_grow_prune_window_and_flops_meter_resume_bit_identical():
    def schedule(model, optimizer):
        config = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=3)
        return GrowPruneSchedule(model, config, [optimizer], num_rows=ROWS, train=TRAIN)

    # Cut after 10 batches (500 rows): inside dense2, one batch into sparse3's importance window, and
    # 20 samples into an open look-ahead window.
    a, b, saved, (records_a, records_b) = _resume(schedule, cut=10)
    assert saved["window"]["filled"] == 20 and saved["hook"]["scorer"]["batches"] == 1
    assert [p["label"] for p in saved["hook"]["phases"]] == ["dense0", "sparse1", "dense2"]
    assert len(records_a) == 5
    _assert_same(records_a, records_b)
    _assert_same(asdict(a.window.totals()), asdict(b.window.totals()))
    _assert_same(a.model.state_dict(), b.model.state_dict())
    _assert_same(a.flops.state_dict(), b.flops.state_dict())
    assert a.flops.phase_totals() == b.flops.phase_totals()
    # Phases entered before the cut come back with their timings; wall times measured after it differ.
    phases_a, phases_b = a.hooks[0].phases, b.hooks[0].phases
    assert [p.label for p in phases_b] == ["dense0", "sparse1", "dense2", "sparse3", "dense4"]
    assert asdict(phases_b[0]) == saved["hook"]["phases"][0]
    for pa, pb in zip(phases_a, phases_b, strict=True):
        assert (pa.label, pa.start, pa.end, pa.report, pa.steps, pa.neurons_kept) == (
            pb.label,
            pb.start,
            pb.end,
            pb.report,
            pb.steps,
            pb.neurons_kept,
        )


@pytest.mark.parametrize("cut", [3, 7], ids=["in-phase", "finalized"])
def test_embedding_column_pruning_resumes_bit_identical(cut):
    def pruner(model, optimizer):
        return taylor_pruner(
            model, GradualConfig(sparsity=0.5, phase_steps=6, update_every=2, embedding_sparsity=0.5)
        )

    a, b, saved, (records_a, records_b) = _resume(pruner, cut)
    assert saved["hook"]["column_scorer"]["batches"] == min(cut, 6)
    _assert_same(records_a, records_b)
    _assert_same(a.model.state_dict(), b.model.state_dict())  # weights, element and dimension masks
    _assert_same(a.hooks[0].state_dict(), b.hooks[0].state_dict())
    ebc = b.model.model.sparse_arch.embedding_bag_collection
    assert b.hooks[0].finalized and not ebc._forward_hooks  # a restored finalized pruner holds no hooks


def test_grow_prune_state_of_another_plan_or_model_is_refused():
    def schedule(plan: PhasePlan, config: DLRMConfig = CONFIG) -> GrowPruneSchedule:
        model = tp.wrap(build_dlrm(config))
        return GrowPruneSchedule(model, GrowPruneConfig(plan), [], num_rows=ROWS, train=TRAIN)

    state = schedule(PhasePlan.every(0.2)).state_dict()
    with pytest.raises(ValueError, match="phase bounds"):
        schedule(PhasePlan.alternate((0.3, 0.6))).load_state_dict(state)
    other = DLRMConfig(
        num_dense=3,
        num_sparse=3,
        num_embeddings=20,
        embedding_dim=4,
        dense_arch=[12, 8, 4],
        over_arch=[16, 8, 1],
    )
    with pytest.raises(ValueError, match=r"'model.dense_arch.model._mlp.0._linear' has shape \(16, 3\)"):
        schedule(PhasePlan.every(0.2), other).load_state_dict(state)


def test_flops_meter_resumes_its_segments():
    model = wrapped_mlp([8, 16, 8, 1])

    def close_neurons(n: int) -> None:
        with torch.no_grad():
            model[0].neuron_mask.copy_(torch.arange(16) >= n)
            model[2].input_mask.copy_(torch.arange(16) >= n)

    def tail(meter: FlopsMeter) -> FlopsMeter:
        meter.add(model, 64, phase="sparse")  # same masks and phase: extends the last segment
        close_neurons(0)
        meter.add(model, 32, phase="dense")
        return meter

    meter = FlopsMeter()
    meter.add(model, 64, phase="dense")
    close_neurons(5)
    meter.add(model, 64, phase="sparse")
    saved = _roundtrip(meter.state_dict())
    a = tail(meter)
    close_neurons(5)  # back to the masks at the cut
    restored = FlopsMeter()
    restored.load_state_dict(saved)
    b = tail(restored)
    assert a.segments == b.segments and [s.samples for s in b.segments] == [64, 128, 32]
    assert a.totals == b.totals and a.phase_totals() == b.phase_totals()
    with pytest.raises(ValueError, match="'segments' only"):
        FlopsMeter().load_state_dict({"segments": [], "cache": None})


# ---- look-ahead window ----------------------------------------------------------------------------------
SIZES = [10, 33, 1, 0, 80, 24, 60, 12]  # global batch per step
WINDOW = 32
CUT = 3  # steps before the checkpoint: 44 samples, 12 of them in the open window


def _scores(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(n, generator=g)
    return logits, (torch.rand(n, generator=g) < torch.sigmoid(logits)).float()


def _feed(window: LookAheadWindow, steps: range, part=lambda size: (0, size)) -> list[dict]:
    """Feed global steps ``steps`` of the stream; ``part`` picks this rank's slice of a global batch."""
    logits, labels = _scores(sum(SIZES))
    records = []
    for i in steps:
        start = sum(SIZES[:i])
        lo, hi = part(SIZES[i])
        records += window.update(logits[start + lo : start + hi], labels[start + lo : start + hi])
    return [asdict(r) for r in records]


def _finish(window: LookAheadWindow, part=lambda size: (0, size)) -> dict:
    records = _feed(window, range(CUT, len(SIZES)), part)
    return {"records": [*records, asdict(window.flush())], "totals": asdict(window.totals())}


def test_window_resumed_with_an_open_window_closes_the_same_windows():
    window = LookAheadWindow(WINDOW)
    _feed(window, range(CUT))
    state = window.state_dict()
    saved = _roundtrip(state)
    assert saved["filled"] == 12 and saved["index"] == 1 and saved["scores"].numel() == 12
    a = _finish(window)
    _assert_same(state, saved)  # no alias of the live window
    restored = LookAheadWindow(WINDOW)
    restored.load_state_dict(saved)
    b = _finish(restored)
    assert len(a["records"]) == 6
    _assert_same(a, b)
    with pytest.raises(ValueError, match="window_size 32, this window has 64"):
        LookAheadWindow(64).load_state_dict(saved)


def _rank_part(rank: int):
    return lambda size: [(0, size // 3), (size // 3, size)][rank]


def _window_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        window = LookAheadWindow(WINDOW)
        _feed(window, range(CUT), _rank_part(rank))
        buf = io.BytesIO()
        torch.save(window.state_dict(), buf)
        (Path(out_dir) / f"state{rank}.pt").write_bytes(buf.getvalue())
        a = _finish(window, _rank_part(rank))
        restored = LookAheadWindow(WINDOW)
        restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        b = _finish(restored, _rank_part(rank))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"a": a, "b": b}, f)
    finally:
        dist.destroy_process_group()


def test_two_rank_windows_resume_each_from_their_own_state_and_not_on_one_rank(tmp_path):
    mp.spawn(_window_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = LookAheadWindow(WINDOW)
    _feed(single, range(CUT))
    expected = _finish(single)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        _assert_same(got["a"], got["b"])  # JSON keeps every bit of a float
        assert [r["samples_end"] for r in got["b"]["records"]] == [
            r["samples_end"] for r in expected["records"]
        ]
        for mine, ref in zip(got["b"]["records"], expected["records"], strict=True):
            assert mine["ce"] == pytest.approx(ref["ce"], rel=1e-6) and mine["auc"] == pytest.approx(
                ref["auc"]
            )
        state = torch.load(tmp_path / f"state{rank}.pt")
        assert state["filled"] == 12 and sum(state["rank_counts"]) == 12
        assert state["scores"].numel() == state["rank_counts"][rank]  # this rank's part only
    with pytest.raises(ValueError, match="partial sums are per rank"):
        LookAheadWindow(WINDOW).load_state_dict(state)
    # At a window boundary nothing is per rank: the state of a 2-rank run resumes on one rank.
    boundary = {
        **state,
        "filled": 0,
        "rank_counts": [0, 0],
        "scores": torch.empty(0),
        "labels": torch.empty(0),
    }
    window = LookAheadWindow(WINDOW)
    window.load_state_dict(boundary)
    assert window.samples_seen == state["samples"]
