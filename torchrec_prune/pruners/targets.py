"""Which modules a pruner acts on: FQN patterns over mask-aware modules, minus the output layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.selection import FqnSelection, is_exact


@dataclass
class Targets(FqnSelection):
    """Module selection shared by every pruner.

    Args:
        include: fnmatch patterns over module FQNs. A pattern without wildcards names one module, which
            must exist and be mask-aware.
        exclude: patterns that veto ``include``.
        include_output_layer: also prune the model's final output layer (unstructured methods only).
        output_layer: FQN of the final output layer; default: the last Linear in module order (the
            logit layer of TorchRec's DLRM and of the MLP models built here).
    """

    include_output_layer: bool = False
    output_layer: str | None = None


def output_layer_fqn(model: nn.Module, override: str | None = None) -> str | None:
    """FQN of the model's final output layer (``override`` when given, checked to exist)."""
    if override is not None:
        modules = dict(model.named_modules())
        if override not in modules or not isinstance(modules[override], nn.Linear):
            raise ValueError(f"Targets.output_layer={override!r} is not a Linear module of the model")
        return override
    last = None
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = fqn
    return last


def _not_mask_aware(owner: str, fqn: str, module: nn.Module) -> TypeError:
    return TypeError(
        f"{owner}: module {fqn!r} of type {type(module).__name__} is not mask-aware; pruners act on "
        "MaskedLinear and MaskedEmbeddingBagCollection modules (call torchrec_prune.wrap(model) first)"
    )


def _select(model: nn.Module, targets: Targets, kind: type, plain: tuple[type, ...], owner: str) -> dict:
    modules = dict(model.named_modules())
    output = output_layer_fqn(model, targets.output_layer)
    for pattern in targets.include:
        if not is_exact(pattern):
            continue
        if pattern not in modules:
            raise ValueError(
                f"{owner}: Targets.include names {pattern!r}, which is not a module of the model"
            )
        module = modules[pattern]
        if not isinstance(module, (MaskedLinear, MaskedEmbeddingBagCollection)):
            raise _not_mask_aware(owner, pattern, module)
        if pattern == output and not targets.include_output_layer and isinstance(module, kind):
            raise ValueError(
                f"{owner}: {pattern!r} is the model's final output layer; set "
                "Targets.include_output_layer=True to prune it (unstructured methods only)"
            )
    selected: dict = {}
    unwrapped: list[tuple[str, nn.Module]] = []
    for fqn, module in modules.items():
        if not fqn or not targets.selects(fqn):
            continue
        if isinstance(module, kind):
            if fqn == output and not targets.include_output_layer:
                continue
            selected[fqn] = module
        elif type(module) in plain and not _inside_wrapper(fqn, modules):
            unwrapped.append((fqn, module))
    if not selected and unwrapped:
        raise _not_mask_aware(owner, *unwrapped[0])
    return selected


def _inside_wrapper(fqn: str, modules: dict[str, nn.Module]) -> bool:
    parts = fqn.split(".")
    return any(
        isinstance(modules.get(".".join(parts[:i])), MaskedEmbeddingBagCollection)
        for i in range(1, len(parts))
    )


def select_linears(model: nn.Module, targets: Targets, owner: str) -> dict[str, MaskedLinear]:
    """The ``MaskedLinear`` modules selected by ``targets``, by FQN.

    Raises:
        TypeError: a module named exactly in ``include`` is not mask-aware, or the patterns match only
            plain (unwrapped) Linears.
        ValueError: an exact name is not a module, or names the output layer without
            ``include_output_layer``, or nothing is selected.
    """
    selected = _select(model, targets, MaskedLinear, (nn.Linear,), owner)
    if not selected:
        raise ValueError(
            f"{owner}: no MaskedLinear matches include={targets.include} exclude={targets.exclude}"
        )
    return selected


def select_embeddings(
    model: nn.Module, targets: Targets, owner: str
) -> dict[str, MaskedEmbeddingBagCollection]:
    """The ``MaskedEmbeddingBagCollection`` modules selected by ``targets`` (possibly none)."""
    return _select(model, targets, MaskedEmbeddingBagCollection, (EmbeddingBagCollection,), owner)
