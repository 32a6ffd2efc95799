"""Prune and grow primitives shared by every algorithm (SPEC 3).

``set_masks_`` is the one place where masks change: entries that close are set to exact zero, entries
that re-open start at exact zero, and both get fresh optimizer state: closed entries SPEC 3's reset,
re-opened ones the same by default or, with ``regrown_state="layer_mean"``, accumulators at the mean of the
parameter's entries that stay open (``torchrec_prune.train.optimizer_state.regrow_state_``).
``prune_``/``grow_`` are the two directions of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from torchrec_prune.masks.embedding import MaskedEmbeddings
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.wrap import masked_modules
from torchrec_prune.train.optimizer_state import check_regrown_state, renew_state_

_LINEAR_MASKS = ("weight_mask", "neuron_mask", "input_mask")


def _check_shape(owner: str, name: str, current: torch.Tensor, new: torch.Tensor) -> None:
    if tuple(new.shape) != tuple(current.shape):
        raise ValueError(
            f"{owner}: mask {name!r} must have shape {tuple(current.shape)}, got {tuple(new.shape)}"
        )


def _linear_keep(layer: MaskedLinear) -> torch.Tensor:
    return layer.kept_mask()


@torch.no_grad()
def set_linear_masks_(
    layer: MaskedLinear,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    name: str = "MaskedLinear",
    regrown_state: str = "reset",
    **masks: torch.Tensor,
) -> tuple[int, int]:
    """Set any of ``weight_mask``, ``neuron_mask``, ``input_mask``; returns (#closed, #re-opened) weights.

    ``regrown_state`` is the rule for re-opened entries' optimizer state (``regrow_state_``).
    """
    check_regrown_state("regrown_state", regrown_state)
    unknown = set(masks) - set(_LINEAR_MASKS)
    if unknown:
        raise ValueError(f"{name}: unknown masks {sorted(unknown)}; expected some of {_LINEAR_MASKS}")
    if layer.compacted is not None:
        raise RuntimeError(
            f"{name}: masks of a compacted layer cannot change; expand it first "
            "(torchrec_prune.masks.compact.expand_)"
        )
    optimizers = list(optimizers)
    before_w = _linear_keep(layer)
    before_b = layer.neuron_mask.clone()
    for key, value in masks.items():
        current = getattr(layer, key)
        _check_shape(name, key, current, value)
        current.copy_(value.to(device=current.device, dtype=torch.bool))
    after_w = _linear_keep(layer)
    layer.weight.masked_fill_((before_w ^ after_w) | ~after_w, 0.0)
    renew_state_(optimizers, layer.weight, before_w, after_w, regrown_state)
    if layer.bias is not None:
        # A closed neuron's bias is masked in the forward (its output is exactly 0) but keeps its value:
        # a regrown row starts at exactly 0, and behind a ReLU a zero row with a zero bias would never get
        # a gradient again (relu'(0) = 0). The kept bias lets the regrown neuron's signal restart.
        renew_state_(optimizers, layer.bias, before_b, layer.neuron_mask, regrown_state)
    if "weight_mask" in masks:
        layer.release_open_element_mask_()  # structured pruning never holds a per-weight mask
    return int((before_w & ~after_w).sum()), int((~before_w & after_w).sum())


def _tables(module: MaskedEmbeddings) -> list[str]:
    # The wrapper's own masks name its tables; a DMP-sharded inner collection has no configs.
    return [name for name, _ in module.dim_masks.named_buffers()]


def embedding_weight_blocks(
    module: MaskedEmbeddings,
) -> Iterator[tuple[str, torch.Tensor, int, torch.nn.Parameter | None]]:
    """Yield ``(table, block, first_column, parameter)`` for every locally held block of table weights.

    Blocks come from the collection's state dict, whose tensors are views of the live weights (for
    sharded tables and a ``FusedEmbeddingBagCollection``: of the fused kernel's weights). An unsharded
    or data-parallel table gives its whole weight, with the ``Parameter`` an optimizer holds for it (a
    ``FusedEmbeddingBagCollection``'s table with ``None``: its kernel steps it). A DMP-sharded table
    gives one block per local shard of its ``ShardedTensor``, at the shard's column offset, with
    ``parameter`` ``None`` (its optimizer is fused); a rank that holds no shard of a table gets nothing
    for it.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    fused = isinstance(module.inner, FusedEmbeddingBagCollection)
    params = {} if fused else dict(module.inner.named_parameters())
    state = module.inner.state_dict(keep_vars=True)
    for table in _tables(module):
        key = module.weight_key(table)
        weight = state.get(key)
        if isinstance(weight, ShardedTensor):
            for shard in weight.local_shards():
                yield table, shard.tensor, int(shard.metadata.shard_offsets[1]), None
        elif weight is not None:
            yield table, weight, 0, params.get(key)


def fused_state_blocks(module: MaskedEmbeddings) -> Iterator[tuple[str, str, torch.Tensor, int]]:
    """Yield ``(table, state_name, block, first_column)`` for the fused optimizer's per-element state.

    Only state with one value per weight element (exact Adagrad's sum, Adam's moments) has columns;
    per-row state (row-wise Adagrad) and per-table scalars are not yielded. Blocks are the local shards
    of a sharded collection's ``ShardedTensor`` state, or the whole state tensor of an unsharded
    ``FusedEmbeddingBagCollection``: views of the kernel's live state either way.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    fused = getattr(module.inner, "fused_optimizer", None)
    if callable(fused):  # FusedEmbeddingBagCollection has a method where sharded modules have a property
        fused = fused()
    if fused is None:
        return
    tables = set(_tables(module))
    for key, param in fused.params.items():
        table = key.rpartition(f"{module.weight_prefix}.")[2].removesuffix(".weight")
        if table not in tables:
            continue
        for state_name, value in fused.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor) or len(value.size()) != 2:
                continue
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    yield table, state_name, shard.tensor, int(shard.metadata.shard_offsets[1])
            else:
                yield table, state_name, value, 0


@torch.no_grad()
def set_embedding_masks_(
    module: MaskedEmbeddings,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    name: str = "MaskedEmbeddingBagCollection",
    dim_masks: Mapping[str, torch.Tensor] | None = None,
    feature_gate: torch.Tensor | None = None,
    regrown_state: str = "reset",
) -> tuple[int, int]:
    """Set per-table dimension masks and/or the feature gate; returns (#closed, #re-opened) columns.

    Closed and re-opened table columns are zeroed in every local block. Their optimizer state is reset
    where it has columns: per-element state of ``optimizers`` (unsharded and data-parallel tables) and
    the fused optimizer's per-element state of sharded tables (exact Adagrad, Adam: set to 0, the value
    the kernel starts from). Row-wise fused state (row-wise Adagrad's one accumulator per row) is shared
    with the row's open columns and is left as it is. ``regrown_state`` (``regrow_state_``) applies to the
    state of ``optimizers``; the fused kernel's state of re-opened columns is always 0, as its mean over a
    sharded table would take a collective.
    """
    check_regrown_state("regrown_state", regrown_state)
    optimizers = list(optimizers)
    dim_masks = dict(dim_masks or {})
    before = {table: module.dim_mask(table).clone() for table in _tables(module)}
    for table, value in dim_masks.items():
        current = module.dim_mask(table)
        _check_shape(f"{name}.dim_masks.{table}", table, current, value)
        current.copy_(value.to(device=current.device, dtype=torch.bool))
    if feature_gate is not None:
        _check_shape(name, "feature_gate", module.feature_gate, feature_gate)
        module.feature_gate.copy_(feature_gate.to(device=module.feature_gate.device, dtype=torch.bool))
    changed = {table: before[table] ^ module.dim_mask(table) for table in before}
    for table, block, col0, param in embedding_weight_blocks(module):
        touched = changed[table] | ~module.dim_mask(table)
        block[:, touched[col0 : col0 + block.shape[1]].to(block.device)] = 0.0
        if param is not None:
            before_t, after_t = before[table].to(param.device), module.dim_mask(table).to(param.device)
            renew_state_(optimizers, param, before_t.unsqueeze(0), after_t.unsqueeze(0), regrown_state)
    for table, _, block, col0 in fused_state_blocks(module):
        block[:, changed[table][col0 : col0 + block.shape[1]].to(block.device)] = 0.0
    # UVM-caching kernels serve lookups from rows cached in HBM, not from the weights written above:
    # drop the cache (state_dict() flushed it first) so the next lookup reads the zeros. A no-op for
    # kernels without a cache.
    for lookup in getattr(module.inner, "_lookups", ()):
        getattr(lookup, "module", lookup).purge()
    closed = sum(int((old & ~module.dim_mask(t)).sum()) for t, old in before.items())
    opened = sum(int((~old & module.dim_mask(t)).sum()) for t, old in before.items())
    return closed, opened


def set_masks_(
    module: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    name: str | None = None,
    regrown_state: str = "reset",
    **masks,
) -> tuple[int, int]:
    """Dispatch to the Linear or embedding variant; returns (#closed, #re-opened)."""
    label = name or type(module).__name__
    if isinstance(module, MaskedLinear):
        return set_linear_masks_(module, optimizers, name=label, regrown_state=regrown_state, **masks)
    if isinstance(module, MaskedEmbeddings):
        return set_embedding_masks_(module, optimizers, name=label, regrown_state=regrown_state, **masks)
    raise TypeError(
        f"{label}: {type(module).__name__} is not mask-aware; call torchrec_prune.wrap(model) first"
    )


def prune_(
    module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (), *, name: str | None = None, **masks
) -> int:
    """Close the entries that are ``False`` in the given masks (never re-opens); returns #closed."""
    merged = _merge(module, masks, torch.logical_and, name)
    return set_masks_(module, optimizers, name=name, **merged)[0]


def grow_(
    module: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    *,
    name: str | None = None,
    regrown_state: str = "reset",
    **masks,
) -> int:
    """Re-open the entries that are ``True`` in the given masks at exactly zero, their optimizer state
    started under ``regrown_state`` (``regrow_state_``); returns #re-opened."""
    merged = _merge(module, masks, torch.logical_or, name)
    return set_masks_(module, optimizers, name=name, regrown_state=regrown_state, **merged)[1]


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Make every masked weight an exact zero (after a load, or after an optimizer that ignores grads)."""
    for _, module in masked_modules(model):
        if isinstance(module, MaskedLinear):
            if module.compacted is not None:
                continue  # it holds its kept block only
            module.weight.mul_(_linear_keep(module))  # biases of closed neurons are kept (set_linear_masks_)
        else:
            for table, block, col0, _ in embedding_weight_blocks(module):
                keep = module.dim_mask(table)[col0 : col0 + block.shape[1]].to(block.device)
                block[:, ~keep] = 0.0


def _merge(module: nn.Module, masks: Mapping[str, object], op, name: str | None) -> dict[str, object]:
    """Combine requested masks with the current ones, checking shapes before any arithmetic."""
    merged = {}
    for key, value in _flat(masks).items():
        current = _current(module, key)
        _check_shape(name or type(module).__name__, key, current, value)
        merged[key] = op(current, value.to(device=current.device, dtype=torch.bool))
    return _unflat(merged)


def _flat(masks: Mapping[str, object]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in masks.items():
        if key == "dim_masks":
            flat.update({f"dim_masks.{t}": v for t, v in value.items()})  # type: ignore[union-attr]
        else:
            flat[key] = value  # type: ignore[assignment]
    return flat


def _unflat(flat: Mapping[str, torch.Tensor]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in flat.items():
        if key.startswith("dim_masks."):
            out.setdefault("dim_masks", {})[key.split(".", 1)[1]] = value  # type: ignore[index]
        else:
            out[key] = value
    return out


def _current(module: nn.Module, key: str) -> torch.Tensor:
    if key.startswith("dim_masks.") and isinstance(module, MaskedEmbeddings):
        return module.dim_mask(key.split(".", 1)[1])
    if isinstance(module, (MaskedLinear, MaskedEmbeddings)) and hasattr(module, key):
        return getattr(module, key)
    raise ValueError(f"{type(module).__name__} has no mask {key!r}")
