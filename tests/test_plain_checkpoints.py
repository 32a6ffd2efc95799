"""Issue 12: a checkpoint of the unwrapped model (state dict or DCP) loads strictly into the wrapped one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import torchrec_prune as tp
from tests.test_your_model import MODELS, wrap_quietly
from torchrec_prune.distributed.checkpoint import CheckpointMismatchError, load_checkpoint
from torchrec_prune.masks import MaskedEmbeddings, masked_modules, plain_state_keys
from torchrec_prune.models.dlrm import DLRMConfig, build_dlrm

CONFIG = DLRMConfig(num_sparse=3, num_embeddings=30, embedding_dim=4, dense_arch=[8, 4], over_arch=[8, 1])


def assert_loaded(wrapped: nn.Module, plain: dict[str, torch.Tensor]) -> None:
    """Every plain tensor (tables included) equals its wrapped counterpart; every mask is open."""
    state = wrapped.state_dict()
    mapping = plain_state_keys(state)
    assert sorted(mapping.values()) == sorted(plain)
    for key, plain_key in mapping.items():
        assert torch.equal(state[key], plain[plain_key]), key
    for _, module in masked_modules(wrapped):
        masks = module.mask_buffers().values() if isinstance(module, MaskedEmbeddings) else module.buffers()
        assert all(bool(m.all()) for m in masks)


@pytest.mark.parametrize("name", ["dlrm_dcn", "embedding_collection", "deepfm"])
def test_plain_state_dict_loads_strictly_into_the_wrapped_model(name: str) -> None:
    torch.manual_seed(0)
    plain = {k: v.clone() for k, v in MODELS[name]().state_dict().items()}
    torch.manual_seed(1)
    wrapped = wrap_quietly(MODELS[name]())
    for _, module in masked_modules(wrapped):  # closed masks are opened by a plain checkpoint
        if isinstance(module, MaskedEmbeddings):
            tp.prune_(module, feature_gate=torch.zeros_like(module.feature_gate))
    wrapped.load_state_dict(plain, strict=True)
    assert_loaded(wrapped, plain)


def test_wrapped_state_dict_missing_one_mask_still_fails_strictly() -> None:
    model = tp.wrap(build_dlrm(CONFIG))
    state = model.state_dict()
    del state["model.dense_arch.model._mlp.0._linear.neuron_mask"]
    with pytest.raises(RuntimeError, match="neuron_mask"):
        model.load_state_dict(state, strict=True)


def test_plain_dcp_checkpoint_loads_into_the_wrapped_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain_model = build_dlrm(CONFIG)
    plain = {k: v.clone() for k, v in plain_model.state_dict().items()}
    dcp.save(plain_model.state_dict(), checkpoint_id=tmp_path / "plain")  # what a TorchRec user has
    torch.manual_seed(1)
    wrapped = tp.wrap(build_dlrm(CONFIG))
    load_checkpoint(wrapped, tmp_path / "plain")
    assert_loaded(wrapped, plain)


def test_plain_dcp_checkpoint_of_another_model_is_refused_by_key(tmp_path: Path) -> None:
    dcp.save(build_dlrm(CONFIG).state_dict(), checkpoint_id=tmp_path / "plain")
    other = tp.wrap(
        build_dlrm(DLRMConfig(num_sparse=3, num_embeddings=31, embedding_dim=4, dense_arch=[8, 4]))
    )
    with pytest.raises(
        CheckpointMismatchError, match=r"embedding_bags\.t_cat_0\.weight.*\(30, 4\).*\(31, 4\)"
    ):
        load_checkpoint(other, tmp_path / "plain")
