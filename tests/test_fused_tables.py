"""One process holds its tables in ``FusedEmbeddingBagCollection`` modules: the same state, keys and
surgery as a one-rank DMP replica, and checkpoints that move between the two."""

import pytest
import torch
from conftest import local_tensor
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.distributed.dmp import one_process_group
from torchrec_prune.distributed.fused_tables import fuse_tables, table_optimizer
from torchrec_prune.distributed.run_checkpoint import RunCheckpointer
from torchrec_prune.masks.surgery import embedding_weight_blocks, set_masks_
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.train.job import sharding_config
from torchrec_prune.train.replica import DMPReplicaFactory, FusedReplicaFactory, LocalReplicaFactory, Replica
from torchrec_prune.train.trainer import TrainConfig, default_forward

TINY = DLRMConfig(num_embeddings=500, dense_arch=[32, 16, 4], over_arch=[32, 1])
SHARDING = sharding_config(TrainConfig(lr=0.05))
EBC = "model.sparse_arch.embedding_bag_collection"


def _train(replica: Replica, rows: int = 256, seed: int = 0) -> None:
    for batch in SyntheticStream(rows, num_embeddings=TINY.num_embeddings, seed=seed).batches(64):
        for optimizer in replica.optimizers:
            optimizer.zero_grad()
        default_forward(replica.model, batch)[0].backward()
        for optimizer in replica.optimizers:
            optimizer.step()


def _fused_state(replica: Replica) -> dict[str, torch.Tensor]:
    state = table_optimizer(replica.model).state_dict()["state"]
    return {f"{key}/{name}": local_tensor(v) for key, entries in state.items() for name, v in entries.items()}


def test_fuse_tables_keeps_weights_outputs_and_state_dict_keys():
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(SyntheticStream(64, num_embeddings=500, seed=1).batches(64))
    expected = default_forward(model, batch)[1]
    fused = fuse_tables(model, SHARDING)
    assert isinstance(fused.model.sparse_arch.embedding_bag_collection.ebc, FusedEmbeddingBagCollection)
    after = fused.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(default_forward(fused, batch)[1], expected)


def test_fused_tables_expose_dmp_state_keys_and_checkpoints_move_both_ways(tmp_path):
    """A one-process run checkpoint of either kind (fused tables, or the one-rank DMP of earlier
    releases) loads into the other with every weight and optimizer tensor equal."""
    torch.manual_seed(0)
    with one_process_group():
        dmp_factory = DMPReplicaFactory(
            lambda: build_dlrm(TINY, device="meta"), torch.device("cpu"), SHARDING
        )
        fused_factory = FusedReplicaFactory(lambda: build_dlrm(TINY), SHARDING)
        for source, target in ((fused_factory, dmp_factory), (dmp_factory, fused_factory)):
            trained, fresh = source.build(), target.build()
            _train(trained)
            assert _fused_state(trained).keys() == _fused_state(fresh).keys()
            assert any(bool((v > 0).any()) for v in _fused_state(trained).values())
            checkpointer = RunCheckpointer(tmp_path / type(source).__name__)
            checkpointer.save(256, {"model": trained}, {}, {})
            checkpointer.load_replicas(checkpointer.latest(), {"model": fresh})
            for key, value in trained.model.state_dict().items():
                assert torch.equal(local_tensor(fresh.model.state_dict()[key]), local_tensor(value)), key
            loaded = _fused_state(fresh)
            assert all(torch.equal(loaded[k], v) for k, v in _fused_state(trained).items())
            (mine,), (theirs,) = fresh.optimizers, trained.optimizers
            for name, param in theirs.params.items():
                for key, value in theirs.state[param].items():
                    assert torch.equal(mine.state[mine.params[name]][key], value), name
            # and both keep training alike from there
            _train(trained, seed=2)
            _train(fresh, seed=2)
            for key, value in trained.model.state_dict().items():
                torch.testing.assert_close(local_tensor(fresh.model.state_dict()[key]), local_tensor(value))


def test_closing_a_table_column_zeroes_the_kernel_weights_and_state():
    torch.manual_seed(0)
    replica = FusedReplicaFactory(lambda: build_dlrm(TINY), SHARDING).build()
    _train(replica)
    module = replica.model.model.sparse_arch.embedding_bag_collection
    assert all(param is None for *_, param in embedding_weight_blocks(module))
    mask = torch.ones(TINY.embedding_dim, dtype=torch.bool)
    mask[1] = False
    set_masks_(module, replica.optimizers, dim_masks={"t_cat_0": mask})
    weight = module.ebc.embedding_bags["t_cat_0"].weight
    assert not weight[:, 1].any() and weight[:, 0].any()
    state = _fused_state(replica)[f"{EBC}.ebc.embedding_bags.t_cat_0.weight/t_cat_0.momentum1"]
    assert not state[:, 1].any() and state[:, 0].any()
    # the kernel reads the zeroed weights: the inner collection's own output has the column at 0
    batch = next(SyntheticStream(64, num_embeddings=500, seed=1).batches(64))
    (feature,) = module.ebc.embedding_bag_configs()[0].feature_names
    pooled = module.ebc(batch.sparse_features).to_dict()[feature]
    assert not pooled[:, 1].any() and pooled[:, 0].any()


def test_copies_of_fused_replicas_share_no_state():
    torch.manual_seed(0)
    factory = FusedReplicaFactory(lambda: build_dlrm(TINY), SHARDING)
    source, copy = factory.build(), factory.build()
    _train(source)
    factory.copy_(copy, source)
    assert all(torch.equal(_fused_state(copy)[k], v) for k, v in _fused_state(source).items())
    _train(source, seed=3)  # training the source leaves the copy as it was
    assert not all(torch.equal(_fused_state(copy)[k], v) for k, v in _fused_state(source).items())
    key = f"{EBC}.ebc.embedding_bags.t_cat_0.weight"
    assert not torch.equal(copy.model.state_dict()[key], source.model.state_dict()[key])


def test_deep_copies_of_fused_tables_are_refused_with_the_factory_to_use():
    """A deep copy's table ``Parameter``s no longer view its kernel's weights, so its training would be
    lost from its state dict."""
    model = fuse_tables(tp.wrap(build_dlrm(TINY)), SHARDING)
    with pytest.raises(ValueError, match="FusedReplicaFactory"):
        LocalReplicaFactory(model, lambda m: [])
