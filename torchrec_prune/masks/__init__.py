"""Mask-aware modules, ``wrap()`` and the prune/grow primitives."""

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.surgery import apply_masks_, grow_, prune_, set_masks_
from torchrec_prune.masks.wrap import WrapConfig, masked_modules, wrap

__all__ = [
    "MaskedEmbeddingBagCollection",
    "MaskedLinear",
    "WrapConfig",
    "apply_masks_",
    "grow_",
    "masked_modules",
    "prune_",
    "set_masks_",
    "wrap",
]
