"""Element masks are held only while some weight is pruned: memory per parameter, state dicts, loads."""

import torch

from torchrec_prune.masks import MaskedLinear, grow_, prune_, wrap
from torchrec_prune.masks.report import mask_memory
from torchrec_prune.models import DLRMConfig, build_dlrm


def _model():
    torch.manual_seed(0)
    return wrap(build_dlrm(DLRMConfig(num_embeddings=100)))


def _linears(model) -> list[MaskedLinear]:
    return [m for m in model.modules() if isinstance(m, MaskedLinear)]


def test_structured_masks_cost_under_five_hundredths_of_a_byte_per_parameter():
    model = _model()
    assert all(layer.element_mask() is None for layer in _linears(model))
    layer = _linears(model)[0]
    closed = torch.ones(layer.out_features, dtype=torch.bool)
    closed[::2] = False
    prune_(layer, neuron_mask=closed)
    memory = mask_memory(model)
    assert layer.element_mask() is None and memory.bytes_per_fc_parameter <= 0.05
    before = memory.mask_bytes
    keep = torch.ones_like(layer.weight, dtype=torch.bool)
    keep[1, 0] = False
    prune_(layer, weight_mask=keep)
    assert layer.element_mask() is not None
    assert mask_memory(model).mask_bytes == before + layer.weight.numel()
    grow_(layer, weight_mask=~keep)  # every element open again: the mask is released
    assert layer.element_mask() is None and mask_memory(model).mask_bytes == before


def test_state_dicts_keep_every_mask_key_and_load_without_holding_open_masks():
    model, other = _model(), _model()
    layer = _linears(model)[1]
    layer.weight_mask[0, :3] = False  # a direct write holds the mask
    state = model.state_dict()
    keys = [k for k in state if k.startswith(_name(model, layer))]
    assert [k.rpartition(".")[2] for k in keys] == [
        "weight",
        "bias",
        "weight_mask",
        "neuron_mask",
        "input_mask",
    ]
    open_key = next(k for k in state if k.endswith("weight_mask") and not k.startswith(_name(model, layer)))
    assert state[open_key].dtype == torch.bool and bool(state[open_key].all())
    other.load_state_dict(state)
    loaded = [m for m in _linears(other)]
    assert [m.element_mask() is not None for m in loaded] == [m is layer for m in _linears(model)]
    assert torch.equal(loaded[1].weight_mask, layer.weight_mask)
    x = torch.randn(4, layer.in_features)
    assert torch.equal(loaded[1](x), layer(x))
    missing = {k: v for k, v in state.items() if k != open_key}
    result = other.load_state_dict(missing, strict=False)
    assert result.missing_keys == [open_key]


def _name(model, layer) -> str:
    return next(name for name, m in model.named_modules() if m is layer) + "."
