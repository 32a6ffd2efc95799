"""Mask-aware modules, ``wrap()``/``unwrap()`` and the prune/grow primitives."""

from torchrec_prune.masks.embedding import (
    MaskedEmbeddingBagCollection,
    MaskedEmbeddingCollection,
    MaskedEmbeddings,
)
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.surgery import apply_masks_, grow_, prune_, set_masks_
from torchrec_prune.masks.unwrap import plain_state_keys, unwrap
from torchrec_prune.masks.wrap import UnwrappedModuleWarning, WrapConfig, masked_modules, wrap

__all__ = [
    "MaskedEmbeddingBagCollection",
    "MaskedEmbeddingCollection",
    "MaskedEmbeddings",
    "MaskedLinear",
    "UnwrappedModuleWarning",
    "WrapConfig",
    "apply_masks_",
    "grow_",
    "masked_modules",
    "plain_state_keys",
    "prune_",
    "set_masks_",
    "unwrap",
    "wrap",
]
