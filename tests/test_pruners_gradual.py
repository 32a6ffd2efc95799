"""Gradual MP, TP and MoP (SPEC 4): exact per-layer sparsity on a linear ramp, scores, embeddings, errors."""

import pytest
import torch
import torch.nn.functional as F
from conftest import pruner_step, wrapped_mlp
from torch import nn

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.importance import ColumnTaylor
from torchrec_prune.masks import MaskedEmbeddingBagCollection
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import (
    GradualConfig,
    LinearRamp,
    OneShot,
    Targets,
    magnitude_pruner,
    momentum_pruner,
    taylor_pruner,
    topk_mask,
)
from torchrec_prune.train.hooks import StepContext

FACTORIES = {"MP": magnitude_pruner, "TP": taylor_pruner, "MoP": momentum_pruner}


def _data(n: int = 128, d: int = 13, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] + x[:, 1] * x[:, 2] > 0).float()


def _expected_kept(n: int, sparsity: float) -> int:
    return n - int(sparsity * n + 0.5)


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_ramp_reaches_exactly_the_target_in_every_layer(method):
    model = wrapped_mlp([13, 7, 5, 1])
    cfg = GradualConfig(
        sparsity=0.63, phase_steps=6, update_every=2, targets=Targets(include_output_layer=True)
    )
    pruner = FACTORIES[method](model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx = StepContext(model=model, optimizers=[opt])
    x, y = _data()
    seen = []
    for _ in range(6):
        pruner_step(model, pruner, ctx, x, y)
        seen.append({fqn: int(layer.weight_mask.sum()) for fqn, layer in pruner.linears.items()})
    for fqn, layer in pruner.linears.items():
        n = layer.weight.numel()
        # updates at steps 2, 4 and 6 (the end of the phase), with sparsity 0.63 * step / 6
        assert [s[fqn] for s in seen] == [
            n,
            _expected_kept(n, 0.21),
            _expected_kept(n, 0.21),
            _expected_kept(n, 0.42),
            _expected_kept(n, 0.42),
            _expected_kept(n, 0.63),
        ], fqn
        assert pruner.stats()[fqn].kept == _expected_kept(n, 0.63)
        assert torch.all(layer.weight[~layer.weight_mask] == 0)
    assert pruner.finalized


def test_magnitude_keeps_the_largest_weights():
    model = wrapped_mlp([13, 16, 1])
    layer = model[0]
    before = layer.weight.detach().abs().clone()
    pruner = magnitude_pruner(model, GradualConfig(sparsity=0.75, phase_steps=1))
    pruner.after_step(StepContext(model=model, optimizers=[]))
    kept = layer.weight_mask
    assert before[kept].min() >= before[~kept].max()
    assert int(kept.sum()) == 52


def test_taylor_scores_are_accumulated_abs_gradient_times_weight():
    model = wrapped_mlp([13, 6, 1])
    layer = model[0]
    pruner = taylor_pruner(model, GradualConfig(sparsity=0.5), schedule=OneShot(3))
    ctx = StepContext(model=model, optimizers=[])  # no weight updates: the scores are easy to recompute
    expected = torch.zeros_like(layer.weight)
    weight = layer.weight.detach().clone()
    for seed in range(3):
        x, y = _data(seed=seed)
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y).backward()
        expected += (layer.weight.grad * layer.weight).abs()
        pruner.before_step(ctx)
        assert bool(layer.weight_mask.all())
        pruner.after_step(ctx)
    torch.testing.assert_close(pruner.scorer.scores(pruner.linears)["0"], expected)
    assert torch.equal(layer.weight_mask, topk_mask(expected, 39, prefer=torch.ones_like(layer.weight_mask)))
    assert torch.equal(layer.weight, weight * layer.weight_mask)


def test_momentum_can_regrow_a_pruned_weight_at_zero_in_the_adaptation_variant():
    model = wrapped_mlp([4, 3, 1])
    layer = model[0]
    cfg = GradualConfig(sparsity=0.5, phase_steps=1, reselect_every_samples=100)
    pruner = momentum_pruner(model, cfg, w1=0.5, w2=0.5, decay=0.5)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    ctx = StepContext(model=model, optimizers=[opt])
    x = torch.randn(64, 4)
    pruner_step(model, pruner, ctx, x, (x[:, 0] > 0).float())
    assert int(layer.weight_mask.sum()) == 6 and not pruner.finalized
    # Labels that depend only on input 3 give the pruned weights of column 3 a large momentum; the
    # re-selection after 100 samples brings some back, at exactly zero with fresh Adagrad state.
    closed_before = ~layer.weight_mask.clone()
    pruner_step(model, pruner, ctx, x, (x[:, 3] > 0).float())
    assert torch.equal(~layer.weight_mask, closed_before)  # 64 samples: no re-selection yet
    pruner_step(model, pruner, ctx, x, (x[:, 3] > 0).float())
    regrown = closed_before & layer.weight_mask
    assert regrown[:, 3].any() and int(layer.weight_mask.sum()) == 6
    assert torch.all(layer.weight[regrown] == 0)
    assert torch.all(opt.state[layer.weight]["sum"][regrown] == 0)


def test_pruned_weights_stay_zero_during_fine_tuning_with_sgd_momentum():
    model = wrapped_mlp([13, 16, 8, 1])
    pruner = taylor_pruner(model, GradualConfig(sparsity=0.8, phase_steps=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ctx = StepContext(model=model, optimizers=[opt])
    x, y = _data()
    for _ in range(4):
        pruner_step(model, pruner, ctx, x, y)
    closed = {fqn: ~layer.weight_mask.clone() for fqn, layer in pruner.linears.items()}
    for _ in range(25):
        pruner_step(model, pruner, ctx, x, y)
    for fqn, layer in pruner.linears.items():
        assert torch.equal(~layer.weight_mask, closed[fqn])
        assert torch.all(layer.weight[closed[fqn]] == 0), fqn
        assert torch.all(opt.state[layer.weight]["momentum_buffer"][closed[fqn]] == 0)


def test_topk_breaks_ties_deterministically_preferring_open_entries():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, float("nan")])
    assert topk_mask(scores, 3).tolist() == [True, True, False, False, True, False]
    prefer = torch.tensor([False, False, True, True, False, True])
    assert topk_mask(scores, 3, prefer).tolist() == [False, False, True, True, True, False]


def test_schedules():
    ramp = LinearRamp(phase_steps=5, update_every=2)
    assert [ramp.progress(s) for s in range(1, 7)] == [None, 0.4, None, 0.8, 1.0, None]
    assert OneShot(3).progress(3) == 1.0 and OneShot(3).progress(2) is None
    with pytest.raises(ValueError, match="LinearRamp.update_every"):
        LinearRamp(5, 0)


def _dlrm_batches():
    stream = SyntheticStream(256, num_dense=3, num_sparse=3, num_embeddings=20, seed=1)
    return list(stream.batches(64))


def _small_dlrm():
    return tp.wrap(
        build_dlrm(
            DLRMConfig(
                num_dense=3,
                num_sparse=3,
                num_embeddings=20,
                embedding_dim=8,
                dense_arch=[8],
                over_arch=[8, 1],
            )
        )
    )


def test_magnitude_prunes_embedding_columns_with_the_smallest_norms():
    model = _small_dlrm()
    ebc = model.model.sparse_arch.embedding_bag_collection
    weights = {name: w.detach().clone() for name, w in ebc.ebc.embedding_bags.named_parameters()}
    pruner = magnitude_pruner(model, GradualConfig(sparsity=0.5, phase_steps=1, embedding_sparsity=0.25))
    pruner.after_step(StepContext(model=model, optimizers=[]))
    for table in ("t_cat_0", "t_cat_1", "t_cat_2"):
        mask = ebc.dim_mask(table)
        norms = weights[f"{table}.weight"].norm(dim=0)
        assert int(mask.sum()) == 6
        assert norms[mask].min() >= norms[~mask].max()
        assert torch.all(ebc.ebc.embedding_bags[table].weight[:, ~mask] == 0)
    assert pruner.stats()["model.sparse_arch.embedding_bag_collection.dim_masks.t_cat_0"].kept == 6


def test_column_taylor_is_squared_first_order_change_of_the_pooled_columns():
    model = _small_dlrm()
    ebc = model.model.sparse_arch.embedding_bag_collection
    scorer = ColumnTaylor()
    scorer.attach({"ebc": ebc})
    expected = torch.zeros(8)
    batches = _dlrm_batches()[:2]
    for batch in batches:
        pooled = ebc(batch.sparse_features)
        values = pooled.values()
        values.retain_grad()
        weights = torch.randn_like(values)
        (values * weights).sum().backward()
        column = pooled.keys().index("cat_1")
        expected += (weights * values.detach())[:, column * 8 : (column + 1) * 8].sum(0).square()
        scorer.observe({"ebc": ebc})
    scores = scorer.scores({"ebc": ebc})
    torch.testing.assert_close(scores[("ebc", "t_cat_1")], expected / 2)
    scorer.close()
    assert not ebc._forward_hooks


def test_taylor_prunes_embedding_columns_inside_a_training_loop():
    model = _small_dlrm()
    ebc = model.model.sparse_arch.embedding_bag_collection
    pruner = taylor_pruner(model, GradualConfig(sparsity=0.5, phase_steps=4, embedding_sparsity=0.5))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    ctx = StepContext(model=model, optimizers=[opt])
    for batch in _dlrm_batches():
        opt.zero_grad(set_to_none=True)
        model(batch)[0].backward()
        pruner.before_step(ctx)
        opt.step()
        pruner.after_step(ctx)
    assert pruner.finalized and not ebc._forward_hooks
    assert all(int(ebc.dim_mask(t).sum()) == 4 for t in ("t_cat_0", "t_cat_1", "t_cat_2"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "embedding_sparsity": 1.5}, "embedding_sparsity"),
        ({"sparsity": 0.5, "phase_steps": 0}, "phase_steps"),
        ({"sparsity": 0.5, "update_every": 1.5}, "update_every"),
        ({"sparsity": 0.5, "reselect_every_samples": 0}, "reselect_every_samples"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GradualConfig.{field} must be"):
        GradualConfig(**kwargs)


def test_bad_momentum_weights_and_unsupported_combinations():
    model = wrapped_mlp([4, 4, 1])
    with pytest.raises(ValueError, match="Momentum.w1 \\+ Momentum.w2 must be > 0"):
        momentum_pruner(model, GradualConfig(sparsity=0.5), w1=0.0, w2=0.0)
    with pytest.raises(ValueError, match="Momentum.decay must be in"):
        momentum_pruner(model, GradualConfig(sparsity=0.5), decay=1.0)
    with pytest.raises(ValueError, match="MoP does not score embedding columns"):
        momentum_pruner(_small_dlrm(), GradualConfig(sparsity=0.5, embedding_sparsity=0.5))
    with pytest.raises(ValueError, match="no MaskedEmbeddingBagCollection"):
        magnitude_pruner(model, GradualConfig(sparsity=0.5, embedding_sparsity=0.5))


def test_non_mask_aware_targets_raise_type_error():
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(TypeError, match="'0' of type Linear is not mask-aware"):
        magnitude_pruner(plain, GradualConfig(sparsity=0.5))
    model = build_dlrm(
        DLRMConfig(num_dense=3, num_sparse=3, num_embeddings=20, dense_arch=[4], over_arch=[4, 1])
    )
    tp.wrap(model, tp.WrapConfig(embedding_bags=False))
    with pytest.raises(
        TypeError, match="'model.sparse_arch.embedding_bag_collection' of type EmbeddingBagCollection"
    ):
        magnitude_pruner(
            model,
            GradualConfig(
                sparsity=0.5,
                embedding_sparsity=0.5,
                targets=Targets(include=["model.sparse_arch.embedding_bag_collection", "model.dense_arch*"]),
            ),
        )
    assert not any(isinstance(m, MaskedEmbeddingBagCollection) for m in model.modules())


def test_mop_score_is_w1_rescaled_magnitude_plus_w2_rescaled_gradient_ema():
    from torchrec_prune.importance.weight import Momentum
    from torchrec_prune.masks import MaskedLinear

    layer = MaskedLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]]))
        layer.weight_mask[1, 0] = False  # a pruned weight still gathers momentum (effective gradient)
    g1 = torch.tensor([[0.3, -0.1, 0.0], [2.0, 0.2, -0.4]])
    g2 = torch.tensor([[-0.6, 0.1, 0.5], [1.0, 0.0, 0.2]])
    scorer, decay = Momentum(w1=0.8, w2=0.2, decay=0.9), 0.9
    for g in (g1, g2):
        layer.effective_grad = g
        scorer.observe({"l": layer})
    s = (1 - decay) * (decay * g1 + g2)  # EMA from zero
    theta = layer.weight.detach()
    expected = 0.8 * theta.abs() / theta.abs().mean() + 0.2 * s.abs() / s.abs().mean()
    torch.testing.assert_close(scorer.scores({"l": layer})["l"], expected)
    assert expected[1, 0] > 0  # zero weight, non-zero momentum: it can be re-selected
