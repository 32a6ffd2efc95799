"""BatchedEmbeddingBagCollection gives TorchRec's EmbeddingBagCollection outputs and gradients."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_prune.masks import wrap
from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.models.batched_tables import BatchedEmbeddingBagCollection


def tables(pooling: PoolingType) -> list[EmbeddingBagConfig]:
    def config(name: str, features: list[str], rows: int, dim: int) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(
            name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, pooling=pooling
        )

    # a table shared by two features, and tables of different sizes and widths
    return [config("t0", ["f0"], 11, 4), config("t1", ["f1", "g1"], 7, 4), config("t2", ["f2"], 5, 8)]


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_outputs_and_table_gradients_equal_the_unbatched_collection(pooling: PoolingType) -> None:
    torch.manual_seed(0)
    configs = tables(pooling)
    plain, batched = EmbeddingBagCollection(configs), BatchedEmbeddingBagCollection(configs)
    for config in configs:
        batched.table_weight(config.name).copy_(plain.embedding_bags[config.name].weight.detach())
    keys, batch = ["g1", "f2", "f0", "f1"], 6  # not in table order: the module permutes
    rows = {"f0": 11, "f1": 7, "g1": 7, "f2": 5}
    lengths = torch.randint(0, 4, (len(keys) * batch,))
    counts = lengths.view(len(keys), -1).sum(1).tolist()
    values = torch.cat([torch.randint(0, rows[k], (n,)) for k, n in zip(keys, counts, strict=True)])
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    want, got = plain(kjt), batched(kjt)
    assert got.keys() == want.keys()
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(want.values())
    (want.values() * weights).sum().backward()
    (got.values() * weights).sum().backward()
    for config in configs:
        expected = plain.embedding_bags[config.name].weight.grad
        torch.testing.assert_close(batched.table_grad(config.name), expected, rtol=1e-6, atol=1e-6)


def test_masks_apply_over_the_batched_collection_and_tables_are_views_of_one_parameter() -> None:
    configs = tables(PoolingType.SUM)
    masked = MaskedEmbeddingBagCollection(BatchedEmbeddingBagCollection(configs))
    batched = masked.inner
    assert batched.table_grad("t0") is None  # no backward yet
    [flat] = list(batched.parameters())
    batched.table_weight("t2").fill_(1.0)
    assert int((flat.detach() == 1.0).sum()) == 5 * 8
    masked.dim_masks.t2[:3] = False
    ids, lengths = torch.tensor([0, 1, 2, 3]), torch.ones(4, dtype=torch.long)
    kjt = KeyedJaggedTensor(keys=["f0", "f1", "g1", "f2"], values=ids, lengths=lengths)
    pooled = masked(kjt)
    assert pooled["f2"].tolist() == [[0.0] * 3 + [1.0] * 5]


def test_mixed_poolings_are_refused() -> None:
    configs = tables(PoolingType.SUM)
    configs[0] = EmbeddingBagConfig(
        name="t0", embedding_dim=4, num_embeddings=11, feature_names=["f0"], pooling=PoolingType.MEAN
    )
    with pytest.raises(ValueError, match="one pooling"):
        BatchedEmbeddingBagCollection(configs)


def test_a_shared_pool_serves_every_feature_from_the_rows_it_is_given() -> None:
    """Pool mode: ids are pool rows, whatever the feature; gradients land on those rows."""
    configs = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=1, feature_names=[f"f{i}"])
        for i in range(3)
    ]
    pool = BatchedEmbeddingBagCollection(configs, pool_rows=6)
    pool.pool_weight().copy_(torch.arange(24.0).view(6, 4))
    kjt = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"], values=torch.tensor([5, 0, 2, 5]), lengths=torch.tensor([1, 2, 1])
    )
    out = pool(kjt)
    assert out["f0"].tolist() == [[20.0, 21.0, 22.0, 23.0]]
    assert out["f1"].tolist() == [[8.0, 10.0, 12.0, 14.0]]  # rows 0 and 2 summed
    out.values().sum().backward()
    assert pool.pool_grad()[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 2.0]
    wide = [*configs, EmbeddingBagConfig(name="t9", embedding_dim=8, num_embeddings=1, feature_names=["f9"])]
    with pytest.raises(ValueError, match="one width"):
        BatchedEmbeddingBagCollection(wide, pool_rows=6)


def test_wrapped_model_keeps_its_mask_wrapper_when_the_tables_are_batched() -> None:
    from torchrec_prune.distributed.ps.trainer import _batch_tables
    from torchrec_prune.models import DLRMConfig, build_dlrm

    model = wrap(build_dlrm(DLRMConfig(num_embeddings=8)))
    batched = _batch_tables(model, pool_rows=64)
    [masked] = [m for m in model.modules() if isinstance(m, MaskedEmbeddingBagCollection)]
    assert masked.inner is batched
    assert batched.pool_weight().shape == (64, 4)
    assert not any(isinstance(m, EmbeddingBagCollection) for m in model.modules())
