"""TorchRec's DLRM with the growth paper's configuration (SPEC 5), sizes set by flags."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

CRITEO_DENSE = 13
CRITEO_SPARSE = 26


@dataclass
class DLRMConfig:
    """Shape of the reference DLRM.

    Defaults are the growth paper's: embedding dim 4, bottom MLP 256-128-64-4, top MLP 256-128-1.
    ``num_embeddings`` is the hash size of every categorical table; ``feature_names`` (default
    ``cat_0 .. cat_{num_sparse-1}``) name the sparse features, one table ``t_<feature>`` each.
    """

    num_dense: int = CRITEO_DENSE
    num_sparse: int = CRITEO_SPARSE
    num_embeddings: int = 10_000
    embedding_dim: int = 4
    dense_arch: list[int] = field(default_factory=lambda: [256, 128, 64, 4])
    over_arch: list[int] = field(default_factory=lambda: [256, 128, 1])
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("num_dense", "num_sparse", "num_embeddings", "embedding_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DLRMConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.dense_arch or self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(
                f"DLRMConfig.dense_arch must end with embedding_dim={self.embedding_dim}, "
                f"got {self.dense_arch}"
            )
        if not self.over_arch or self.over_arch[-1] != 1:
            raise ValueError(f"DLRMConfig.over_arch must end with 1 (one logit), got {self.over_arch}")
        if any(s < 1 for s in self.dense_arch + self.over_arch):
            raise ValueError("DLRMConfig layer sizes must be >= 1")
        if not self.feature_names:
            self.feature_names = [f"cat_{i}" for i in range(self.num_sparse)]
        if len(self.feature_names) != self.num_sparse:
            raise ValueError(
                f"DLRMConfig.feature_names must have num_sparse={self.num_sparse} names, "
                f"got {len(self.feature_names)}"
            )


def build_dlrm(config: DLRMConfig | None = None, device: torch.device | str = "cpu") -> DLRMTrain:
    """Build ``DLRMTrain`` (DLRM + BCE loss) with one table per categorical feature.

    Use ``device="meta"`` to build for DMP, which materialises the model on each rank.
    """
    config = config or DLRMConfig()
    tables = [
        EmbeddingBagConfig(
            name=f"t_{name}",
            embedding_dim=config.embedding_dim,
            num_embeddings=config.num_embeddings,
            feature_names=[name],
        )
        for name in config.feature_names
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device))
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=config.num_dense,
        dense_arch_layer_sizes=list(config.dense_arch),
        over_arch_layer_sizes=list(config.over_arch),
        dense_device=torch.device(device),
    )
    return DLRMTrain(dlrm)
