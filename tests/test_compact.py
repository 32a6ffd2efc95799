"""Compacted sparse phases: the kept block trains exactly like the masked layer, at the kept sizes."""

import copy

import pytest
import torch
from torch import nn

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.masks import MaskedLinear, prune_
from torchrec_prune.masks.compact import compact_, compacted_layers, expand_, expanded
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import neuron_successors
from torchrec_prune.pruners.structured import prune_neurons
from torchrec_prune.schedules import GrowPruneConfig, PhasePlan, run_grow_prune
from torchrec_prune.train.trainer import TrainConfig, default_forward

CONFIG = DLRMConfig(
    num_dense=3, num_sparse=3, num_embeddings=20, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
OPTIMIZERS = {
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),  # state created at the first step
}


def _batches(count: int) -> list:
    stream = SyntheticStream(50 * count, drift=1.0, num_dense=3, num_sparse=3, num_embeddings=20)
    return list(stream.batches(50))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> list[float]:
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = default_forward(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _pruned_pair(make_optimizer, warm: list) -> tuple:
    """Two equal wrapped DLRMs, trained on ``warm``, with the same half of every prunable layer closed."""
    torch.manual_seed(0)
    a = tp.wrap(build_dlrm(CONFIG))
    b = copy.deepcopy(a)
    pair = []
    for model in (a, b):
        optimizer = make_optimizer(model.parameters())
        _train(model, optimizer, warm)
        modules = dict(model.named_modules())
        scores = {
            f: torch.arange(modules[f].out_features, dtype=torch.float) for f in neuron_successors(model)
        }
        prune_neurons(model, 0.5, scores, [optimizer])
        pair.append((model, optimizer))
    return pair


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, p in model.named_parameters()
        for key, value in optimizer.state.get(p, {}).items()
    }


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compacted_training_equals_masked_training_exactly(name):
    batches = _batches(12)
    (masked, opt_m), (compacted, opt_c) = _pruned_pair(OPTIMIZERS[name], batches[:3])
    assert len(compact_(compacted, [opt_c])) == 6
    losses = [(_train(masked, opt_m, [b]), _train(compacted, opt_c, [b])) for b in batches[3:9]]
    assert all(m == c for m, c in losses)
    assert compacted.state_dict().keys() == masked.state_dict().keys()
    for key, value in compacted.state_dict().items():  # full size while compacted
        assert torch.equal(value, masked.state_dict()[key]), key
    expand_(compacted)
    assert compacted_layers(compacted) == {}
    assert _train(masked, opt_m, batches[9:]) == _train(compacted, opt_c, batches[9:])
    state_m, state_c = _optimizer_state(masked, opt_m), _optimizer_state(compacted, opt_c)
    assert state_m.keys() == state_c.keys()
    assert all(torch.equal(state_m[k], state_c[k]) for k in state_m)


def test_optimizer_state_created_while_compacted_expands_with_fresh_values_outside_the_block():
    batches = _batches(6)
    (masked, opt_m), (compacted, opt_c) = _pruned_pair(OPTIMIZERS["adam"], [])  # no Adam state yet
    compact_(compacted, [opt_c])
    assert _train(masked, opt_m, batches[:3]) == _train(compacted, opt_c, batches[:3])
    expand_(compacted)
    state_m, state_c = _optimizer_state(masked, opt_m), _optimizer_state(compacted, opt_c)
    assert all(torch.equal(state_m[k], state_c[k]) for k in state_m)


def test_layers_train_their_kept_blocks_and_chained_layers_pass_narrow_activations():
    (_, _), (model, optimizer) = _pruned_pair(OPTIMIZERS["adagrad"], _batches(1))
    compact_(model, [optimizer])
    layers = compacted_layers(model)
    shapes = {fqn.split("model.", 1)[1]: tuple(m.weight.shape) for fqn, m in layers.items()}
    assert shapes == {
        "dense_arch.model._mlp.0._linear": (8, 3),
        "dense_arch.model._mlp.1._linear": (4, 8),
        "dense_arch.model._mlp.2._linear": (4, 4),
        "over_arch.model.0._mlp.0._linear": (8, 10),
        "over_arch.model.0._mlp.1._linear": (4, 8),
        "over_arch.model.1": (1, 4),
    }
    # Consecutive pruned layers hand over only the kept neurons: no gather, no scatter anywhere.
    assert not any(m.compacted.gather_input or m.compacted.scatter_output for m in layers.values())
    state = optimizer.state[layers["model.over_arch.model.1"].weight]
    assert state["sum"].shape == (1, 4)


@pytest.mark.filterwarnings("ignore:wrap\\(\\) leaves out")
def test_a_batch_norm_between_layers_keeps_full_width_activations():
    torch.manual_seed(0)
    model = tp.wrap(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)))
    first, last = model[0], model[3]
    keep = torch.tensor([True, False, True, True, False, True])
    prune_(first, neuron_mask=keep)
    prune_(last, input_mask=keep)
    x = torch.randn(7, 5)
    expected = model(x)
    compact_(model)
    assert first.compacted.scatter_output and last.compacted.gather_input
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_expanded_gives_full_tensors_for_a_checkpoint_and_the_blocks_back_after():
    (_, _), (model, optimizer) = _pruned_pair(OPTIMIZERS["adagrad"], _batches(2))
    compact_(model, [optimizer])
    layer = compacted_layers(model)["model.dense_arch.model._mlp.0._linear"]
    block = layer.weight.detach().clone()
    with expanded(model):
        assert layer.weight.shape == (16, 3) and optimizer.state[layer.weight]["sum"].shape == (16, 3)
        assert torch.equal(layer.weight[layer.neuron_mask], block)
        assert torch.count_nonzero(layer.weight[~layer.neuron_mask]) == 0
    assert torch.equal(layer.weight, block) and optimizer.state[layer.weight]["sum"].shape == (8, 3)


def test_masks_of_a_compacted_layer_cannot_change_or_be_loaded():
    (_, _), (model, optimizer) = _pruned_pair(OPTIMIZERS["adagrad"], _batches(1))
    state = copy.deepcopy(model.state_dict())
    compact_(model, [optimizer])
    layer = compacted_layers(model)["model.over_arch.model.1"]
    with pytest.raises(RuntimeError, match="compacted layer cannot change; expand it first"):
        prune_(layer, [optimizer], neuron_mask=torch.zeros(1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="cannot load into a compacted layer; expand it first"):
        model.load_state_dict(state)
    expand_(model)
    model.load_state_dict(state)


def test_element_masks_and_mask_learning_keep_the_masked_forward():
    layer = MaskedLinear(4, 3)
    layer.neuron_mask[0] = False
    layer.weight_mask[1, 1] = False
    other = MaskedLinear(4, 3)
    other.neuron_mask[0] = False
    other.capture_effective_grad = True
    assert compact_(nn.Sequential(layer, nn.ReLU(), other)) == []


def test_grow_prune_with_compacted_sparse_phases_equals_the_masked_run():
    stream = SyntheticStream(2_000, drift=1.0, num_dense=3, num_sparse=3, num_embeddings=20)
    train = TrainConfig(batch_size=50, lr=0.05, window=500, increment_rows=400, progress=False)
    runs = {}
    for compact in (False, True):
        torch.manual_seed(0)
        model = tp.wrap(build_dlrm(CONFIG))
        config = GrowPruneConfig(PhasePlan.prune_only(0.6), beta=0.7, window_steps=3, compact=compact)
        runs[compact] = (model, run_grow_prune(model, stream, train, config))
    (masked, ref), (compacted, result) = runs[False], runs[True]
    assert [r.ce for r in result.run.records] == [r.ce for r in ref.run.records]
    assert result.run.flops == ref.run.flops
    assert compacted_layers(compacted) == {}  # a run that ends sparse hands back the full layers
    for key, value in compacted.state_dict().items():
        assert torch.equal(value, masked.state_dict()[key]), key
