"""``wrap()``: swap a model's Linears and EmbeddingBagCollections for mask-aware versions, in place."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_prune.masks.embedding import MaskedEmbeddingBagCollection
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.selection import FqnSelection, is_exact

MaskedModule = MaskedLinear | MaskedEmbeddingBagCollection


@dataclass
class WrapConfig(FqnSelection):
    """Which modules ``wrap()`` replaces.

    Args:
        include: fnmatch patterns over module FQNs; a module is wrapped when it matches one of them.
        exclude: patterns that veto ``include``.
        linear: wrap ``nn.Linear`` modules (including those inside TorchRec's ``MLP``/``Perceptron``).
        embedding_bags: wrap ``EmbeddingBagCollection`` modules.
    """

    linear: bool = True
    embedding_bags: bool = True


def wrap(model: nn.Module, config: WrapConfig | None = None) -> nn.Module:
    """Replace, in place, every selected ``nn.Linear`` and ``EmbeddingBagCollection`` by a mask-aware one.

    Parameters are shared, not copied, so a model on ``meta`` stays on ``meta`` (wrap before DMP) and an
    optimizer built earlier keeps working. Model code is unchanged: the wrappers are called the same way.
    Wrapping twice is a no-op for modules already wrapped.

    Raises:
        TypeError: when a module selected by name in ``config.include`` (no wildcard) is neither a Linear
            nor an EmbeddingBagCollection, or when the model holds no supported module at all.
    """
    config = config or WrapConfig()
    modules = dict(model.named_modules())
    for pattern in config.include:
        if is_exact(pattern) and pattern in modules:
            _check_supported(pattern, modules[pattern])
    replacements: list[tuple[str, nn.Module]] = []
    skip_under: list[str] = []
    for fqn, module in modules.items():
        if any(fqn.startswith(prefix + ".") for prefix in skip_under):
            continue
        if isinstance(module, MaskedModule):
            skip_under.append(fqn)
            continue
        if not fqn or not config.selects(fqn):
            continue
        if config.embedding_bags and type(module) is EmbeddingBagCollection:
            replacements.append((fqn, MaskedEmbeddingBagCollection(module)))
            skip_under.append(fqn)
        elif config.linear and type(module) is nn.Linear:
            replacements.append((fqn, MaskedLinear.from_linear(module)))
    if not replacements and not skip_under:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise TypeError(
            f"cannot wrap {type(model).__name__}: no selected torch.nn.Linear or torchrec "
            f"EmbeddingBagCollection in it (module types found: {found})"
        )
    for fqn, new in replacements:
        parent_name, _, attr = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model


def masked_modules(model: nn.Module) -> Iterator[tuple[str, MaskedModule]]:
    """Yield ``(fqn, module)`` for every mask-aware module, also inside a DMP-wrapped model."""
    for fqn, module in model.named_modules():
        if isinstance(module, MaskedModule):
            yield fqn, module


def _check_supported(fqn: str, module: nn.Module) -> None:
    if isinstance(module, MaskedModule) or type(module) in (nn.Linear, EmbeddingBagCollection):
        return
    raise TypeError(
        f"cannot wrap module {fqn!r} of type {type(module).__name__}: supported types are "
        "torch.nn.Linear (also inside torchrec MLP/Perceptron) and torchrec EmbeddingBagCollection"
    )
