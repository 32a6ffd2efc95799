"""Structured Taylor neuron pruning and regrowth (SPEC 5)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.mlp import MLP

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.importance import NeuronTaylor
from torchrec_prune.masks import MaskedLinear
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import (
    NeuronPruner,
    StructuredConfig,
    Targets,
    grow_neurons,
    neuron_successors,
    prune_neurons,
)
from torchrec_prune.train.flops import FlopsMeter
from torchrec_prune.train.hooks import StepContext

CONFIG = DLRMConfig(
    num_dense=3, num_sparse=3, num_embeddings=20, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
BOTTOM = "model.dense_arch.model._mlp"
TOP = "model.over_arch.model"


def _dlrm() -> nn.Module:
    return tp.wrap(build_dlrm(CONFIG))


def _batches(n: int = 6):
    return list(SyntheticStream(64 * n, num_dense=3, num_sparse=3, num_embeddings=20).batches(64))


def test_successors_in_dlrm_skip_the_interaction_input_and_the_output_layer():
    assert neuron_successors(_dlrm()) == {
        f"{BOTTOM}.0._linear": f"{BOTTOM}.1._linear",
        f"{BOTTOM}.1._linear": f"{BOTTOM}.2._linear",
        f"{TOP}.0._mlp.0._linear": f"{TOP}.0._mlp.1._linear",
        f"{TOP}.0._mlp.1._linear": f"{TOP}.1",
    }


def test_successors_pass_element_wise_modules_only():
    model = tp.wrap(
        nn.Sequential(
            nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3),
            MLP(3, [4, 2]), nn.Linear(2, 1),
        )
    )  # fmt: skip
    assert neuron_successors(model) == {
        "0": "3",
        "5": "6._mlp.0._linear",
        "6._mlp.0._linear": "6._mlp.1._linear",
        "6._mlp.1._linear": "7",
    }
    assert "3" not in neuron_successors(model)  # LayerNorm mixes the columns of its input
    swish = tp.wrap(nn.Sequential(MLP(3, [4], activation="swish_layernorm"), nn.Linear(4, 1)))
    assert neuron_successors(swish) == {}


def test_neuron_taylor_averages_squared_row_sums_of_g_times_theta():
    layer = MaskedLinear(5, 3)
    scorer = NeuronTaylor()
    expected = torch.zeros(3)
    for _ in range(4):
        layer.zero_grad()
        F.mse_loss(layer(torch.randn(8, 5)), torch.randn(8, 3)).backward()
        expected += (layer.weight.grad * layer.weight).sum(1).square()
        scorer.observe({"l": layer})
    torch.testing.assert_close(scorer.scores({"l": layer})["l"], expected.detach() / 4)


def test_prune_neurons_keeps_top_fraction_and_masks_the_next_layers_inputs():
    model = _dlrm()
    layers = dict(model.named_modules())
    importance = {
        f"{BOTTOM}.0._linear": torch.arange(16.0),
        f"{TOP}.0._mlp.1._linear": torch.tensor([5.0, 1.0, 1.0, 7.0, 0.0, 1.0, 2.0, 3.0]),
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = prune_neurons(model, 0.7, importance, [opt])
    assert kept == {f"{BOTTOM}.0._linear": 5, f"{TOP}.0._mlp.1._linear": 2}
    first, second = layers[f"{BOTTOM}.0._linear"], layers[f"{BOTTOM}.1._linear"]
    assert first.neuron_mask.tolist() == [False] * 11 + [True] * 5
    assert torch.equal(second.input_mask, first.neuron_mask)
    assert torch.all(first.weight[:11] == 0) and torch.all(first.effective_bias()[:11] == 0)
    assert torch.all(second.weight[:, :11] == 0)
    out_layer = layers[f"{TOP}.1"]
    assert out_layer.input_mask.tolist() == [True, False, False, True, False, False, False, False]
    assert bool(out_layer.neuron_mask.all())
    # Structured masks shrink the matmuls: FLOPs drop, and the model still trains.
    flops = FlopsMeter().per_sample(model)
    assert flops.forward < flops.dense_forward
    loss, _ = model(_batches(1)[0])
    loss.backward()
    assert torch.all(first.weight.grad[:11] == 0)


def test_at_least_one_neuron_is_kept():
    model = _dlrm()
    kept = prune_neurons(model, 0.99, {f"{BOTTOM}.1._linear": torch.rand(8)})
    assert kept == {f"{BOTTOM}.1._linear": 1}


def test_grow_neurons_reopens_at_zero_with_fresh_optimizer_state():
    model = _dlrm()
    layers = dict(model.named_modules())
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.5)
    for batch in _batches(2):
        opt.zero_grad()
        model(batch)[0].backward()
        opt.step()
    prune_neurons(model, 0.5, {f"{BOTTOM}.0._linear": torch.rand(16)}, [opt])
    first, second = layers[f"{BOTTOM}.0._linear"], layers[f"{BOTTOM}.1._linear"]
    closed = ~first.neuron_mask.clone()
    kept_bias = first.bias.detach()[closed].clone()
    for batch in _batches(2):
        opt.zero_grad()
        model(batch)[0].backward()
        opt.step()
    for p in (first.weight, second.weight):
        opt.state[p]["sum"].fill_(7.0)  # so that a reset is visible
    reopened = grow_neurons(model, [opt])
    assert reopened == 8 * 3 + 8 * 8  # rows of the first layer and columns of the second
    assert all(bool(m.neuron_mask.all() and m.input_mask.all()) for _, m in tp.masked_modules(model)
               if isinstance(m, MaskedLinear))  # fmt: skip
    assert torch.all(first.weight[closed] == 0)
    assert torch.equal(first.bias[closed], kept_bias)  # frozen while closed, resumes (see surgery)
    assert torch.all(second.weight[:, closed] == 0)
    assert torch.all(opt.state[first.weight]["sum"][closed] == 0.5)
    assert torch.all(opt.state[second.weight]["sum"][:, closed] == 0.5)
    assert torch.all(opt.state[first.weight]["sum"][~closed] == 7.0)


def test_grow_selected_layer_only():
    model = _dlrm()
    a, b = f"{BOTTOM}.0._linear", f"{TOP}.0._mlp.0._linear"
    prune_neurons(model, 0.5, {a: torch.rand(16), b: torch.rand(16)})
    grow_neurons(model, fqns=[a])
    layers = dict(model.named_modules())
    assert bool(layers[a].neuron_mask.all()) and bool(layers[f"{BOTTOM}.1._linear"].input_mask.all())
    assert int(layers[b].neuron_mask.sum()) == 8


def test_neuron_pruner_averages_over_the_window_then_prunes_once():
    model = _dlrm()
    pruner = NeuronPruner(model, StructuredConfig(beta=0.5, window_steps=3))
    assert sorted(pruner.linears) == sorted(neuron_successors(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = StepContext(model=model, optimizers=[opt])
    reference = NeuronTaylor()
    for i, batch in enumerate(_batches(5)):
        opt.zero_grad(set_to_none=True)
        model(batch)[0].backward()
        if i < 3:
            reference.observe(pruner.linears)
        pruner.before_step(ctx)
        opt.step()
        if i == 2:
            importances = reference.scores(pruner.linears)
        pruner.after_step(ctx)
        assert pruner.finalized == (i >= 2)
    stats = pruner.stats()
    for fqn, layer in pruner.linears.items():
        n = layer.out_features
        assert stats[fqn].kept_neurons == n // 2
        top = torch.sort(importances[fqn], descending=True, stable=True).indices[: n // 2]
        assert set(layer.neuron_mask.nonzero().squeeze(1).tolist()) == set(top.tolist())


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.2, 1.5])
def test_beta_outside_open_unit_interval_is_rejected(beta):
    with pytest.raises(ValueError, match=r"StructuredConfig.beta must be in \(0, 1\)"):
        StructuredConfig(beta=beta)
    with pytest.raises(ValueError, match=r"prune_neurons.beta must be in \(0, 1\)"):
        prune_neurons(_dlrm(), beta, {})


def test_unprunable_layers_are_rejected_with_the_reason():
    model = _dlrm()
    with pytest.raises(ValueError, match="feeds the feature interaction"):
        prune_neurons(model, 0.5, {f"{BOTTOM}.2._linear": torch.rand(4)})
    with pytest.raises(ValueError, match="final output layer"):
        prune_neurons(model, 0.5, {f"{TOP}.1": torch.rand(1)})
    with pytest.raises(ValueError, match="must have shape"):
        prune_neurons(model, 0.5, {f"{BOTTOM}.0._linear": torch.rand(3)})
    with pytest.raises(ValueError, match="feeds the feature interaction"):
        NeuronPruner(model, StructuredConfig(beta=0.5, targets=Targets(include=[f"{BOTTOM}.2._linear"])))
    with pytest.raises(ValueError, match="include_output_layer must be False"):
        StructuredConfig(beta=0.5, targets=Targets(include_output_layer=True))
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(TypeError, match="'0' of type Linear is not mask-aware"):
        prune_neurons(plain, 0.5, {"0": torch.rand(4)})
    with pytest.raises(TypeError, match="'0' of type Linear is not mask-aware"):
        NeuronPruner(plain, StructuredConfig(beta=0.5))
