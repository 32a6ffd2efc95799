"""Mask-aware modules: wrapping, compacted forward/backward, prune/grow under real optimizers."""

import pytest
import torch
from torch import nn
from torchrec.datasets.random import RandomRecDataset
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_prune as tp
from torchrec_prune.masks import MaskedEmbeddingBagCollection, MaskedLinear
from torchrec_prune.masks.surgery import set_masks_
from torchrec_prune.models import DLRMConfig, build_dlrm

SMALL = DLRMConfig(num_embeddings=50, dense_arch=[16, 8, 4], over_arch=[16, 1])


def _batch(batch_size: int = 16, num_dense: int = 13, keys: list[str] | None = None, hash_size: int = 50):
    keys = keys or [f"cat_{i}" for i in range(26)]
    ds = RandomRecDataset(
        keys=keys, batch_size=batch_size, hash_size=hash_size, ids_per_feature=2, num_dense=num_dense
    )
    return next(iter(ds))


def test_wrap_dlrm_swaps_every_linear_and_ebc_sharing_parameters():
    model = build_dlrm(SMALL)
    before = {n: p for n, p in model.named_parameters()}
    tp.wrap(model)
    kinds = [type(m).__name__ for _, m in tp.masked_modules(model)]
    assert kinds.count("MaskedEmbeddingBagCollection") == 1
    assert kinds.count("MaskedLinear") == 5
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = dict(model.named_parameters())
    # Linear parameters keep their key; EBC tables move under `.ebc` and are the same tensors.
    for name, p in before.items():
        key = name.replace("embedding_bag_collection.", "embedding_bag_collection.ebc.")
        assert after[key] is p
    loss, _ = model(_batch())
    loss.backward()
    assert torch.isfinite(loss)


def test_wrap_on_meta_device_keeps_meta_and_is_idempotent():
    model = build_dlrm(SMALL, device="meta")
    tp.wrap(model)
    tp.wrap(model)
    lin = next(m for _, m in tp.masked_modules(model) if isinstance(m, MaskedLinear))
    assert lin.weight.device.type == "meta" and lin.weight_mask.device.type == "meta"
    assert sum(1 for _ in tp.masked_modules(model)) == 6


class TwoTower(nn.Module):
    """A model that shares no attribute names with DLRM."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="users", embedding_dim=8, num_embeddings=20, feature_names=["u", "u2"]
                )
            ]
        )
        self.head = MLP(in_size=16 + 3, layer_sizes=[12, 6])
        self.logit = nn.Linear(6, 1)

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.tables(kjt).to_dict()
        return self.logit(self.head(torch.cat([pooled["u"], pooled["u2"], dense], dim=1)))


def _two_tower_input():
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["u", "u2"], values=torch.tensor([1, 2, 3, 4, 5, 6]), lengths=torch.tensor([1, 2, 1, 1, 0, 1])
    )
    return torch.randn(3, 3), kjt


def test_wrap_works_on_other_torchrec_models():
    model = TwoTower()
    dense, kjt = _two_tower_input()
    expected = model(dense, kjt)
    tp.wrap(model)
    assert torch.equal(model(dense, kjt), expected)
    assert {n for n, _ in tp.masked_modules(model)} == {
        "tables",
        "head._mlp.0._linear",
        "head._mlp.1._linear",
        "logit",
    }

    deepfm = SimpleDeepFMNN(
        num_dense_features=13,
        embedding_bag_collection=EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=50, feature_names=[f"f{i}"])
                for i in range(3)
            ]
        ),
        hidden_layer_size=8,
        deep_fm_dimension=4,
    )
    batch = _batch(keys=["f0", "f1", "f2"])
    ref = deepfm(batch.dense_features, batch.sparse_features)
    tp.wrap(deepfm)
    assert any(isinstance(m, MaskedEmbeddingBagCollection) for _, m in tp.masked_modules(deepfm))
    assert torch.allclose(deepfm(batch.dense_features, batch.sparse_features), ref)


def test_wrap_config_selects_and_rejects_unsupported():
    model = TwoTower()
    tp.wrap(model, tp.WrapConfig(include=["head.*"]))
    assert {n for n, _ in tp.masked_modules(model)} == {"head._mlp.0._linear", "head._mlp.1._linear"}
    with pytest.raises(TypeError, match=r"'head' of type MLP"):
        tp.wrap(TwoTower(), tp.WrapConfig(include=["head"]))
    with pytest.raises(TypeError, match="Conv2d"):
        tp.wrap(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(TypeError, match="list of fnmatch patterns"):
        tp.WrapConfig(include="head.*")


def test_neuron_masked_forward_and_backward_match_dense_with_rows_zeroed():
    torch.manual_seed(1)
    layer = MaskedLinear(10, 7)
    ref = nn.Linear(10, 7)
    ref.load_state_dict({"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()})
    rows = torch.tensor([True, False, True, True, False, True, False])
    cols = torch.ones(10, dtype=torch.bool)
    cols[[2, 5]] = False
    layer.neuron_mask.copy_(rows)
    layer.input_mask.copy_(cols)
    assert layer.is_structured()
    x = torch.randn(5, 10)
    out = layer(x)
    keep = rows.unsqueeze(1) & cols.unsqueeze(0)
    expected = nn.functional.linear(x, ref.weight * keep, ref.bias * rows)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad * keep)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad * rows)
    assert torch.count_nonzero(layer.weight.grad[~rows]) == 0


def _optimizers(params):
    return {
        "sgd_momentum_wd": torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
        "adagrad": torch.optim.Adagrad(params, lr=0.1, initial_accumulator_value=0.1, weight_decay=0.01),
        "adam": torch.optim.Adam(params, lr=0.01, weight_decay=0.01),
        "adamw": torch.optim.AdamW(params, lr=0.01, weight_decay=0.01),
    }


@pytest.mark.parametrize("kind", ["sgd_momentum_wd", "adagrad", "adam", "adamw"])
def test_pruned_weights_stay_zero_and_grown_restart_at_zero(kind):
    model = tp.wrap(build_dlrm(SMALL))
    optimizer = _optimizers(list(model.parameters()))[kind]
    batch = _batch()

    def steps(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad()
            model(batch)[0].backward()
            optimizer.step()

    steps(5)  # build up momentum / second moments before pruning
    layers = [m for _, m in tp.masked_modules(model) if isinstance(m, MaskedLinear)]
    ebc = next(m for _, m in tp.masked_modules(model) if isinstance(m, MaskedEmbeddingBagCollection))
    hidden = layers[0]
    neurons = torch.ones(hidden.out_features, dtype=torch.bool)
    neurons[:5] = False
    elements = torch.rand_like(hidden.weight_mask, dtype=torch.float) > 0.5
    dims = torch.tensor([True, False, True, False])
    tp.prune_(hidden, [optimizer], neuron_mask=neurons, weight_mask=elements)
    tp.prune_(ebc, [optimizer], dim_masks={"t_cat_0": dims})
    steps(30)
    closed = ~(elements & neurons.unsqueeze(1))
    assert torch.count_nonzero(hidden.weight[closed]) == 0
    x = torch.randn(4, hidden.in_features)
    assert torch.count_nonzero(hidden(x)[:, ~neurons]) == 0  # closed neurons output exactly 0
    table = ebc.ebc.embedding_bags["t_cat_0"].weight
    assert torch.count_nonzero(table[:, ~dims]) == 0

    tp.grow_(hidden, [optimizer], neuron_mask=torch.ones_like(neurons), weight_mask=torch.ones_like(elements))
    tp.grow_(ebc, [optimizer], dim_masks={"t_cat_0": torch.ones(4, dtype=torch.bool)})
    assert torch.count_nonzero(hidden.weight[closed]) == 0
    assert torch.count_nonzero(table[:, ~dims]) == 0
    init = 0.1 if kind == "adagrad" else 0.0
    for param, where in ((hidden.weight, closed), (table, (~dims).expand_as(table))):
        for key, value in optimizer.state[param].items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                assert torch.all(value[where] == init), key
    steps(1)
    assert torch.count_nonzero(hidden.weight[closed]) > 0  # re-opened weights learn again


def test_set_masks_rejects_wrong_shapes_and_plain_modules():
    layer = MaskedLinear(4, 3)
    with pytest.raises(
        ValueError, match=r"MaskedLinear: mask 'neuron_mask' must have shape \(3,\), got \(4,\)"
    ):
        set_masks_(layer, neuron_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        tp.prune_(layer, weight_mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="not mask-aware"):
        set_masks_(nn.Linear(2, 2), neuron_mask=torch.ones(2, dtype=torch.bool))
    ebc = tp.wrap(TwoTower()).tables
    with pytest.raises(KeyError, match="no table 'items'"):
        set_masks_(ebc, dim_masks={"items": torch.ones(8, dtype=torch.bool)})


def test_embedding_masks_zero_pooled_columns_and_feature_gates():
    model = TwoTower()
    tp.wrap(model)
    dense, kjt = _two_tower_input()
    pooled = model.tables(kjt)
    set_masks_(
        model.tables,
        dim_masks={"users": torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)},
        feature_gate=torch.tensor([True, False]),
    )
    masked = model.tables(kjt).to_dict()
    assert torch.count_nonzero(masked["u2"]) == 0
    assert torch.count_nonzero(masked["u"][:, [2, 7]]) == 0
    keep = [0, 1, 3, 4, 5, 6]
    assert torch.count_nonzero(masked["u"][:, keep]) > 0
    assert torch.allclose(masked["u"][:, keep] == 0, pooled.to_dict()["u"][:, keep] == 0)
