"""Train a structured-sparse phase on physically smaller layers.

While neuron and input masks stay put (a sparse phase of grow/prune), the masked forward of a
``MaskedLinear`` gathers the kept block of the full weight every step, scatters its output into a
full-width tensor of zeros, and the optimizer sweeps every closed row: at batch 128 that costs more than
the smaller matmul saves. ``compact_`` swaps each parameter's data for its kept block (the ``Parameter``
objects stay, so optimizers, DDP hooks, FQNs and hooks that hold layers stay valid), slices the
per-element optimizer state the same way, and lets consecutive compacted layers pass narrow activations
to each other, so a step costs what a model of the kept sizes costs. ``expand_`` scatters weights and
state back into the full tensors held meanwhile: closed entries come back exactly as they left (zero
weights, kept biases, their old state), so growing after it is the same as growing the masked model.

Under DMP with more than one rank, DDP's buckets are sized by the parameters it was built over, so both
directions rebuild it (``rebuild_data_parallel``) on every rank at the same step. Masks must not change
while compacted (``set_masks_`` refuses); ``state_dict()`` writes full-size weights meanwhile, and
``expanded(model)`` gives the full parameters and optimizer state for a checkpoint.

Example::

    prune_neurons(model, 0.7, scores, [optimizer])
    compact_(model, [optimizer])  # train the kept sub-network
    ...
    expand_(model)
    grow_neurons(model, [optimizer])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.modules.mlp import MLP, Perceptron

from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.train.optimizer_state import element_states


@dataclass
class CompactLayer:
    """A compacted ``MaskedLinear``: the kept block it trains and the full tensors it holds back.

    Args:
        rows: kept output rows (the neuron mask's open entries).
        cols: kept input columns.
        gather_input: the input arrives full width and the kept columns are taken from it.
        scatter_output: the output leaves full width (zeros at closed neurons), for a reader that is not
            compacted with matching columns.
        full_weight: the full weight, current outside the kept block.
        full_bias: the full bias, current at closed neurons.
        optimizers: the optimizers whose state was sliced.
        full_state: full per-element optimizer state by (parameter name, optimizer index, key).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    gather_input: bool
    scatter_output: bool
    full_weight: torch.Tensor
    full_bias: torch.Tensor | None
    optimizers: list[torch.optim.Optimizer]
    full_state: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)

    def block(self, full: torch.Tensor) -> torch.Tensor:
        """The kept block of a weight-shaped (2-D) or bias-shaped (1-D) tensor, as a new tensor."""
        rows = full.index_select(0, self.rows)
        return rows.index_select(1, self.cols) if full.dim() == 2 else rows

    @torch.no_grad()
    def put_back(self, full: torch.Tensor, block: torch.Tensor) -> None:
        """Write ``block`` into its place in ``full``."""
        if full.dim() == 2:
            full[self.rows.unsqueeze(1), self.cols.unsqueeze(0)] = block
        else:
            full[self.rows] = block


def compacted_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    """The compacted ``MaskedLinear`` layers of ``model`` by FQN."""
    return {
        fqn: m for fqn, m in model.named_modules() if isinstance(m, MaskedLinear) and m.compacted is not None
    }


@torch.no_grad()
def compact_(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> list[str]:
    """Compact every ``MaskedLinear`` with a closed neuron or input; returns their FQNs.

    Layers that hold a closed element mask or capture effective-weight gradients (AUX) keep the masked
    forward: their sparsity is not a block. Collective under DMP with more than one rank (DDP rebuild).
    """
    optimizers = list(optimizers)
    chosen = {
        fqn: layer
        for fqn, layer in model.named_modules()
        if isinstance(layer, MaskedLinear) and layer.compacted is None and _compactable(layer)
    }
    if not chosen:
        return []
    index = {id(layer): layer.active_indices() for layer in chosen.values()}
    narrow = [
        (id(src), id(dst))
        for src, dst in _narrow_links(model)
        if id(src) in index and id(dst) in index and torch.equal(index[id(src)][0], index[id(dst)][1])
    ]
    narrow_out, narrow_in = {src for src, _ in narrow}, {dst for _, dst in narrow}
    for layer in chosen.values():
        rows, cols = index[id(layer)]
        gather = cols.numel() < layer.in_features and id(layer) not in narrow_in
        scatter = rows.numel() < layer.out_features and id(layer) not in narrow_out
        _compact_layer(layer, rows, cols, gather, scatter, optimizers)
    _rebuild_data_parallel(model)
    return sorted(chosen)


@torch.no_grad()
def expand_(model: nn.Module) -> list[str]:
    """Give every compacted layer of ``model`` its full parameters and optimizer state back; their FQNs.

    Collective under DMP with more than one rank (DDP rebuild).
    """
    layers = compacted_layers(model)
    for layer in layers.values():
        _expand_layer(layer)
    if layers:
        _rebuild_data_parallel(model)
    return sorted(layers)


@contextmanager
def expanded(model: nn.Module) -> Iterator[None]:
    """Full-size parameters and optimizer state inside the block (e.g. to save a checkpoint), the kept
    blocks again after it. Shapes come back as they were, so DDP is not rebuilt: nothing is collective."""
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear) and m.compacted is not None]
    with torch.no_grad():
        held = [_expand_layer(layer) for layer in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, compact in zip(layers, held, strict=True):
                _slice_into(layer, compact)
                layer.compacted = compact


def _compactable(layer: MaskedLinear) -> bool:
    if layer.weight.is_meta or layer.capture_effective_grad or layer.element_mask() is not None:
        return False
    return layer.is_structured()


def _compact_layer(
    layer: MaskedLinear,
    rows: torch.Tensor,
    cols: torch.Tensor,
    gather: bool,
    scatter: bool,
    optimizers: list[torch.optim.Optimizer],
) -> None:
    bias = layer.bias
    compact = CompactLayer(
        rows=rows,
        cols=cols,
        gather_input=gather,
        scatter_output=scatter,
        full_weight=layer.weight.data,
        full_bias=None if bias is None else bias.data,
        optimizers=optimizers,
    )
    _slice_into(layer, compact)
    layer.compacted = compact


def _params(layer: MaskedLinear) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in (("weight", layer.weight), ("bias", layer.bias)) if p is not None]


def _slice_into(layer: MaskedLinear, compact: CompactLayer) -> None:
    """Point the parameters and their per-element optimizer state at kept blocks of the full tensors."""
    for name, param in _params(layer):
        full = compact.full_weight if name == "weight" else compact.full_bias
        assert full is not None
        for entry in element_states(compact.optimizers, param, full.shape):
            compact.full_state[(name, entry.optimizer, entry.key)] = entry.holder[entry.key]
            entry.holder[entry.key] = compact.block(entry.holder[entry.key])
        param.grad = None  # a gradient of the old shape (or a view into an old DDP bucket)
        param.data = compact.block(full)


def _expand_layer(layer: MaskedLinear) -> CompactLayer:
    """Write the kept blocks back into the full tensors and make those current again; the layer is then
    not compacted, and the record it held is returned."""
    compact = layer.compacted
    assert compact is not None
    for name, param in _params(layer):
        full = compact.full_weight if name == "weight" else compact.full_bias
        assert full is not None
        for entry in element_states(compact.optimizers, param, param.shape):
            whole = compact.full_state.pop((name, entry.optimizer, entry.key), None)
            if whole is None:  # state created while compacted (e.g. Adam's, at its first step)
                whole = torch.full_like(full, entry.initial)
            compact.put_back(whole, entry.holder[entry.key])
            entry.holder[entry.key] = whole
        compact.put_back(full, param.data)
        param.grad = None
        param.data = full
    layer.compacted = None
    return compact


def _narrow_links(model: nn.Module) -> list[tuple[MaskedLinear, MaskedLinear]]:
    """``(producer, reader)`` Linears of ``nn.Sequential`` chains whose activations pass between them
    untouched column by column through modules without parameters or buffers (ReLU, dropout, functional
    activations), so a narrow output can feed a narrow input. A batch norm in between needs full width."""
    from torchrec_prune.pruners.structured import _ELEMENTWISE, _end_linear

    links = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq)
        main = [i for i, c in enumerate(children) if not isinstance(c, _ELEMENTWISE)]
        for i, j in zip(main, main[1:], strict=False):
            src, dst = _end_linear(children[i], last=True), _end_linear(children[j], last=False)
            if not (isinstance(src, MaskedLinear) and isinstance(dst, MaskedLinear)):
                continue
            tail, head = _around(children[i], last=True), _around(children[j], last=False)
            if tail is None or head is None:
                continue
            if all(_stateless(m) for m in [*tail, *children[i + 1 : j], *head]):
                links.append((src, dst))
    return links


def _around(module: nn.Module, last: bool) -> list[nn.Module] | None:
    """Modules between ``module``'s boundary and the Linear that ends (``last``) or starts it; ``None``
    where that path is not a plain chain."""
    if isinstance(module, nn.Linear):
        return []
    if isinstance(module, Perceptron):
        activation = module._activation_fn
        return [activation] if last and isinstance(activation, nn.Module) else []
    if isinstance(module, MLP):
        return _around(module._mlp, last)
    if isinstance(module, nn.Sequential):
        from torchrec_prune.pruners.structured import _ELEMENTWISE

        children = list(module)
        main = [i for i, c in enumerate(children) if not isinstance(c, _ELEMENTWISE)]
        if not main:
            return None
        k = main[-1] if last else main[0]
        inner = _around(children[k], last)
        if inner is None:
            return None
        return [*inner, *children[k + 1 :]] if last else [*children[:k], *inner]
    return None


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def _rebuild_data_parallel(model: nn.Module) -> None:
    from torchrec_prune.distributed.dmp import rebuild_data_parallel

    rebuild_data_parallel(model)
