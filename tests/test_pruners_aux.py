"""AUX pruning (SPEC 4): linear STE, rescaled update, revival, freezing, finalization, lambda."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import pruner_step, wrapped_mlp
from torch import nn

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.importance import combined_importance, mean_normalized
from torchrec_prune.masks import MaskedLinear
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import AuxConfig, AuxPruner, Pruner, Targets, overall_sparsity
from torchrec_prune.train.hooks import StepContext
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig


def _task(n: int = 256, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] * x[:, 3] > 0).float()
    return x, y


def _pretrained(steps: int = 150) -> nn.Sequential:
    model = wrapped_mlp([8, 32, 16, 1])
    x, y = _task()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y).backward()
        opt.step()
    return model


def test_ste_mask_gradient_equals_g_times_theta_also_where_closed():
    layer = MaskedLinear(5, 3)
    with torch.no_grad():
        layer.weight_mask[0, 1] = False
        layer.weight_mask[2, 4] = False
    layer.capture_effective_grad = True
    x = torch.randn(7, 5)
    target = torch.randn(7, 3)
    F.mse_loss(layer(x), target).backward()
    # Reference: differentiate w.r.t. a real-valued mask m in W * m, evaluated at the binary mask.
    m = layer.weight_mask.float().requires_grad_(True)
    F.mse_loss(F.linear(x, layer.weight.detach() * m, layer.bias.detach()), target).backward()
    G = layer.effective_grad * layer.weight.detach()
    torch.testing.assert_close(G, m.grad)
    assert G[0, 1] != 0 and G[2, 4] != 0
    # weight.grad hides closed positions; effective_grad does not.
    assert layer.weight.grad[0, 1] == 0


def test_rescaled_terms_average_one_per_layer_whatever_the_scale():
    x = torch.rand(40, 30) * 1e-4
    y = torch.rand(40, 30) * 1e3
    assert mean_normalized(x).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert combined_importance(0.3, x, 0.7, y).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.all(mean_normalized(torch.zeros(4)) == 0)


def test_aux_update_moves_latent_by_eps_times_w1_plus_w2_minus_lambda_on_average_per_layer():
    model = wrapped_mlp([8, 32, 16, 1])
    with torch.no_grad():
        model[0].weight.mul_(100.0)  # very different scales between layers
        model[2].weight.mul_(1e-3)
    cfg = AuxConfig(
        lam=0.4, w1=0.25, w2=0.5, eps=0.1, phase_steps=10, targets=Targets(include_output_layer=True)
    )
    pruner = AuxPruner(model, cfg)
    ctx = StepContext(model=model, optimizers=[])
    x, y = _task()
    before = {k: v.clone() for k, v in pruner.latent.items()}
    pruner_step(model, pruner, ctx, x, y)
    for fqn, latent in pruner.latent.items():
        mean_step = (latent - before[fqn]).mean().item()
        assert mean_step == pytest.approx(0.1 * (0.25 + 0.5 - 0.4), rel=1e-4), fqn


def test_pruned_weight_keeps_its_value_and_revives_under_linear_ste():
    # y depends only on input 0. Weight 0 starts pruned (as if pruned early) while keeping its value;
    # the loss then misses it, its |g * theta| dominates the layer, and a climbs back above 0.
    torch.manual_seed(1)
    model = tp.wrap(nn.Sequential(nn.Linear(4, 1)))
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.05, -0.05, 0.05]]))
        layer.bias.zero_()
    x = torch.randn(512, 4)
    y = 2.0 * x[:, 0:1]
    pruner = AuxPruner(
        model, AuxConfig(lam=1.0, eps=0.05, phase_steps=100, targets=Targets(include_output_layer=True))
    )
    pruner.latent["0"][0, 0] = -0.2
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    ctx = StepContext(model=model, optimizers=[opt])
    history = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        pruner.before_step(ctx)
        history.append((bool(layer.weight_mask[0, 0]), float(layer.weight[0, 0].detach())))
        opt.step()
        pruner.after_step(ctx)
    assert history[0] == (False, 2.0)  # pruned, value kept
    revived_at = next(i for i, (open_, _) in enumerate(history) if open_)
    assert 0 < revived_at < 10
    assert all(value == 2.0 for _, value in history[: revived_at + 1])  # frozen while pruned
    assert not torch.any(pruner.latent["0"][0, 1:] > pruner.latent["0"][0, 0])


def test_pruned_weights_are_frozen_during_the_phase_with_momentum_and_weight_decay():
    model = _pretrained(50)
    pruner = AuxPruner(model, AuxConfig(lam=1.8, eps=0.2, phase_steps=50))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    ctx = StepContext(model=model, optimizers=[opt])
    x, y = _task()
    layer = model[0]
    for _ in range(10):
        pruner_step(model, pruner, ctx, x, y)
    closed = ~layer.weight_mask.clone()
    assert closed.any()
    held = layer.weight.detach().clone()
    pruner_step(model, pruner, ctx, x, y)
    still_closed = closed & ~layer.weight_mask
    assert still_closed.any()
    assert torch.equal(layer.weight[still_closed], held[still_closed])
    assert torch.all(layer.weight[still_closed] != 0)  # values kept, not zeroed
    assert not torch.equal(layer.weight[layer.weight_mask], held[layer.weight_mask])  # open ones train


def test_finalize_zeroes_pruned_resets_state_and_fine_tuning_with_momentum_keeps_them_zero():
    model = _pretrained(50)
    pruner = AuxPruner(model, AuxConfig(lam=1.75, eps=0.1, phase_steps=30))
    assert isinstance(pruner, Pruner)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ctx = StepContext(model=model, optimizers=[opt])
    x, y = _task()
    for _ in range(30):
        pruner_step(model, pruner, ctx, x, y)
    assert pruner.finalized  # the phase ended by itself
    closed = {fqn: ~layer.weight_mask.clone() for fqn, layer in pruner.linears.items()}
    assert overall_sparsity(pruner.stats()) > 0.3
    for fqn, layer in pruner.linears.items():
        assert torch.all(layer.weight[closed[fqn]] == 0)
        assert torch.all(opt.state[layer.weight]["momentum_buffer"][closed[fqn]] == 0)
        assert not layer.capture_effective_grad
    for _ in range(20):
        pruner_step(model, pruner, ctx, x, y)
    for fqn, layer in pruner.linears.items():
        assert torch.equal(~layer.weight_mask, closed[fqn])  # mask stays fixed
        assert torch.all(layer.weight[closed[fqn]] == 0)


def test_output_layer_is_left_alone_by_default():
    model = wrapped_mlp([8, 16, 1])
    pruner = AuxPruner(model, AuxConfig())
    assert list(pruner.linears) == ["0"]
    assert list(AuxPruner(model, AuxConfig(targets=Targets(include_output_layer=True))).linears) == ["0", "2"]


def test_larger_lambda_gives_higher_sparsity_on_a_trained_model():
    base = _pretrained()
    x, y = _task()
    sparsities = []
    for lam in (0.25, 0.75, 1.25, 1.75, 2.25):
        model = copy.deepcopy(base)
        pruner = AuxPruner(model, AuxConfig(lam=lam, eps=0.05, phase_steps=60))
        opt = torch.optim.Adam(model.parameters(), lr=0.005)
        ctx = StepContext(model=model, optimizers=[opt])
        for _ in range(60):
            pruner_step(model, pruner, ctx, x, y)
        sparsities.append(overall_sparsity(pruner.stats()))
    assert all(a < b for a, b in zip(sparsities, sparsities[1:], strict=False)), sparsities
    assert sparsities[0] < 0.2 and sparsities[-1] > 0.7, sparsities


def test_adaptation_variant_keeps_updating_the_mask():
    model = _pretrained(50)
    pruner = AuxPruner(model, AuxConfig(lam=1.5, eps=0.1, phase_steps=None))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = StepContext(model=model, optimizers=[opt])
    x, y = _task()
    masks = []
    for _ in range(40):
        pruner_step(model, pruner, ctx, x, y)
        masks.append(model[0].weight_mask.clone())
    assert not pruner.finalized
    assert not torch.equal(masks[10], masks[-1])
    pruner.finalize([opt])
    assert pruner.finalized and torch.all(model[0].weight[~model[0].weight_mask] == 0)


def test_aux_runs_inside_the_incremental_trainer_on_dlrm():
    config = DLRMConfig(
        num_sparse=4, num_dense=3, num_embeddings=50, dense_arch=[16, 4], over_arch=[16, 8, 1]
    )
    stream = SyntheticStream(1536, drift=0.0, seed=0, num_dense=3, num_sparse=4, num_embeddings=50)
    model = tp.wrap(build_dlrm(config))
    pruner = AuxPruner(model, AuxConfig(lam=1.75, eps=0.1, phase_steps=8))
    trainer = IncrementalTrainer(
        model, TrainConfig(batch_size=64, window=512, increment_rows=512, progress=False), hooks=[pruner]
    )
    trainer.run(stream)
    stats = pruner.stats()
    assert pruner.finalized
    assert set(stats) == {
        "model.dense_arch.model._mlp.0._linear",
        "model.dense_arch.model._mlp.1._linear",
        "model.over_arch.model.0._mlp.0._linear",
        "model.over_arch.model.0._mlp.1._linear",
    }
    assert 0.3 < overall_sparsity(stats) < 1.0
    for fqn, layer in pruner.linears.items():
        assert torch.all(layer.weight[~layer.weight_mask] == 0), fqn


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lam": -0.1}, "lam"),
        ({"w1": -1.0}, "w1"),
        ({"w1": 0.0, "w2": 0.0}, "w1 + "),
        ({"eps": 0.0}, "eps"),
        ({"a0": -1.0}, "a0"),
        ({"phase_steps": 0}, "phase_steps"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(f"AuxConfig.{field}")):
        AuxConfig(**kwargs)


def test_non_mask_aware_modules_raise_type_error_naming_fqn_and_type():
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(TypeError, match=r"'0' of type Linear is not mask-aware"):
        AuxPruner(plain, AuxConfig())
    mixed = tp.wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)), tp.WrapConfig(include=["0"]))
    mixed.add_module("extra", nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match=r"'extra' of type Conv1d"):
        AuxPruner(mixed, AuxConfig(targets=Targets(include=["extra"])))
    with pytest.raises(ValueError, match="final output layer"):
        AuxPruner(tp.wrap(nn.Sequential(nn.Linear(4, 1))), AuxConfig(targets=Targets(include=["0"])))


def test_aux_latent_update_of_every_weight_equals_an_independent_computation():
    # Per weight, not per layer mean: a <- a + eps * (w1 |G|/mean|G| + w2 |theta|/mean|theta| - lambda),
    # G = (dL/dW_eff) * theta with W_eff = W * mask, computed here from plain tensors and autograd.
    model = wrapped_mlp([8, 32, 16, 1])
    cfg = AuxConfig(lam=0.9, w1=0.6, w2=0.4, eps=0.1, targets=Targets(include_output_layer=True))
    pruner = AuxPruner(model, cfg)
    closed = torch.rand(32, 8, generator=torch.Generator().manual_seed(3)) < 0.3
    with torch.no_grad():  # some weights already pruned (values kept), as earlier steps would leave them
        model[0].weight_mask.copy_(~closed)
        pruner.latent["0"][closed] = -0.5
    x, y = _task()
    layers = [model[0], model[2], model[4]]
    effective = [(m.weight.detach() * m.weight_mask).requires_grad_(True) for m in layers]
    h = x
    for i, (m, w) in enumerate(zip(layers, effective, strict=True)):
        h = F.linear(h, w, m.bias.detach())
        h = torch.relu(h) if i < 2 else h
    F.binary_cross_entropy_with_logits(h.squeeze(-1), y).backward()
    expected = {}
    for fqn, m, w in zip(("0", "2", "4"), layers, effective, strict=True):
        G, theta = (w.grad * m.weight.detach()).abs(), m.weight.detach().abs()
        step = cfg.w1 * G / G.mean() + cfg.w2 * theta / theta.mean() - cfg.lam
        expected[fqn] = pruner.latent[fqn] + cfg.eps * step
    pruner_step(model, pruner, StepContext(model=model, optimizers=[]), x, y)
    for fqn, latent in pruner.latent.items():
        torch.testing.assert_close(latent, expected[fqn], rtol=1e-5, atol=1e-6)


def test_a_small_weight_with_a_large_gradient_revives_while_large_weights_without_one_are_pruned():
    # y depends on input 0 only, whose weight is tiny and pruned; inputs 1-3 are exactly orthogonal to
    # input 0 and their larger weights carry nothing. Linear STE scores the tiny weight by g * theta with
    # a large g: it revives; the large weights' importance is magnitude only, below lambda: pruned.
    q, _ = torch.linalg.qr(torch.randn(512, 4, generator=torch.Generator().manual_seed(0)))
    x = q * 512**0.5
    y = 200.0 * x[:, 0:1]
    model = tp.wrap(nn.Sequential(nn.Linear(4, 1, bias=False)))
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.01, 0.5, 0.5, 0.5]]))
        layer.weight_mask[0, 0] = False
    pruner = AuxPruner(
        model,
        AuxConfig(
            lam=1.0, w1=0.5, w2=0.5, eps=0.05, phase_steps=40, targets=Targets(include_output_layer=True)
        ),
    )
    pruner.latent["0"][0, 0] = -0.05
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctx = StepContext(model=model, optimizers=[opt])
    revived_at = None
    for step in range(80):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        pruner.before_step(ctx)
        if revived_at is None and bool(layer.weight_mask[0, 0]):
            revived_at = step
        opt.step()
        pruner.after_step(ctx)
    assert revived_at is not None and revived_at < 10
    assert layer.weight_mask.tolist() == [[True, False, False, False]]
    assert float(layer.weight[0, 0]) > 100.0  # it trained once revived


def _prune_everything(min_layer_density: float) -> tuple[nn.Sequential, AuxPruner]:
    model = wrapped_mlp([8, 32, 16, 1])
    cfg = AuxConfig(lam=50.0, eps=1.0, phase_steps=3, min_layer_density=min_layer_density)
    pruner = AuxPruner(model, cfg)  # a lambda no weight's importance reaches: every latent score falls
    ctx = StepContext(model=model, optimizers=[])
    x, y = _task()
    for _ in range(3):
        pruner_step(model, pruner, ctx, x, y)
    return model, pruner


def test_a_layer_pruned_to_100_percent_is_reported_by_name():
    with pytest.warns(UserWarning, match=r"layer '0' is pruned to 100%") as record:
        model, _ = _prune_everything(0.0)
    assert {str(w.message).split("'")[1] for w in record if "pruned to 100%" in str(w.message)} == {"0", "2"}
    assert not bool(model[0].weight_mask.any())


def test_min_layer_density_keeps_the_highest_scored_weights_of_every_layer():
    model, pruner = _prune_everything(0.05)
    for fqn, layer in pruner.linears.items():
        kept = layer.weight_mask
        assert int(kept.sum()) == math.ceil(0.05 * kept.numel())
        assert pruner.latent[fqn][kept].min() >= pruner.latent[fqn][~kept].max()  # the best scores
        assert bool((layer.weight[~kept] == 0).all())  # the rest is pruned for good after the phase


def _sparsity_after_phase(base: nn.Module, lam: float, steps: int, eps: float | None = None) -> float:
    model = copy.deepcopy(base)
    pruner = AuxPruner(model, AuxConfig(lam=lam, eps=eps, phase_steps=steps))
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    ctx = StepContext(model=model, optimizers=[opt])
    x, y = _task()
    for _ in range(steps):
        pruner_step(model, pruner, ctx, x, y)
    assert pruner.finalized
    return overall_sparsity(pruner.stats())


@pytest.mark.parametrize("seed", [0, 1])
def test_lambda_alone_sets_sparsity_whatever_the_phase_length(seed):
    # eps = latent_budget / phase_steps: a weight is pruned when its mean rescaled importance over the
    # phase is below lambda - a0 / budget, which does not depend on the phase length. Tolerance: 0.05 of
    # the weights, for phases of 25 and 200 steps (the mean importance itself moves a little as the model
    # trains 8x longer under the penalty).
    torch.manual_seed(seed)
    base = _pretrained()
    short, long = (_sparsity_after_phase(base, 1.5, steps) for steps in (25, 200))
    assert 0.3 < short < 0.95
    assert abs(short - long) <= 0.05, (short, long)
    # A fixed step lacks that property: 25 steps of 0.01 cannot move a latent score by a0 = 1.
    assert _sparsity_after_phase(base, 1.5, 25, eps=0.01) < short - 0.3


def test_eps_is_derived_from_the_latent_budget():
    assert AuxConfig(phase_steps=200).step == pytest.approx(tp.pruners.aux.LATENT_BUDGET / 200)
    assert AuxConfig(phase_steps=200, latent_budget=4.0).step == pytest.approx(0.02)
    assert AuxConfig(eps=0.3, phase_steps=200).step == 0.3
    assert AuxConfig(eps=0.3, phase_steps=None).step == 0.3
    with pytest.raises(ValueError, match="eps is required when phase_steps is None"):
        AuxConfig(phase_steps=None)
    with pytest.raises(ValueError, match="latent_budget must be > 0"):
        AuxConfig(latent_budget=0.0)
