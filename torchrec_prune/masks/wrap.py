"""``wrap()``: swap a model's Linears and embedding collections for mask-aware versions, in place."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    EmbeddingCollection,
    EmbeddingCollectionInterface,
)
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from torchrec_prune.masks.embedding import (
    MaskedEmbeddingBagCollection,
    MaskedEmbeddingCollection,
    MaskedEmbeddings,
)
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.selection import FqnSelection, is_exact

MaskedModule = MaskedLinear | MaskedEmbeddings
SUPPORTED = (
    "torch.nn.Linear (also inside torchrec MLP/Perceptron), torchrec EmbeddingBagCollection (and its "
    "subclasses), FusedEmbeddingBagCollection and EmbeddingCollection (and its subclasses)"
)


class UnwrappedModuleWarning(UserWarning):
    """``wrap()`` left out a selected module that holds parameters: they train but are never masked."""


@dataclass
class WrapConfig(FqnSelection):
    """Which modules ``wrap()`` replaces.

    Args:
        include: fnmatch patterns over module FQNs; a module is wrapped when it matches one of them.
        exclude: patterns that veto ``include`` (also silences the report of a module left out).
        linear: wrap ``nn.Linear`` modules (including those inside TorchRec's ``MLP``/``Perceptron``).
        embedding_bags: wrap ``EmbeddingBagCollection`` (and subclass) and ``FusedEmbeddingBagCollection``
            modules.
        embeddings: wrap ``EmbeddingCollection`` (and subclass) modules.
        strict: raise instead of warning when a selected module that holds parameters is left out.
    """

    linear: bool = True
    embedding_bags: bool = True
    embeddings: bool = True
    strict: bool = False


def wrap(model: nn.Module, config: WrapConfig | None = None) -> nn.Module:
    """Replace, in place, every selected Linear and embedding collection by a mask-aware one.

    Parameters are shared, not copied, so a model on ``meta`` stays on ``meta`` (wrap before DMP) and an
    optimizer built earlier keeps working. Model code is unchanged: the wrappers are called the same way.
    Wrapping twice is a no-op for modules already wrapped. Every selected module that holds parameters
    but has no mask-aware version (DCN's ``LowRankCrossNet``, a LayerNorm, a Linear subclass, an
    ``nn.Embedding``, another embedding module) is reported by FQN and type in one
    ``UnwrappedModuleWarning``: its parameters train but no pruner can touch them.

    Raises:
        TypeError: the model is already sharded (wrap first, then shard); a module selected by name in
            ``config.include`` (no wildcard) has no mask-aware version; the model holds no supported
            module at all; or, with ``config.strict``, a selected module holding parameters is left out.

    Example::

        model = DLRM_DCN(ebc, dense_in_features=13, dense_arch_layer_sizes=[16, 8],
                         over_arch_layer_sizes=[16, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
        wrap(model, WrapConfig(exclude=["inter_arch.crossnet"]))  # the cross net is left out knowingly
    """
    config = config or WrapConfig()
    _refuse_sharded(model)
    modules = dict(model.named_modules())
    for pattern in config.include:
        if is_exact(pattern) and pattern in modules:
            _check_supported(pattern, modules[pattern])
    replacements: list[tuple[str, nn.Module]] = []
    left_out: list[tuple[str, nn.Module]] = []
    skip_under: list[str] = []
    already_masked = False
    for fqn, module in modules.items():
        if any(fqn.startswith(prefix + ".") for prefix in skip_under):
            continue
        if isinstance(module, MaskedModule):
            skip_under.append(fqn)
            already_masked = True
            continue
        if not fqn or not config.selects(fqn):
            continue
        new = _masked_version(module, config)
        if new is not None:
            replacements.append((fqn, new))
            skip_under.append(fqn)
        elif _is_embedding_module(module):
            skip_under.append(fqn)  # its tables are inside: leave the whole module as it is
            if not _disabled(module, config):
                left_out.append((fqn, module))
        elif _holds_parameters(module) and not _disabled(module, config):
            left_out.append((_owner(fqn, modules), modules[_owner(fqn, modules)]))
    if not replacements and not already_masked:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise TypeError(
            f"cannot wrap {type(model).__name__}: no selected module of a supported type ({SUPPORTED}) "
            f"in it (module types found: {found})"
        )
    _report(dict(left_out), config.strict)
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


def _masked_version(module: nn.Module, config: WrapConfig) -> nn.Module | None:
    if config.linear and type(module) is nn.Linear:
        return MaskedLinear.from_linear(module)  # type: ignore[arg-type]
    if config.embedding_bags and isinstance(module, (EmbeddingBagCollection, FusedEmbeddingBagCollection)):
        return MaskedEmbeddingBagCollection(module)
    if config.embeddings and isinstance(module, EmbeddingCollection):
        return MaskedEmbeddingCollection(module)
    return None


def _disabled(module: nn.Module, config: WrapConfig) -> bool:
    """Whether the config turned off the kind of ``module`` (then leaving it out is intended)."""
    if isinstance(module, nn.Linear):
        return not config.linear
    if isinstance(module, EmbeddingBagCollectionInterface):
        return not config.embedding_bags
    if isinstance(module, EmbeddingCollectionInterface):
        return not config.embeddings
    return False


def _is_embedding_module(module: nn.Module) -> bool:
    return isinstance(
        module, (EmbeddingBagCollectionInterface, EmbeddingCollectionInterface, nn.Embedding, nn.EmbeddingBag)
    )


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _owner(fqn: str, modules: dict[str, nn.Module]) -> str:
    """The module to name for parameters held by ``fqn``: a ParameterList/Dict's owner, else itself."""
    if isinstance(modules[fqn], (nn.ParameterList, nn.ParameterDict)) and "." in fqn:
        return fqn.rpartition(".")[0]
    return fqn


def _report(left_out: dict[str, nn.Module], strict: bool) -> None:
    if not left_out:
        return
    names = ", ".join(f"{fqn!r} ({type(m).__name__})" for fqn, m in left_out.items())
    message = (
        f"wrap() leaves out {len(left_out)} module(s) holding parameters, which train but are never "
        f"masked or pruned: {names}. Supported: {SUPPORTED}; add them to WrapConfig.exclude to "
        "leave them out knowingly"
    )
    if strict:
        raise TypeError(message)
    warnings.warn(message, UnwrappedModuleWarning, stacklevel=3)


def _refuse_sharded(model: nn.Module) -> None:
    sharded = [fqn for fqn, m in model.named_modules() if isinstance(m, ShardedModule)]
    if isinstance(model, DistributedModelParallel) or sharded:
        where = f" (sharded modules: {sharded[:3]})" if sharded else ""
        raise TypeError(
            f"wrap() must run before DistributedModelParallel: the model is already sharded{where}. "
            "Wrap the unsharded model (built on meta) first, then shard it, e.g. "
            "shard(wrap(build_model(device='meta')), device)"
        )


def _check_supported(fqn: str, module: nn.Module) -> None:
    if isinstance(module, MaskedModule) or type(module) is nn.Linear:
        return
    if isinstance(module, (EmbeddingBagCollection, FusedEmbeddingBagCollection, EmbeddingCollection)):
        return
    raise TypeError(
        f"cannot wrap module {fqn!r} of type {type(module).__name__}: supported types are {SUPPORTED}"
    )
