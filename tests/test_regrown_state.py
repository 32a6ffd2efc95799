"""Optimizer state of regrown entries: SPEC 3's reset by default, the layer's mean on request."""

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchrec.datasets.random import RandomRecDataset

import torchrec_prune as tp
from torchrec_prune.cli import main
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.masks import MaskedEmbeddingBagCollection, MaskedLinear
from torchrec_prune.masks.surgery import set_masks_
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import grow_neurons
from torchrec_prune.schedules import GrowPruneConfig, GrowPruneSchedule, PhasePlan
from torchrec_prune.train.hooks import BaseHook, StepContext
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig, make_optimizer

INIT = 0.1  # Adagrad's initial_accumulator_value: distinct from 0 and from any trained mean


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return tp.wrap(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _rows(*rows: int, n: int = 8) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(rows)] = True
    return mask


def _layer_mean(value: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ``kept`` entries, in float64 (independent of the library's reduction)."""
    return value.double()[kept.expand_as(value)].mean().to(value.dtype)


def _pruned(make: Callable[..., torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Train, close rows 6, 7 of the first layer, train again; returns that layer and the optimizer."""
    model = _mlp()
    layer = model[0]
    optimizer = make(model.parameters())
    _train(model, optimizer)
    tp.prune_(layer, [optimizer], neuron_mask=~_rows(6, 7))
    _train(model, optimizer)
    return layer, optimizer


def _swapped(make: Callable[..., torch.optim.Optimizer], regrown_state: str, keep_now: torch.Tensor):
    """Close rows 6, 7 and train, then set ``keep_now`` (re-opening 6, 7) in one mask change; returns the
    layer, its optimizer and the state just before that change."""
    layer, optimizer = _pruned(make)
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in (layer.weight, layer.bias)}
    set_masks_(layer, [optimizer], regrown_state=regrown_state, neuron_mask=keep_now)
    return layer, optimizer, before


def _adagrad(params) -> torch.optim.Adagrad:
    return torch.optim.Adagrad(params, lr=0.1, initial_accumulator_value=INIT)


def test_regrowth_resets_accumulators_to_their_initial_value_by_default():
    layer, optimizer = _pruned(_adagrad)
    tp.grow_(layer, [optimizer], neuron_mask=torch.ones(8, dtype=torch.bool))
    assert torch.all(optimizer.state[layer.weight]["sum"][6:] == INIT)
    assert torch.all(optimizer.state[layer.bias]["sum"][6:] == INIT)
    assert torch.all(layer.weight.detach()[6:] == 0)
    assert GrowPruneConfig(PhasePlan.every(0.2)).regrown_state == "reset"


def test_layer_mean_starts_regrown_sums_at_the_mean_of_the_entries_that_stay_open():
    keep_now = ~_rows(0, 1)  # rows 0, 1 close, 6, 7 re-open, 2-5 stay open
    layer, optimizer, before = _swapped(_adagrad, "layer_mean", keep_now)
    kept = _rows(2, 3, 4, 5)
    for param, rows in ((layer.weight, kept.unsqueeze(1)), (layer.bias, kept)):
        sums, old = optimizer.state[param]["sum"], before[param]["sum"]
        mean = _layer_mean(old, rows)
        assert mean > INIT  # trained: the rule is not the reset in disguise
        torch.testing.assert_close(sums[6:], mean.expand_as(sums[6:]), rtol=1e-6, atol=0)
        assert torch.all(sums[:2] == INIT)  # closed entries still reset
        assert torch.equal(sums[2:6], old[2:6])  # entries that stay open keep their state
    assert torch.all(layer.weight.detach()[6:] == 0) and torch.all(layer.weight.detach()[:2] == 0)


def test_layer_mean_falls_back_to_the_initial_value_when_nothing_stays_open():
    layer, optimizer, _ = _swapped(_adagrad, "layer_mean", _rows(6, 7))  # 6, 7 re-open, all else closes
    for param in (layer.weight, layer.bias):
        assert torch.all(optimizer.state[param]["sum"] == INIT)


def test_layer_mean_for_adam_sets_second_moments_to_the_mean_and_first_moments_to_zero():
    def adam(params) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=0.01, amsgrad=True)

    layer, optimizer, before = _swapped(adam, "layer_mean", ~_rows(0, 1))
    kept = _rows(2, 3, 4, 5).unsqueeze(1)
    state, old = optimizer.state[layer.weight], before[layer.weight]
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        mean = _layer_mean(old[key], kept)
        assert mean > 0
        torch.testing.assert_close(state[key][6:], mean.expand_as(state[key][6:]), rtol=1e-6, atol=0)
        assert torch.all(state[key][:2] == 0)
    assert torch.all(state["exp_avg"][6:] == 0) and torch.all(state["exp_avg"][:2] == 0)
    assert torch.equal(state["step"], old["step"])  # shared scalar, left alone


@pytest.mark.parametrize(
    ("make", "zeroed", "accumulators"),
    [
        (
            lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.9),
            ["grad_avg", "momentum_buffer"],
            ["square_avg"],
        ),
        (lambda p: torch.optim.Adamax(p, lr=0.01), ["exp_avg"], ["exp_inf"]),
    ],
    ids=["rmsprop-centered", "adamax"],
)
def test_every_per_element_state_of_rmsprop_and_adamax_is_reset_or_started_at_the_mean(
    make, zeroed, accumulators
):
    """Closing resets every per-element state (centered RMSprop's gradient average and Adamax's infinity
    norm included); layer_mean starts the accumulators of re-opened entries at the layer's mean."""
    model = _mlp()
    optimizer = make(model.parameters())
    _train(model, optimizer)
    state = optimizer.state[model[0].weight]
    assert all(bool(state[key][6:].ne(0).all()) for key in zeroed + accumulators)
    tp.prune_(model[0], [optimizer], neuron_mask=~_rows(6, 7))
    for key in zeroed + accumulators:
        assert torch.all(state[key][6:] == 0), key
    layer, optimizer, before = _swapped(make, "layer_mean", ~_rows(0, 1))
    state, old = optimizer.state[layer.weight], before[layer.weight]
    for key in zeroed:
        assert torch.all(state[key][:2] == 0) and torch.all(state[key][6:] == 0), key
    for key in accumulators:
        mean = _layer_mean(old[key], _rows(2, 3, 4, 5).unsqueeze(1))
        assert mean > 0, key
        torch.testing.assert_close(state[key][6:], mean.expand_as(state[key][6:]), rtol=1e-6, atol=0)
        assert torch.all(state[key][:2] == 0), key


def test_layer_mean_on_an_embedding_table_uses_its_open_columns():
    model = tp.wrap(build_dlrm(DLRMConfig(num_embeddings=50, dense_arch=[16, 8, 4], over_arch=[16, 1])))
    optimizer = _adagrad(model.parameters())
    batch = next(
        iter(
            RandomRecDataset(
                keys=[f"cat_{i}" for i in range(26)],
                batch_size=16,
                hash_size=50,
                ids_per_feature=2,
                num_dense=13,
            )
        )
    )
    ebc = next(m for _, m in tp.masked_modules(model) if isinstance(m, MaskedEmbeddingBagCollection))
    table = ebc.ebc.embedding_bags["t_cat_0"].weight
    for _ in range(3):
        optimizer.zero_grad()
        model(batch)[0].backward()
        optimizer.step()
    tp.prune_(ebc, [optimizer], dim_masks={"t_cat_0": torch.tensor([True, False, True, True])})
    old = optimizer.state[table]["sum"].clone()
    tp.grow_(
        ebc, [optimizer], regrown_state="layer_mean", dim_masks={"t_cat_0": torch.ones(4, dtype=torch.bool)}
    )
    mean = _layer_mean(old, torch.tensor([True, False, True, True]).unsqueeze(0))
    torch.testing.assert_close(optimizer.state[table]["sum"][:, 1], mean.expand(50), rtol=1e-6, atol=0)
    assert torch.all(table.detach()[:, 1] == 0)


def test_an_unknown_rule_is_refused_before_any_mask_changes():
    model = _mlp()
    layer = model[0]
    optimizer = _adagrad(model.parameters())
    tp.prune_(layer, [optimizer], neuron_mask=~_rows(6, 7))
    with pytest.raises(ValueError, match=r"^regrown_state must be one of 'reset', 'layer_mean', got 'mean'$"):
        tp.grow_(layer, [optimizer], regrown_state="mean", neuron_mask=torch.ones(8, dtype=torch.bool))
    assert torch.equal(layer.neuron_mask, ~_rows(6, 7))
    with pytest.raises(ValueError, match="grow_neurons: regrown_state must be one of"):
        grow_neurons(model, [optimizer], regrown_state="mean")
    assert torch.equal(layer.neuron_mask, ~_rows(6, 7))
    with pytest.raises(ValueError, match="GrowPruneConfig.regrown_state must be one of"):
        GrowPruneConfig(PhasePlan.every(0.2), regrown_state="mean")


CONFIG = DLRMConfig(
    num_dense=3, num_sparse=3, num_embeddings=20, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
TRAIN = TrainConfig(
    batch_size=50, lr=0.05, optimizer="adagrad", window=200, increment_rows=200, progress=False
)
ROWS = 1_000


class _RegrowthCheck(BaseHook):
    """At the first step after each regrowth, compare regrown entries' Adagrad sums with the rule."""

    def __init__(self, model: nn.Module, regrown_state: str) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
        self.regrown_state = regrown_state
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.checked = 0

    def before_step(self, ctx: StepContext) -> None:
        masks = [(layer.neuron_mask.clone(), layer.input_mask.clone()) for layer in self.layers]
        if self.masks and any(not torch.equal(a[0], b[0]) for a, b in zip(self.masks, masks, strict=True)):
            if all(bool(n.all()) for n, _ in masks):  # a regrowth (not a pruning) just happened
                self._check(ctx.optimizers[0], masks)
        self.masks = masks

    def _check(
        self, optimizer: torch.optim.Optimizer, masks: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        for layer, (old_n, old_i), (new_n, new_i) in zip(self.layers, self.masks, masks, strict=True):
            old, new = old_n.unsqueeze(1) & old_i.unsqueeze(0), new_n.unsqueeze(1) & new_i.unsqueeze(0)
            for param, was, now in ((layer.weight, old, new), (layer.bias, old_n, new_n)):
                opened, sums = ~was & now, optimizer.state[param]["sum"]
                if not opened.any():
                    continue
                if param is layer.weight:  # a regrown neuron keeps its bias (set_linear_masks_)
                    assert torch.all(param.detach()[opened] == 0)
                # Entries kept through the growth have the state they had before it.
                expected = _layer_mean(sums, was & now) if self.regrown_state == "layer_mean" else 0.0
                torch.testing.assert_close(
                    sums[opened], torch.full_like(sums[opened], float(expected)), rtol=1e-6, atol=0
                )
                assert self.regrown_state == "reset" or float(expected) > 0
        self.checked += 1


@pytest.mark.parametrize("regrown_state", ["reset", "layer_mean"])
def test_grow_prune_schedule_regrows_under_its_setting(regrown_state):
    model = tp.wrap(build_dlrm(CONFIG))
    optimizer = make_optimizer(model.parameters(), TRAIN)
    config = GrowPruneConfig(PhasePlan.every(0.2), beta=0.5, window_steps=2, regrown_state=regrown_state)
    schedule = GrowPruneSchedule(model, config, [optimizer], num_rows=ROWS, train=TRAIN)
    check = _RegrowthCheck(model, regrown_state)
    stream = SyntheticStream(ROWS, drift=1.0, num_dense=3, num_sparse=3, num_embeddings=20)
    IncrementalTrainer(model, TRAIN, optimizers=[optimizer], hooks=[schedule, check]).run(stream)
    assert check.checked == 2  # both sparse phases were left


def test_cli_refuses_an_unknown_rule_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["grow-prune", "--regrown-state", "mean", "--run-dir", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "--regrown-state: invalid choice: 'mean'" in error_lines[0]
    assert not (tmp_path / "never").exists()


def test_cli_records_the_rule_with_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = ["grow-prune", "--data", "synthetic", "--rows", "1000", "--batch-size", "50", "--window", "200"]
    tiny = ["--num-embeddings", "200", "--dense-arch", "16,4", "--over-arch", "16,1", "--no-progress"]
    flags = [
        "--increment-rows",
        "200",
        "--window-steps",
        "2",
        "--regrown-state",
        "layer_mean",
        "--no-checkpoint",
    ]
    assert main([*args, *flags, "--run-dir", str(run_dir), *tiny]) == 0
    assert json.loads((run_dir / "config.json").read_text())["grow_prune"]["regrown_state"] == "layer_mean"
