"""Where embedding outputs enter a model's MLPs, for structured compression and export: TorchRec's DLRM
(dot interaction), and models that concatenate the pooled embeddings into a Linear's input.

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

from collections.abc import Callable
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


@dataclass(frozen=True)
class ConcatLayout:
    """A wrapped ``EmbeddingBagCollection`` whose pooled output, ``KeyedTensor.values()`` (every feature's
    columns one after the other), enters one Linear as a contiguous block of its input columns: the
    layout of models that concatenate dense features and embeddings into an MLP. Each table's columns
    are then free to shrink on their own (no interaction ties the dimensions together).

    Args:
        ebc: FQN of the ``MaskedEmbeddingBagCollection``.
        linear: FQN of the ``MaskedLinear`` reading the block.
        first: input column of ``linear`` where the block starts.
        blocks: ``(feature, table, dim)`` per feature, in the order of the block.
    """

    ebc: str
    linear: str
    first: int
    blocks: tuple[tuple[str, str, int], ...]

    def columns(self, feature: int) -> range:
        """Columns of ``linear`` that read feature ``blocks[feature]``."""
        start = self.first + sum(dim for _, _, dim in self.blocks[:feature])
        return range(start, start + self.blocks[feature][2])


@torch.no_grad()
def concat_layouts(model: nn.Module, probe: Callable[[nn.Module], object]) -> list[ConcatLayout]:
    """The ``ConcatLayout`` of every wrapped embedding bag collection whose output ``probe(model)`` (one
    forward on an example batch) feeds to exactly one ``MaskedLinear`` as a block of its input, found by
    value: the Linear's input columns equal the collection's output, exactly, at one offset only. Runs
    in eval mode; collections whose output is all zeros on the probe, or found at no or several places,
    are left out.
    """
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for fqn, module in model.named_modules():
        if isinstance(module, MaskedEmbeddingBagCollection):
            handles.append(module.register_forward_hook(_keep_output(outputs, fqn, module)))
        elif isinstance(module, MaskedLinear):
            handles.append(module.register_forward_pre_hook(_keep_input(inputs, fqn)))
    try:
        run_in_eval(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for ebc, (values, blocks) in outputs.items():
        if not bool(values.ne(0).any()):
            continue
        width = values.shape[1]
        found = [
            (linear, start)
            for linear, x in inputs.items()
            if x.dim() == 2 and x.shape[0] == values.shape[0]
            for start in range(x.shape[1] - width + 1)
            if torch.equal(x[:, start : start + width], values)
        ]
        if len(found) == 1:
            out.append(ConcatLayout(ebc, found[0][0], found[0][1], blocks))
    return out


def run_in_eval(model: nn.Module, probe: Callable[[nn.Module], object]) -> object:
    """``probe(model)`` with ``model`` in eval mode (no dropout; batch norm on its running statistics),
    its mode given back after."""
    training = model.training
    model.eval()
    try:
        return probe(model)
    finally:
        model.train(training)


def _keep_output(store: dict, fqn: str, module: MaskedEmbeddingBagCollection) -> Callable:
    def hook(_module: nn.Module, _args: tuple, output: object) -> None:
        keys, dims = output.keys(), output.length_per_key()  # type: ignore[attr-defined]
        blocks = tuple((k, module.table_of(k), d) for k, d in zip(keys, dims, strict=True))
        store[fqn] = (output.values().detach(), blocks)  # type: ignore[attr-defined]

    return hook


def _keep_input(store: dict, fqn: str) -> Callable:
    def hook(_module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            store[fqn] = args[0].detach()

    return hook
