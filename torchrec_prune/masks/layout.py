"""Where a TorchRec DLRM's embedding outputs enter its MLPs, for structured compression and export.

DLRM does not feed embeddings to a Linear: its ``InteractionArch`` stacks the bottom MLP's output and
the F pooled embeddings (config order) into F + 1 vectors of one dimension D and passes the dense
vector and the pairwise dot products ``i < j`` (``triu_indices(F + 1, F + 1, 1)`` order) to the top
MLP's first Linear. So a sparse feature is read by that Linear through the F columns of the pairs it
takes part in, and an embedding column ``k`` through no column at all: it only changes dot products.
Removing feature ``f`` removes its pair columns; removing column ``k`` is possible only from every
table at once together with output ``k`` of the bottom MLP and dense column ``k`` of the top MLP's first
Linear (the dot products need one D for every vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, InteractionArch

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.linear import MaskedLinear


@dataclass(frozen=True)
class DLRMLayout:
    """The FQNs and sizes that tie a wrapped DLRM's embeddings to its Linears.

    Args:
        dlrm: FQN of the ``DLRM`` module.
        ebc: FQN of its ``MaskedEmbeddingBagCollection``.
        bottom_last: FQN of the bottom MLP's last Linear (its outputs are the dense vector).
        top_first: FQN of the top MLP's first Linear (reads dense vector and dot products).
        features: sparse feature names in interaction order.
        dim: the common embedding dimension D.
    """

    dlrm: str
    ebc: str
    bottom_last: str
    top_first: str
    features: tuple[str, ...]
    dim: int

    @property
    def num_vectors(self) -> int:
        return len(self.features) + 1

    def pairs(self) -> torch.Tensor:
        """``[2, P]`` vector indices of every dot product column (0 is the dense vector)."""
        return torch.triu_indices(self.num_vectors, self.num_vectors, offset=1)

    def pair_columns(self, feature: int) -> torch.Tensor:
        """Columns of ``top_first`` that read feature ``feature`` (index in ``features``)."""
        i, j = self.pairs()
        vector = feature + 1
        return torch.nonzero((i == vector) | (j == vector)).squeeze(1) + self.dim

    def kept_columns(self, kept_features: list[int], kept_dims: list[int]) -> torch.Tensor:
        """Columns of ``top_first`` that a DLRM with only these features and dense outputs still has, in
        the order that DLRM produces them."""
        vectors = torch.tensor([0] + [f + 1 for f in kept_features])
        keep = torch.zeros(self.num_vectors, dtype=torch.bool)
        keep[vectors] = True
        i, j = self.pairs()
        pairs = torch.nonzero(keep[i] & keep[j]).squeeze(1) + self.dim
        return torch.cat([torch.tensor(kept_dims, dtype=torch.long), pairs])


def _first_linear(module: nn.Module, last: bool) -> nn.Module | None:
    from torchrec_prune.pruners.structured import _end_linear  # the chain walk neuron pruning uses

    return _end_linear(module, last)


def dlrm_layouts(model: nn.Module) -> list[DLRMLayout]:
    """One ``DLRMLayout`` per wrapped DLRM (dot interaction) in ``model``, also under DMP.

    DLRMs whose interaction is not TorchRec's dot ``InteractionArch`` (DCN, projection) or whose
    embedding collection or MLP ends are not mask-aware are left out: their embedding outputs reach the
    MLPs in ways this layout does not describe.
    """
    fqn_of = {id(m): name for name, m in model.named_modules()}
    out = []
    for fqn, module in model.named_modules():
        if not isinstance(module, DLRM) or type(module.inter_arch) is not InteractionArch:
            continue
        ebc = module.sparse_arch.embedding_bag_collection
        bottom = _first_linear(module.dense_arch.model, last=True)
        top = _first_linear(module.over_arch.model, last=False)
        if not isinstance(ebc, MaskedEmbeddingBagCollection):
            continue
        if not (isinstance(bottom, MaskedLinear) and isinstance(top, MaskedLinear)):
            continue
        out.append(
            DLRMLayout(
                dlrm=fqn,
                ebc=fqn_of[id(ebc)],
                bottom_last=fqn_of[id(bottom)],
                top_first=fqn_of[id(top)],
                features=tuple(module.sparse_arch.sparse_feature_names),
                dim=int(module.sparse_arch.D),
            )
        )
    return out
