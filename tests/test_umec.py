"""UMEC (SPEC 7): groups, the paper's update rules, the budget on the exported model, bad budgets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import wrapped_mlp
from torch import nn

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.masks.layout import dlrm_layouts
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners.umec import UMECConfig, UMECPruner
from torchrec_prune.train.flops import fc_flops
from torchrec_prune.train.hooks import StepContext
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

CONFIG = DLRMConfig(
    num_dense=3, num_sparse=6, num_embeddings=50, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
EBC = "model.sparse_arch.embedding_bag_collection"
TOP = "model.over_arch.model.0._mlp.0._linear"


def dlrm() -> nn.Module:
    torch.manual_seed(0)
    return tp.wrap(build_dlrm(CONFIG))


def stream(rows: int = 1280) -> SyntheticStream:
    return SyntheticStream(rows, num_dense=3, num_sparse=6, num_embeddings=50, drift=0.0, seed=0)


def run_umec(model: nn.Module, budget: float, steps: int = 20) -> UMECPruner:
    pruner = UMECPruner(model, UMECConfig(budget=budget, phase_steps=steps, eta4=100.0, record_every=5))
    train = TrainConfig(batch_size=64, window=640, increment_rows=640, progress=False)
    IncrementalTrainer(model, train, hooks=[pruner]).run(stream(64 * steps))
    return pruner


def test_groups_of_a_dlrm_are_neurons_features_by_their_dot_products_and_the_common_dimension():
    model = dlrm()
    pruner = UMECPruner(model, UMECConfig(budget=0.5))
    by_name = {layer.name: layer for layer in pruner.layers}
    features = by_name[f"features:{EBC}"]
    assert features.size == 6
    cols, ids = features.cols[TOP]
    layout = dlrm_layouts(model)[0]
    for f in range(6):  # feature f takes part in 6 of the 21 dot products (5 features + the dense vector)
        assert sorted(cols[ids == f].tolist()) == layout.pair_columns(f).tolist()
        assert len(cols[ids == f]) == 6
    dims = by_name[f"dims:{EBC}"]
    assert dims.size == 4 and dims.tables == {EBC: tuple(f"t_cat_{i}" for i in range(6))}
    assert set(dims.rows) == {"model.dense_arch.model._mlp.2._linear"}  # the bottom MLP's output
    neurons = {n for n in by_name if n.startswith("neurons:")}
    assert f"neurons:{TOP}" in neurons
    assert "neurons:model.dense_arch.model._mlp.2._linear" not in neurons  # feeds the interaction
    assert "neurons:model.over_arch.model.1" not in neurons  # the logit


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_budget_holds_on_the_exported_model(budget: float):
    model = dlrm()
    dense = fc_flops(model).dense_forward
    pruner = run_umec(model, budget)
    assert pruner.finalized
    plain, _ = tp.export(model)
    assert not any(isinstance(m, (tp.MaskedLinear, tp.MaskedEmbeddingBagCollection)) for m in plain.modules())
    counted = fc_flops(plain).forward  # plain nn.Linear: its shape is all there is to count
    assert counted / dense <= budget
    assert counted == fc_flops(model).forward  # the masks and the exported shapes agree
    removed = pruner.allocation()
    assert all(k < n for k, n in removed.values())  # every layer keeps a group
    assert pruner.history and pruner.history[-1]["flops"] <= budget


def test_proximal_step_and_dual_updates_follow_the_paper():
    torch.manual_seed(0)
    model = wrapped_mlp([4, 6, 5, 1])
    config = UMECConfig(budget=0.5, eta1=0.1, eta2=0.05, eta3=0.1, eta4=2.0)
    pruner = UMECPruner(model, config)
    modules = dict(model.named_modules())
    pruner.u = torch.tensor([2.5 / 6, 1.2 / 5])  # ceil(s) = 3 and 2
    pruner.y = torch.tensor([1.0, 0.5])
    pruner.z = torch.tensor([0.3, 0.0])
    before = pruner.groups.norms().split([layer.size for layer in pruner.layers])
    weights = [modules[f"{i}"].weight.detach().clone() for i in (0, 2, 4)]
    biases = [modules[f"{i}"].bias.detach().clone() for i in (0, 2, 4)]
    counts = pruner.counts()
    assert counts == [3, 2]
    resources = pruner.resource.evaluate(
        pruner.resource.profiles([torch.argsort(n, stable=True) for n in before]), counts
    )
    pruner.update()
    # the ceil(s) smallest groups (row and bias of a neuron, and the column reading it) are shrunk by
    # 1 / (1 + 2 eta1 y); everything else is left as it is
    factors = []
    for b, k, y in zip(before, counts, [1.0, 0.5], strict=True):
        f = torch.ones_like(b)
        f[torch.argsort(b, stable=True)[:k]] = 1.0 / (1.0 + 2 * config.eta1 * y)
        factors.append(f)
    ones = torch.ones(1)
    rows = [factors[0], factors[1], ones]
    cols = [torch.ones(4), factors[0], factors[1]]
    for i, (w, bias) in enumerate(zip(weights, biases, strict=True)):
        layer = modules[f"{2 * i}"]
        assert torch.allclose(layer.weight, w * rows[i].unsqueeze(1) * cols[i].unsqueeze(0), rtol=1e-6)
        assert torch.allclose(layer.bias, bias * rows[i], rtol=1e-6)
    # z ascends on the resource excess; y on the squared norm of the ceil(s) smallest groups
    assert pruner.z[0] == pytest.approx(max(0.0, 0.3 + 2.0 * (resources[0] - 0.5)), rel=1e-5)
    assert pruner.z[1] == 0.0
    assert all(y > y0 for y, y0 in zip(pruner.y.tolist(), [1.0, 0.5], strict=True))


def test_s_rises_while_over_budget_and_falls_when_sparsity_dominates():
    torch.manual_seed(0)
    model = wrapped_mlp([4, 6, 5, 1])
    pruner = UMECPruner(model, UMECConfig(budget=0.3))
    pruner.z = torch.tensor([5.0, 0.0])  # resource pressure, no sparsity pressure: remove more
    pruner.update()
    assert torch.all(pruner.s > 0)
    pruner = UMECPruner(model, UMECConfig(budget=1.0))
    pruner.u = torch.full((2,), 0.5)
    pruner.y = torch.tensor([10.0, 10.0])  # within budget: z stays 0, the sparsity term pulls s down
    s0 = pruner.s.clone()
    pruner.update()
    assert torch.all(pruner.s < s0)


def test_finalize_removes_more_groups_until_the_budget_holds():
    model = dlrm()
    pruner = UMECPruner(model, UMECConfig(budget=0.2))
    pruner.finalize(StepContext(model=model, optimizers=[]))  # s = 0: the minimax never ran
    assert fc_flops(model).forward / fc_flops(model).dense_forward <= 0.2
    assert sum(k for k, _ in pruner.allocation().values()) > 0


def test_bytes_budget_is_a_second_resource():
    model = dlrm()
    pruner = UMECPruner(model, UMECConfig(budget=1.0, bytes_budget=0.5))
    pruner.finalize([])
    plain, _ = tp.export(model)
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    assert size <= 0.5 * pruner.resource.dense_bytes


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, math.nan, math.inf, True])
def test_budget_outside_the_unit_interval_is_refused(budget):
    with pytest.raises(ValueError, match=r"--budget\) must be a fraction of the dense model in \(0, 1\]"):
        UMECConfig(budget=budget)


def test_budget_below_the_smallest_model_is_refused_before_training():
    model = dlrm()
    with pytest.raises(ValueError, match=r"below the smallest model that keeps one group per layer"):
        UMECPruner(model, UMECConfig(budget=0.01))


def test_a_model_with_closed_masks_or_without_groups_is_refused():
    model = dlrm()
    tp.prune_(model.get_submodule(TOP), neuron_mask=torch.arange(16) > 0)
    with pytest.raises(ValueError, match="structured masks are open"):
        UMECPruner(model, UMECConfig(budget=0.5))
    single = tp.wrap(nn.Sequential(nn.Linear(4, 1)))
    with pytest.raises(ValueError, match="no group to remove"):
        UMECPruner(single, UMECConfig(budget=0.5))


def test_state_dict_round_trip_continues_identically():
    model = dlrm()
    pruner = run_umec(model, 0.5, steps=4)
    fresh = UMECPruner(dlrm(), UMECConfig(budget=0.5, phase_steps=4, eta4=100.0, record_every=5))
    fresh.load_state_dict(pruner.state_dict())
    assert torch.equal(fresh.s, pruner.s) and torch.equal(fresh.y, pruner.y)
    assert fresh.removed == pruner.removed and fresh.finalized
    other = UMECPruner(wrapped_mlp([4, 6, 5, 1]), UMECConfig(budget=0.5))
    with pytest.raises(ValueError):
        other.load_state_dict(pruner.state_dict())


def test_resource_neighbours_equal_a_full_evaluation():
    model = dlrm()
    pruner = UMECPruner(model, UMECConfig(budget=0.5, bytes_budget=0.9))
    resource, generator = pruner.resource, torch.Generator().manual_seed(0)
    for _ in range(50):
        profiles = resource.profiles(
            [torch.randperm(layer.size, generator=generator) for layer in pruner.layers]
        )
        ks = [int(torch.randint(layer.size, (1,), generator=generator)) for layer in pruner.layers]
        now, afters = resource.around(profiles, ks)
        assert now == resource.evaluate(profiles, ks)
        for i, (layer, k) in enumerate(zip(pruner.layers, ks, strict=True)):
            one_more = [*ks[:i], k + 1, *ks[i + 1 :]]
            assert afters[i] == (resource.evaluate(profiles, one_more) if k + 1 < layer.size else now)


def test_tables_are_tiled_into_one_buffer_read_in_place_and_train_as_before():
    """UMEC lays the unsharded tables end to end in one buffer (as a table-batched kernel holds them):
    the Parameters keep identity and values, an optimizer built before keeps training them exactly as
    without tiling, the column norms are read in place and equal the table-by-table sums, and the
    proximal step shrinks a column of every table."""
    model, untouched = dlrm(), dlrm()
    ebc = model.get_submodule(EBC)
    params = dict(ebc.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    pruner = UMECPruner(model, UMECConfig(budget=0.5, phase_steps=10))
    groups = pruner.groups
    assert dict(ebc.named_parameters()) == params  # the same objects
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == 1
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name])
    dims = next(i for i, layer in enumerate(pruner.layers) if layer.kind == "dims")
    first = groups.offsets[dims]
    bottom = model.get_submodule("model.dense_arch.model._mlp.2._linear")
    expected = sum(p.detach().square().sum(0) for p in params.values())
    expected = expected + bottom.weight.detach().square().sum(1) + bottom.bias.detach().square()
    expected = expected + model.get_submodule(TOP).weight.detach()[:, :4].square().sum(0)
    torch.testing.assert_close(groups.norms()[first : first + 4], expected, rtol=1e-5, atol=1e-6)
    assert all(span is not None and span[0] is not None for span in groups._spans.values())  # in place
    factor = torch.ones(groups.size)
    factor[first + 2] = 0.5
    groups.shrink_(factor, {dims})
    for name, p in params.items():
        assert torch.equal(p.detach()[:, 2], 0.5 * before[name][:, 2])
        assert torch.equal(p.detach()[:, [0, 1, 3]], before[name][:, [0, 1, 3]])
    groups.shrink_(1 / factor, {dims})  # halving and doubling are exact: the untouched model's weights
    other = torch.optim.Adagrad(untouched.parameters(), lr=0.05)
    batch = next(iter(stream().batches(64)))
    for m, opt in ((model, optimizer), (untouched, other)):
        for _ in range(3):
            opt.zero_grad()
            m(batch)[0].backward()
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), untouched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
