"""FC-layer FLOPs from live masks, and their integral over a run, against hand computations."""

import pytest
import torch
from torch import nn

import torchrec_prune as tp
from torchrec_prune.masks import MaskedLinear
from torchrec_prune.masks.surgery import prune_
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.train import flops as flops_mod
from torchrec_prune.train.flops import FlopsMeter, FlopsTotals, fc_flops, integrate_phases


def _mlp(masked: bool = True) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 4))
    return tp.wrap(model) if masked else model


def _prune_neurons(model: nn.Sequential, neurons: list[int]) -> None:
    """What the structured pruner does: close neurons of layer 0 and the matching inputs of layer 2."""
    keep = torch.ones(8, dtype=torch.bool)
    keep[neurons] = False
    prune_(model[0], neuron_mask=keep)
    prune_(model[2], input_mask=keep)


@pytest.mark.parametrize("masked", [False, True])
def test_dense_mlp_matches_hand_count(masked):
    report = fc_flops(_mlp(masked))
    hand = (2 * 13 * 8 + 8) + (2 * 8 * 4 + 4)
    assert [layer.name for layer in report.layers] == ["0", "2"]
    assert report.dense_forward == report.forward == report.effective_forward == hand
    assert report.training == report.dense_training == 3 * hand


def test_neuron_and_input_masks_shrink_both_layers():
    model = _mlp()
    _prune_neurons(model, [1, 5, 6])
    report = fc_flops(model)
    first, second = report.layers
    assert (first.active_in, first.active_out) == (13, 5)
    assert (second.active_in, second.active_out) == (5, 4)
    assert first.forward == 2 * 13 * 5 + 5
    assert second.forward == 2 * 5 * 4 + 4
    assert report.dense_forward == (2 * 13 * 8 + 8) + (2 * 8 * 4 + 4)
    # Structured sparsity is real: effective FLOPs equal structured ones when no element mask is set.
    assert report.effective_forward == report.forward


def test_neuron_mask_alone_does_not_shrink_next_layer():
    """The next layer's input_mask is the contract: without it, layer 2 still reads 8 inputs."""
    model = _mlp()
    keep = torch.ones(8, dtype=torch.bool)
    keep[0] = False
    prune_(model[0], neuron_mask=keep)
    report = fc_flops(model)
    assert report.forward == (2 * 13 * 7 + 7) + (2 * 8 * 4 + 4)


def test_element_mask_reported_as_effective_flops():
    model = _mlp()
    weight_mask = torch.rand(4, 8) > 0.5
    weight_mask[0, 0] = False
    prune_(model[2], weight_mask=weight_mask)
    report = fc_flops(model)
    nnz = int(weight_mask.sum())
    assert report.layers[1].kept_weights == nnz
    assert report.forward == report.dense_forward  # unstructured sparsity saves no dense FLOPs
    assert report.layers[1].effective_forward == 2 * nnz + 4
    assert report.effective_training == 3 * ((2 * 13 * 8 + 8) + 2 * nnz + 4)


def test_element_and_structured_masks_combine():
    model = _mlp()
    weight_mask = torch.ones(4, 8, dtype=torch.bool)
    weight_mask[:, 0] = False  # column 0: 4 weights
    weight_mask[2, 3] = False  # column 3, pruned below as an input anyway
    weight_mask[3, 7] = False  # a kept column: 1 more weight
    prune_(model[2], weight_mask=weight_mask)
    _prune_neurons(model, [3])
    second = fc_flops(model).layers[1]
    kept = 4 * 7 - 4 - 1  # inputs 0..7 minus input 3, minus column 0, minus (3, 7)
    assert second.kept_weights == kept
    assert second.forward == 2 * 7 * 4 + 4
    assert second.effective_forward == 2 * kept + 4


def test_layer_without_bias():
    model = nn.Sequential(MaskedLinear(6, 3, bias=False))
    model[0].neuron_mask[2] = False
    layer = fc_flops(model).layers[0]
    assert layer.dense_forward == 2 * 6 * 3
    assert layer.forward == layer.effective_forward == 2 * 6 * 2


def test_dlrm_structured_pruning_saves_exactly_the_pruned_rows_and_columns():
    model = tp.wrap(build_dlrm(DLRMConfig(num_embeddings=20, dense_arch=[16, 8, 4], over_arch=[16, 1])))
    before = fc_flops(model)
    assert len(before.layers) == 5
    names = [layer.name for layer in before.layers]
    first, second = (model.get_submodule(n) for n in names[:2])
    assert (first.in_features, first.out_features, second.out_features) == (13, 16, 8)
    keep = torch.ones(16, dtype=torch.bool)
    keep[:3] = False
    prune_(first, neuron_mask=keep)
    prune_(second, input_mask=keep)
    after = fc_flops(model)
    assert before.forward - after.forward == 3 * (2 * 13 + 1) + 3 * 2 * 8


def test_meta_model_is_rejected():
    with pytest.raises(ValueError, match="meta"):
        fc_flops(nn.Sequential(nn.Linear(3, 2, device="meta")))


def test_meter_integrates_over_mask_changes_and_phases(monkeypatch):
    model = _mlp()
    calls = []
    real = flops_mod._layer_flops

    def counting(name, layer):
        calls.append(name)
        return real(name, layer)

    monkeypatch.setattr(flops_mod, "_layer_flops", counting)
    meter = FlopsMeter()
    dense = fc_flops(model)
    calls.clear()
    for _ in range(3):
        meter.add(model, 32, phase="dense")
    assert len(calls) == 2  # computed once for two layers, then cached while masks are unchanged
    _prune_neurons(model, [0, 1, 2, 3])
    meter.add(model, 32, phase="dense")
    meter.add(model, 64, phase="sparse")
    sparse = fc_flops(model)
    assert len(calls) == 2 + 2 + 2  # recomputed after the in-place mask change (+2 from fc_flops above)

    assert [(s.phase, s.samples) for s in meter.segments] == [("dense", 96), ("dense", 32), ("sparse", 64)]
    totals = meter.totals
    assert totals.samples == 192
    assert totals.dense == 192 * 3 * dense.dense_forward
    assert totals.actual == 96 * 3 * dense.forward + 96 * 3 * sparse.forward
    assert totals.saving == pytest.approx(1 - totals.actual / totals.dense)
    assert 0 < totals.saving < 1

    # The schedule's view (phase sample counts x per-sample FLOPs) equals the step-by-step integral.
    assert integrate_phases([(96, dense), (96, sparse)]) == totals
    phases = meter.phase_totals()
    assert list(phases) == ["dense", "sparse"]
    assert phases["dense"] + phases["sparse"] == totals
    assert phases["sparse"] == integrate_phases([(64, sparse)])


def test_meter_sees_replaced_masks_and_regrowth():
    model = _mlp()
    meter = FlopsMeter()
    dense = meter.per_sample(model)
    _prune_neurons(model, [2])
    assert meter.per_sample(model).forward < dense.forward
    model[0].neuron_mask = torch.ones(8, dtype=torch.bool)  # a loaded checkpoint replaces the buffer
    model[2].input_mask = torch.ones(8, dtype=torch.bool)
    assert meter.per_sample(model) == dense


def test_totals_validation_and_empty():
    assert FlopsMeter().totals == FlopsTotals()
    assert FlopsTotals().saving == 0.0
    with pytest.raises(ValueError, match="num_samples"):
        FlopsMeter().add(_mlp(), -1)
    with pytest.raises(ValueError, match="samples"):
        integrate_phases([(-5, fc_flops(_mlp()))])
