"""torchrec_prune: prune and regrow the embedding and MLP layers of TorchRec models while they train."""

from torchrec_prune.masks import (
    MaskedEmbeddingBagCollection,
    MaskedEmbeddingCollection,
    MaskedLinear,
    UnwrappedModuleWarning,
    WrapConfig,
    apply_masks_,
    grow_,
    masked_modules,
    prune_,
    set_masks_,
    unwrap,
    wrap,
)
from torchrec_prune.masks.export import export, load_exported, save_exported
from torchrec_prune.numerics import count_denormals, enable_ftz_daz

__version__ = "0.1.0"

__all__ = [
    "MaskedEmbeddingBagCollection",
    "MaskedEmbeddingCollection",
    "MaskedLinear",
    "UnwrappedModuleWarning",
    "WrapConfig",
    "apply_masks_",
    "count_denormals",
    "enable_ftz_daz",
    "export",
    "grow_",
    "load_exported",
    "masked_modules",
    "prune_",
    "save_exported",
    "set_masks_",
    "unwrap",
    "wrap",
]
