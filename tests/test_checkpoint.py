"""DCP checkpoints of wrapped models in a single process (no process group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_prune.distributed.checkpoint import (
    CheckpointMismatchError,
    is_mask_key,
    load_checkpoint,
    save_checkpoint,
)
from torchrec_prune.masks import MaskedEmbeddingBagCollection, MaskedLinear, masked_modules, prune_, wrap
from torchrec_prune.models.dlrm import DLRMConfig, build_dlrm

CONFIG = DLRMConfig(num_sparse=3, num_embeddings=50, embedding_dim=4, dense_arch=[8, 4], over_arch=[8, 1])


def make_batch(batch_size: int = 8) -> Batch:
    lengths = torch.randint(1, 3, (CONFIG.num_sparse * batch_size,))
    return Batch(
        dense_features=torch.randn(batch_size, CONFIG.num_dense),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            CONFIG.feature_names, torch.randint(0, CONFIG.num_embeddings, (int(lengths.sum()),)), lengths
        ),
        labels=torch.randint(0, 2, (batch_size,)).float(),
    )


def pruned_model() -> torch.nn.Module:
    model = wrap(build_dlrm(CONFIG))
    layers = [m for _, m in masked_modules(model) if isinstance(m, MaskedLinear)]
    neurons = torch.tensor([True, False, True, True, False, True, True, True])
    prune_(layers[0], neuron_mask=neurons)
    prune_(layers[1], input_mask=neurons)
    prune_(layers[2], weight_mask=torch.rand(layers[2].weight.shape) > 0.5)
    ebc = next(m for _, m in masked_modules(model) if isinstance(m, MaskedEmbeddingBagCollection))
    prune_(ebc, dim_masks={"t_cat_1": torch.tensor([True, False, True, True])})
    prune_(ebc, feature_gate=torch.tensor([True, True, False]))
    return model


def test_round_trip_restores_weights_masks_and_outputs(tmp_path: Path) -> None:
    model = pruned_model()
    save_checkpoint(model, tmp_path / "ckpt")
    torch.manual_seed(1)
    fresh = wrap(build_dlrm(CONFIG))
    batch = make_batch()
    fresh(batch)  # caches the all-open mask structure, which the load must invalidate
    saved = model.state_dict()
    assert any(not torch.equal(saved[k], v) for k, v in fresh.state_dict().items() if is_mask_key(k))

    load_checkpoint(fresh, tmp_path / "ckpt")

    loaded = fresh.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert sum(is_mask_key(k) for k in saved) == 3 * 4 + 1 + CONFIG.num_sparse
    assert torch.equal(model(batch)[1][1], fresh(batch)[1][1])
    layer = next(m for _, m in masked_modules(fresh) if isinstance(m, MaskedLinear))
    assert layer.is_structured()


def test_checkpoint_of_a_different_model_names_keys_and_both_shapes(tmp_path: Path) -> None:
    save_checkpoint(pruned_model(), tmp_path / "ckpt")
    wider = DLRMConfig(num_sparse=3, num_embeddings=50, embedding_dim=4, dense_arch=[16, 4], over_arch=[8, 1])
    other = wrap(build_dlrm(wider))
    before = {k: v.clone() for k, v in other.state_dict().items()}

    with pytest.raises(ValueError) as info:
        load_checkpoint(other, tmp_path / "ckpt")

    assert isinstance(info.value, CheckpointMismatchError)
    message = str(info.value)
    layer = "model.dense_arch.model._mlp.0._linear"
    assert (
        f"'{layer}.weight' of module '{layer}': checkpoint has shape (8, 13) float32, "
        "model has shape (16, 13) float32"
    ) in message
    assert f"mask '{layer}.neuron_mask' of module '{layer}': checkpoint has shape (8,) bool" in message
    assert {m.key for m in info.value.mismatches} == {
        f"{layer}.{name}" for name in ("weight", "bias", "weight_mask", "neuron_mask")
    } | {f"model.dense_arch.model._mlp.1._linear.{name}" for name in ("weight", "weight_mask", "input_mask")}
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing was loaded


def test_unexpected_mask_keys_are_named(tmp_path: Path) -> None:
    # The other direction, a plain checkpoint into a wrapped model, loads: tests/test_plain_checkpoints.py.
    save_checkpoint(pruned_model(), tmp_path / "wrapped")

    with pytest.raises(CheckpointMismatchError) as unexpected:
        load_checkpoint(build_dlrm(CONFIG), tmp_path / "wrapped")

    gate = "model.sparse_arch.embedding_bag_collection.feature_gate"
    assert f"mask '{gate}'" in str(unexpected.value) and "but not in the model" in str(unexpected.value)
    # Weights of the inner EBC moved from `<ebc>.embedding_bags...` to `<ebc>.ebc.embedding_bags...`.
    assert {is_mask_key(m.key) for m in unexpected.value.mismatches} == {True, False}
    assert "was one model not wrapped" in str(unexpected.value)
    dim_mask = "model.sparse_arch.embedding_bag_collection.dim_masks.t_cat_0"
    assert next(m for m in unexpected.value.mismatches if m.key == dim_mask).module == (
        "model.sparse_arch.embedding_bag_collection"
    )


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint"):
        load_checkpoint(wrap(build_dlrm(CONFIG)), tmp_path / "absent")
