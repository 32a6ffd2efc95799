"""Compaction: a structured-masked model becomes a physically smaller plain TorchRec model (SPEC 3).

``export`` removes what the masks close and nothing else, so the plain model computes what the masked
one computes:

- a closed neuron whose column is closed in the Linear that reads it (``neuron_successors``, as
  structured pruners and UMEC close them): the row and the column go;
- in a TorchRec DLRM with the dot interaction (``DLRMLayout``): gated-off features leave the
  ``EmbeddingBagCollection`` (a table whose features are all gated goes with them) and their dot
  products leave the top MLP's first Linear; embedding columns closed in *every* table, with the same
  outputs of the bottom MLP, leave every table, the bottom MLP and the top MLP's dense columns;
- in a model that concatenates the pooled embeddings into a Linear's input (``ConcatLayout``, found
  by running ``probe``): gated-off features and each table's own closed columns leave the collection
  and the Linear's matching input columns, so tables keep different dimensions;
- everything else that is masked (element masks, a closed neuron whose reader keeps the column) stays
  in place as exact zeros.

The result holds only torch and torchrec modules (``nn.Linear``, ``EmbeddingBagCollection``, DLRM's own
archs rebuilt for the new sizes), so ``torch.save`` of it loads where torchrec_prune is not installed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torchrec.models.dlrm import InteractionArch, SparseArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import Perceptron

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection, MaskedEmbeddings
from torchrec_prune.masks.layout import ConcatLayout, DLRMLayout, concat_layouts, dlrm_layouts, run_in_eval
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.wrap import _refuse_sharded, masked_modules

EXPORT_FORMAT = 1


@dataclasses.dataclass
class _Plan:
    """What to remove: rows and columns per Linear, and the new shape of each DLRM's embeddings."""

    rows: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    cols: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    features: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # EBC -> kept features
    dims: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # EBC -> kept columns
    # concatenated EBC -> (kept features, kept columns per kept table)
    concat: dict[str, tuple[list[str], dict[str, list[int]]]] = dataclasses.field(default_factory=dict)

    def remove(self, kind: str, fqn: str, indices) -> None:
        getattr(self, kind).setdefault(fqn, set()).update(int(i) for i in indices)


def export(
    model: nn.Module, probe: Callable[[nn.Module], object] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A compacted plain copy of a structured-masked model and the mapping from new to old indices.

    ``model`` is left as it is. The mapping (plain Python values) gives, per Linear, the kept ``rows``
    and ``cols`` (old indices, in new order), and per embedding collection the kept ``features``
    (names, in order), the dropped ones, and the kept embedding ``columns`` (per table for a
    concatenating model).

    ``probe``: one call of the model on an example batch, e.g. ``lambda m: m(dense, kjt)``, for models
    other than DLRM with embedding masks: it shows which Linear reads the pooled embeddings
    (``concat_layouts``), and the exported model must give the masked model's outputs on it (within
    rtol 1e-5, atol 1e-6), or export is refused: the model reads the embeddings somewhere else too.

    Raises:
        TypeError: the model is DMP-sharded (load its checkpoint into an unsharded wrapped model first).
        ValueError: nothing structured to remove; embedding masks where the model's reading of the
            embeddings is unknown (neither TorchRec's DLRM with the dot interaction nor, with ``probe``,
            a concatenation into one Linear); columns closed in some DLRM tables but not all (the dot
            products need one dimension for every table and for the bottom MLP's output); every feature
            of a collection gated off; outputs that differ from the masked model's on ``probe``.

    Example::

        plain, mapping = export(model)  # a DLRM, or: export(model, probe=lambda m: m(dense, kjt))
        save_exported(plain, mapping, "model.pt")
        # anywhere with torch and torchrec: torch.load("model.pt", weights_only=False)["model"]
    """
    _refuse_sharded(model)
    modules = dict(model.named_modules())
    plan = _Plan()
    _plan_neurons(model, plan)
    layouts = {layout.ebc: layout for layout in dlrm_layouts(model)}
    concats: dict[str, ConcatLayout] | None = None  # found on the probe once, where first needed
    for fqn, module in masked_modules(model):
        if not isinstance(module, MaskedEmbeddings):
            continue
        if fqn in layouts:
            _plan_dlrm(layouts[fqn], modules, plan)
            continue
        if all(bool(m.all()) for m in module.mask_buffers().values()):
            continue
        if concats is None and probe is not None:
            concats = {layout.ebc: layout for layout in concat_layouts(model, probe)}
        if fqn not in (concats or {}):
            raise ValueError(
                f"cannot export {fqn!r}: it has features gated off or embedding columns closed, and export "
                "removes those only where it knows how the model reads the embeddings: TorchRec's DLRM "
                "with the dot interaction, or (given probe=, a call of the model on an example batch) a "
                "model that concatenates the pooled embeddings into one Linear's input; open them, or "
                "bake them in as zeros with torchrec_prune.unwrap"
            )
        _plan_concat(concats[fqn], modules, plan)
    removed = sum(len(v) for v in (*plan.rows.values(), *plan.cols.values()))
    removed += sum(len(layouts[f].features) - len(kept) for f, kept in plan.features.items())
    if not removed:
        raise ValueError(
            "nothing structured to remove: no closed neuron whose input is closed in the next layer, no "
            "gated-off feature and no embedding column closed in every table of a DLRM (element masks "
            "alone are baked in as zeros by torchrec_prune.unwrap)"
        )
    plain = copy.deepcopy(model)
    plain_modules = dict(plain.named_modules())
    mapping: dict[str, Any] = {"format": EXPORT_FORMAT, "linears": {}, "embeddings": {}}
    for fqn, layout in layouts.items():
        mapping["embeddings"][fqn] = _rebuild_dlrm(layout, plain_modules, plan)
    for fqn, module in list(masked_modules(plain)):
        if isinstance(module, MaskedLinear):
            new, kept = _compact_linear(module, plan.rows.get(fqn, set()), plan.cols.get(fqn, set()))
            mapping["linears"][fqn] = kept
        elif fqn in layouts:
            continue  # already replaced with its DLRM's sparse arch
        elif fqn in plan.concat:
            assert isinstance(module, MaskedEmbeddingBagCollection)
            features, columns = plan.concat[fqn]
            new = _plain_ebc(module, features, columns)
            mapping["embeddings"][fqn] = {
                "features": features,
                "dropped_features": [f for f in module.feature_names if f not in features],
                "tables": list(columns),
                "columns": columns,
            }
        else:
            new = module.inner  # every mask open (checked above)
        _replace(plain, fqn, new)
    plain.train(model.training)
    if plan.concat:
        assert probe is not None
        _check_outputs(model, plain, probe)
    return plain, mapping


def _plan_neurons(model: nn.Module, plan: _Plan) -> None:
    from torchrec_prune.pruners.structured import neuron_successors  # pruners build on masks

    modules = dict(model.named_modules())
    for producer, consumer in neuron_successors(model).items():
        p, c = modules[producer], modules[consumer]
        gone = torch.nonzero(~p.neuron_mask.cpu() & ~c.input_mask.cpu()).squeeze(1).tolist()
        plan.remove("rows", producer, gone)
        plan.remove("cols", consumer, gone)


def _plan_dlrm(layout: DLRMLayout, modules: dict[str, nn.Module], plan: _Plan) -> None:
    ebc = modules[layout.ebc]
    assert isinstance(ebc, MaskedEmbeddingBagCollection)
    gate = ebc.feature_gate.cpu()
    index = {name: i for i, name in enumerate(ebc.feature_names)}
    kept = [f for f, name in enumerate(layout.features) if bool(gate[index[name]])]
    if not kept:
        raise ValueError(f"cannot export {layout.ebc!r}: every feature is gated off (DLRM needs one)")
    live = [t for t in ebc.table_names if any(bool(gate[index[f]]) for f in _features_of(ebc, t))]
    closed = {t: set(torch.nonzero(~ebc.dim_mask(t).cpu()).squeeze(1).tolist()) for t in live}
    common = set.intersection(*closed.values())
    uneven = next((t for t in live if closed[t] != common), None)
    if uneven is not None:
        raise ValueError(
            f"cannot export {layout.ebc!r}: DLRM's dot interaction needs one embedding dimension for every "
            f"table and for the output of {layout.bottom_last!r}, but table {uneven!r} closes columns "
            f"{sorted(closed[uneven])} while columns {sorted(common)} are closed in every table; export "
            "removes a column only when every table closes it (common-dimension reduction)"
        )
    bottom = modules[layout.bottom_last]
    open_outputs = [k for k in sorted(common) if bool(bottom.neuron_mask[k])]
    if open_outputs:
        raise ValueError(
            f"cannot export {layout.ebc!r}: columns {open_outputs} are closed in every table but outputs "
            f"{open_outputs} of {layout.bottom_last!r} are open, and DLRM's dot interaction needs one "
            "dimension for both; close those outputs too (UMEC's dims groups close both)"
        )
    dims = [k for k in range(layout.dim) if k not in common]
    plan.remove("rows", layout.bottom_last, common)
    top = modules[layout.top_first]
    keep = set(layout.kept_columns(kept, dims).tolist())
    plan.remove("cols", layout.top_first, [c for c in range(top.in_features) if c not in keep])
    plan.features[layout.ebc] = kept
    plan.dims[layout.ebc] = dims


def _plan_concat(layout: ConcatLayout, modules: dict[str, nn.Module], plan: _Plan) -> None:
    """Remove gated features and each table's closed columns from the block ``layout.linear`` reads."""
    ebc = modules[layout.ebc]
    assert isinstance(ebc, MaskedEmbeddingBagCollection)
    gate = ebc.feature_gate.cpu()
    index = {name: i for i, name in enumerate(ebc.feature_names)}
    columns = {t: torch.nonzero(ebc.dim_mask(t).cpu()).squeeze(1).tolist() for t in ebc.table_names}
    kept = [f for f, t, _ in layout.blocks if bool(gate[index[f]]) and columns[t]]
    if not kept:
        raise ValueError(f"cannot export {layout.ebc!r}: every feature is gated off or has no open column")
    order = [f for config in ebc.embedding_bag_configs() for f in config.feature_names if f in kept]
    if order != kept:
        raise ValueError(
            f"cannot export {layout.ebc!r}: its output orders features {kept}, a plain collection of its "
            f"tables would order them {order}, and {layout.linear!r} reads them in the first order"
        )
    for i, (feature, table, _) in enumerate(layout.blocks):
        block = layout.columns(i)
        gone = block if feature not in kept else [c for k, c in enumerate(block) if k not in columns[table]]
        plan.remove("cols", layout.linear, gone)
    tables = {ebc.table_of(f) for f in kept}
    plan.concat[layout.ebc] = (kept, {t: columns[t] for t in ebc.table_names if t in tables})


@torch.no_grad()
def _plain_ebc(
    masked: MaskedEmbeddingBagCollection, features: list[str], columns: dict[str, list[int]]
) -> EmbeddingBagCollection:
    """A plain collection of ``masked``'s tables that have one of ``features``, each table keeping its
    ``columns`` (in order) and only those features."""
    weights = masked.inner.state_dict()
    configs, tables = [], {}
    for config in masked.embedding_bag_configs():
        names = [f for f in config.feature_names if f in features]
        if not names:
            continue
        cols = columns[config.name]
        configs.append(dataclasses.replace(config, embedding_dim=len(cols), feature_names=names))
        tables[config.name] = weights[masked.weight_key(config.name)][:, cols]
    device = next(iter(tables.values())).device
    ebc = EmbeddingBagCollection(tables=configs, is_weighted=masked.inner.is_weighted(), device=device)
    for name, weight in tables.items():
        ebc.embedding_bags[name].weight.copy_(weight)
    return ebc


@torch.no_grad()
def _check_outputs(model: nn.Module, plain: nn.Module, probe: Callable[[nn.Module], object]) -> None:
    """Refuse an export whose outputs on ``probe`` differ from the masked model's."""
    masked = _tensors(run_in_eval(model, probe))
    try:
        compacted = _tensors(run_in_eval(plain, probe))
    except Exception as e:  # the user's forward on the smaller modules: any failure is a refusal
        problem = f"fails on it ({type(e).__name__}: {e})"
    else:
        problem = _difference(masked, compacted)
    if problem is not None:
        raise ValueError(
            f"cannot export: on the probe batch the compacted model {problem}; the model reads the "
            "embeddings somewhere other than the Linear whose input holds them, so their columns and "
            "features cannot be removed"
        )


def _tensors(output: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _difference(masked: list[torch.Tensor], compacted: list[torch.Tensor]) -> str | None:
    """How ``compacted`` differs from ``masked`` beyond rtol 1e-5 / atol 1e-6, or ``None``."""
    if len(masked) != len(compacted):
        return f"returns {len(compacted)} tensors where the masked model returns {len(masked)}"
    for a, b in zip(masked, compacted, strict=True):
        if a.shape != b.shape:
            return f"differs from the masked model's on it (shapes {a.shape} and {b.shape})"
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            return f"differs from the masked model's on it (largest difference {(a - b).abs().max().item()})"
    return None


def _features_of(ebc: MaskedEmbeddingBagCollection, table: str) -> list[str]:
    return [f for f in ebc.feature_names if ebc.table_of(f) == table]


@torch.no_grad()
def _rebuild_dlrm(layout: DLRMLayout, modules: dict[str, nn.Module], plan: _Plan) -> dict[str, Any]:
    """Give the (copied) DLRM a plain EBC of the kept features and columns and matching archs."""
    masked = modules[layout.ebc]
    assert isinstance(masked, MaskedEmbeddingBagCollection)
    kept_names = [layout.features[f] for f in plan.features[layout.ebc]]
    dims = plan.dims[layout.ebc]
    ebc = _plain_ebc(masked, kept_names, {t: dims for t in masked.table_names})
    configs = ebc.embedding_bag_configs()
    dlrm = modules[layout.dlrm]
    dlrm.sparse_arch = SparseArch(ebc)
    dlrm.inter_arch = InteractionArch(num_sparse_features=len(kept_names))
    return {
        "features": kept_names,
        "dropped_features": [f for f in layout.features if f not in kept_names],
        "tables": [c.name for c in configs],
        "columns": dims,
    }


@torch.no_grad()
def _compact_linear(layer: MaskedLinear, rows: set[int], cols: set[int]) -> tuple[nn.Linear, dict]:
    keep_rows = [r for r in range(layer.out_features) if r not in rows]
    keep_cols = [c for c in range(layer.in_features) if c not in cols]
    weight = layer.effective_weight()[keep_rows][:, keep_cols]
    plain = nn.Linear(len(keep_cols), len(keep_rows), bias=layer.bias is not None, device=weight.device)
    plain = plain.to(weight.dtype)
    plain.weight.copy_(weight)
    bias = layer.effective_bias()
    if bias is not None:
        plain.bias.copy_(bias[keep_rows])
    return plain, {"rows": keep_rows, "cols": keep_cols}


def _replace(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, attr = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
    if isinstance(parent, Perceptron) and isinstance(new, nn.Linear):
        parent._in_size, parent._out_size = new.in_features, new.out_features


def save_exported(model: nn.Module, mapping: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``{"model": model, "mapping": mapping}`` with ``torch.save`` (by one rename).

    Loading needs torch and torchrec only: ``torch.load(path, weights_only=False)["model"]`` (the file
    holds pickled module classes: load files you trust).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save({"model": model, "mapping": mapping}, tmp)
    os.replace(tmp, path)


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, mapping)`` from a file written by ``save_exported``."""
    saved = torch.load(path, weights_only=False)
    return saved["model"], saved["mapping"]
