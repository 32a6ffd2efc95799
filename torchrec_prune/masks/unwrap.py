"""Back to plain TorchRec: ``unwrap()`` bakes the masks into the weights, ``plain_state_keys`` maps keys.

A pruned model is served or fine-tuned by code that knows nothing of this package: the plain model
must compute what the masked one computes. Closed weight entries and embedding columns become zeros;
a closed neuron's bias, kept by ``prune_`` for regrowth (see ``docs/design.md``), is zeroed, since the
masked forward outputs exactly 0 for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from torchrec_prune.masks.embedding import MaskedEmbeddings
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.masks.surgery import embedding_weight_blocks
from torchrec_prune.masks.wrap import _refuse_sharded, masked_modules

_LINEAR_MASKS = (".weight_mask", ".neuron_mask", ".input_mask")


def unwrap(model: nn.Module) -> nn.Module:
    """Turn ``model`` back into plain modules, in place (as ``wrap`` did), with every mask baked in.

    ``MaskedLinear`` becomes ``nn.Linear`` (effective weight; bias of closed neurons 0) and an embedding
    wrapper becomes the collection it holds, with closed columns zeroed (a table whose features are all
    gated off is zeroed whole). The copy's outputs equal the masked model's, its ``state_dict`` has the
    unwrapped model's keys, and it loads with torch and torchrec alone. Parameters are reused, not
    copied (a deep copy would detach a fused kernel's weights from the parameters that view them):
    save a checkpoint first to keep training the wrapped model.

    Raises:
        TypeError: the model is DMP-sharded (load its checkpoint into an unsharded wrapped model first).
        ValueError: a feature is gated off while another feature of its table is open: the gate acts on
            the output, so no plain table computes it.

    Example::

        save_checkpoint(model, "runs/wrapped")  # to train on later
        torch.save(unwrap(model).state_dict(), "plain.pt")  # loads into the model built without tp
    """
    _refuse_sharded(model)
    for fqn, module in list(masked_modules(model)):
        new = _plain_linear(module) if isinstance(module, MaskedLinear) else _plain_collection(fqn, module)
        if not fqn:
            return new
        parent_name, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def plain_state_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map every non-mask key of a wrapped model's state dict to the key of the unwrapped model.

    Embedding wrappers are recognised by their ``feature_gate`` key, so this works on any state dict
    (a DMP model's, a DCP checkpoint's metadata) without the module tree.

    Example::

        plain_state_keys(["sparse.ebc.embedding_bags.t0.weight", "sparse.feature_gate"])
        # {"sparse.ebc.embedding_bags.t0.weight": "sparse.embedding_bags.t0.weight"}
    """
    keys = list(keys)
    wrappers = [
        k.removesuffix("feature_gate") for k in keys if k == "feature_gate" or k.endswith(".feature_gate")
    ]
    inner = [(p, f"{p}{name}.") for p in wrappers for name in ("ebc", "ec")]
    masks = tuple(f"{p}{name}" for p in wrappers for name in ("dim_masks.", "feature_gate"))
    return {
        key: next((p + key[len(child) :] for p, child in inner if key.startswith(child)), key)
        for key in keys
        if not key.endswith(_LINEAR_MASKS) and not key.startswith(masks)
    }


@torch.no_grad()
def _plain_linear(layer: MaskedLinear) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = layer.weight
    plain.weight.mul_(layer.kept_mask())
    if layer.bias is not None:
        plain.bias = layer.bias
        plain.bias.mul_(layer.neuron_mask)
    plain.train(layer.training)
    return plain


@torch.no_grad()
def _plain_collection(fqn: str, module: MaskedEmbeddings) -> nn.Module:
    open_features: dict[str, list[bool]] = {}
    for i, (_, table, _) in enumerate(module._feature_tables):
        open_features.setdefault(table, []).append(bool(module.feature_gate[i]))
    for table, gates in open_features.items():
        if any(gates) and not all(gates):
            raise ValueError(
                f"cannot unwrap {fqn!r}: table {table!r} has features gated off and features open; a plain "
                "table cannot compute that (close the table's columns instead, or open the gates)"
            )
    for table, block, col0, _ in embedding_weight_blocks(module):
        keep = module.dim_mask(table) & any(open_features[table])
        block[:, ~keep[col0 : col0 + block.shape[1]].to(block.device)] = 0.0
    return module.inner
