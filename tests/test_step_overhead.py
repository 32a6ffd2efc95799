"""Per-step caches of the FLOPs meter and the masked embedding wrappers: computed once, rebuilt whenever a
mask is written in place, replaced or loaded, or the module tree changes."""

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_prune as tp
from torchrec_prune.data import SyntheticStream
from torchrec_prune.distributed.dmp import ShardingConfig, one_process_group, shard
from torchrec_prune.masks import MaskedEmbeddingBagCollection, MaskedLinear
from torchrec_prune.masks.embedding import MaskedEmbeddingCollection, MaskedEmbeddings
from torchrec_prune.masks.surgery import set_masks_
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.train import flops as flops_mod
from torchrec_prune.train.flops import FlopsMeter, fc_flops, integrate_phases
from torchrec_prune.train.hooks import BaseHook, StepContext
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

TINY = DLRMConfig(num_embeddings=200, dense_arch=[16, 8, 4], over_arch=[16, 1])


def _mlp() -> nn.Sequential:
    return tp.wrap(nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 4)))


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """Every model whose modules the meter walks."""
    seen: list[nn.Module] = []
    real = flops_mod._fc_layers

    def counting(model: nn.Module) -> list[tuple[str, nn.Linear]]:
        seen.append(model)
        return real(model)

    monkeypatch.setattr(flops_mod, "_fc_layers", counting)
    return seen


def test_meter_walks_the_modules_once_while_the_tree_stays(walks):
    model, meter = _mlp(), FlopsMeter()
    for _ in range(5):
        meter.add(model, 8)
    assert walks == [model]
    other = _mlp()
    report = meter.per_sample(other)  # another model is walked
    assert walks == [model, other]
    assert report == fc_flops(other)


def test_a_registration_elsewhere_walks_again_but_does_not_recount(walks, monkeypatch):
    model, meter = _mlp(), FlopsMeter()
    meter.add(model, 8)
    counted: list[str] = []
    monkeypatch.setattr(flops_mod, "_layer_flops", lambda name, layer: counted.append(name))
    nn.Sequential(nn.ReLU())  # registers a child module: any model may have changed
    meter.add(model, 8)
    assert len(walks) == 2 and counted == []
    assert [s.samples for s in meter.segments] == [16]


def test_meter_sees_an_in_place_mask_write_at_the_next_add(walks):
    model, meter = _mlp(), FlopsMeter()
    meter.add(model, 8)
    model[0].neuron_mask[1] = False
    meter.add(model, 8)
    model[0].neuron_mask[1] = True
    meter.add(model, 8)
    dense_out = [s.report.layers[0].active_out for s in meter.segments]
    assert dense_out == [8, 7, 8]
    assert len(walks) == 1  # a mask write is not a tree change


def test_meter_sees_set_masks_and_element_masks():
    model, meter = _mlp(), FlopsMeter()
    dense = meter.per_sample(model)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[0, 3]] = False
    set_masks_(model[0], neuron_mask=keep)
    set_masks_(model[2], input_mask=keep)
    assert meter.per_sample(model) == fc_flops(model)
    assert meter.per_sample(model).forward < dense.forward
    model[2].weight_mask[0, 1] = False  # allocates the element mask, then writes it
    assert (
        meter.per_sample(model).layers[1].kept_weights == fc_flops(model).layers[1].kept_weights == 4 * 6 - 1
    )


@pytest.mark.parametrize("assign", [False, True])
def test_meter_sees_masks_of_a_loaded_state_dict(assign):
    pruned = _mlp()
    keep = torch.ones(8, dtype=torch.bool)
    keep[5] = False
    set_masks_(pruned[0], neuron_mask=keep)
    model, meter = _mlp(), FlopsMeter()
    dense = meter.per_sample(model)
    model.load_state_dict(pruned.state_dict(), assign=assign)
    assert meter.per_sample(model) == fc_flops(pruned) != dense


def test_meter_walks_again_after_a_module_is_replaced_added_or_deleted(walks):
    model, meter = _mlp(), FlopsMeter()
    meter.add(model, 8)
    model[2] = MaskedLinear(8, 6)  # setattr: a registration
    assert [layer.out_features for layer in meter.per_sample(model).layers] == [8, 6]
    model.add_module("head", nn.Linear(6, 1))
    assert [layer.name for layer in meter.per_sample(model).layers] == ["0", "2", "head"]
    model.head.bias = None  # no registration hook fires: the parameters are compared
    assert [layer.bias for layer in meter.per_sample(model).layers] == [True, True, False]
    del model[2]  # no registration hook fires (the cached path is checked); "head" is renumbered "2"
    assert [(layer.name, layer.out_features) for layer in meter.per_sample(model).layers] == [
        ("0", 8),
        ("2", 1),
    ]
    assert len(walks) == 4


def test_running_totals_match_the_segments_across_state_dicts():
    model, meter = _mlp(), FlopsMeter()
    meter.add(model, 32, phase="dense")
    model[0].neuron_mask[:4] = False
    meter.add(model, 16, phase="sparse")
    resumed = FlopsMeter()
    resumed.load_state_dict(meter.state_dict())
    assert resumed.totals == meter.totals
    for m in (meter, resumed):
        m.add(model, 8, phase="sparse")
    expected = integrate_phases((s.samples, s.report) for s in meter.segments)
    assert meter.totals == resumed.totals == expected
    assert expected.samples == 56


def _kjt(features: list[str], batch: int = 3) -> KeyedJaggedTensor:
    lengths = torch.ones(len(features) * batch, dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(features, torch.arange(len(lengths)) % 10, lengths)


def _count_derives(monkeypatch: pytest.MonkeyPatch, wrapper: MaskedEmbeddings) -> list[int]:
    calls: list[int] = []
    real = wrapper._derive

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(wrapper, "_derive", counting)
    return calls


def test_masked_ebc_forward_sees_in_place_writes_and_loads(monkeypatch):
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=10, feature_names=[f"f{i}"])
        for i in range(2)
    ]
    masked = MaskedEmbeddingBagCollection(EmbeddingBagCollection(tables=tables))
    calls = _count_derives(monkeypatch, masked)
    kjt = _kjt(["f0", "f1"])
    full = masked(kjt).values()
    masked(kjt)
    assert len(calls) == 1 and masked.column_mask() is None
    masked.dim_masks.t1[2] = False
    out = masked(kjt).values()
    assert (out[:, 6] == 0).all() and torch.equal(out[:, :6], full[:, :6])
    masked.feature_gate[0] = False
    assert (masked(kjt).values()[:, :4] == 0).all()
    masked(kjt)
    assert len(calls) == 3
    masked.load_state_dict(MaskedEmbeddingBagCollection(EmbeddingBagCollection(tables=tables)).state_dict())
    assert torch.equal(masked(kjt).values(), masked.ebc(kjt).values())  # loaded masks are all open


def test_masked_ec_forward_sees_in_place_writes(monkeypatch):
    tables = [EmbeddingConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0", "f1"])]
    masked = MaskedEmbeddingCollection(EmbeddingCollection(tables=tables))
    calls = _count_derives(monkeypatch, masked)
    kjt = _kjt(["f0", "f1"])
    masked(kjt)
    masked.dim_masks.t0[0] = False
    out = masked(kjt)
    assert (out["f0"].values()[:, 0] == 0).all() and (out["f1"].values()[:, 1:] != 0).any()
    masked.feature_gate[1] = False
    assert (masked(kjt)["f1"].values() == 0).all()
    masked(kjt)
    assert len(calls) == 3


def test_trainer_sees_a_mask_written_between_steps():
    torch.manual_seed(0)
    trainer = IncrementalTrainer(
        tp.wrap(build_dlrm(TINY)), TrainConfig(batch_size=32, window=64, progress=False)
    )
    batches = list(SyntheticStream(96, num_embeddings=200, seed=0).batches(32))
    trainer.step(batches[0])
    layer = trainer.model.model.over_arch.model[0]._mlp[0]._linear
    layer.neuron_mask[1] = False
    trainer.step(batches[1])
    trainer.step(batches[2])
    assert [s.samples for s in trainer.flops.segments] == [32, 64]
    assert [s.report.layers[-2].active_out for s in trainer.flops.segments] == [16, 15]
    assert trainer.result.flops == trainer.flops.totals


class _PruneAfterStep(BaseHook):
    """Closes a neuron after the optimizer of the first step, as a pruner's ``after_step`` does."""

    def __init__(self, layer: MaskedLinear) -> None:
        self.layer = layer

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step == 0:
            self.layer.neuron_mask[1] = False


def test_trainer_counts_a_step_at_the_masks_its_forward_used_and_reads_them_only_after_a_change(
    monkeypatch,
):
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(TINY))
    layer = model.model.over_arch.model[0]._mlp[0]._linear
    trainer = IncrementalTrainer(
        model, TrainConfig(batch_size=32, window=64, progress=False), hooks=[_PruneAfterStep(layer)]
    )
    checks: list[int] = []  # the meter's check of every FC layer's parameters and masks
    real = FlopsMeter._current
    monkeypatch.setattr(
        FlopsMeter, "_current", lambda meter, m: checks.append(meter.totals.samples) or real(meter, m)
    )
    for batch in SyntheticStream(128, num_embeddings=200, seed=0).batches(32):
        trainer.step(batch)
    # Step 0 ran dense; its hook closed a neuron, which step 1's forward used first.
    assert [s.samples for s in trainer.flops.segments] == [32, 96]
    assert [s.report.layers[-2].active_out for s in trainer.flops.segments] == [16, 15]
    assert trainer.result.flops == trainer.flops.totals
    assert checks == [0, 32]  # at steps 0 and 1 only: later forwards met no changed mask


def test_meter_and_masked_ebc_under_one_rank_dmp(walks):
    """The sharded model: masks written in place are seen, and the tree is walked once."""
    torch.manual_seed(0)
    batches = list(SyntheticStream(64, num_embeddings=200, seed=0).batches(32))
    with one_process_group():
        sharded = shard(
            tp.wrap(build_dlrm(TINY, device="meta")), torch.device("cpu"), ShardingConfig(batch_size=32)
        )
        model, meter = sharded.model, FlopsMeter()
        masked = next(m for m in model.modules() if isinstance(m, MaskedEmbeddingBagCollection))
        meter.add(model, 32)
        meter.add(model, 32)
        linear = next(m for m in model.modules() if isinstance(m, MaskedLinear))
        linear.neuron_mask[0] = False
        masked.dim_masks.t_cat_3[1] = False
        meter.add(model, 32)
        pooled = masked(batches[0].sparse_features)
        column = pooled.keys().index("cat_3") * 4 + 1
        assert (pooled.values()[:, column] == 0).all() and (pooled.values()[:, column - 1] != 0).any()
    assert [s.samples for s in meter.segments] == [64, 32]
    assert meter.segments[1].report.layers[0].active_out == linear.out_features - 1
    assert len(walks) == 1


def test_masked_linear_forward_sees_masks_written_in_place_or_replaced_after_a_forward():
    torch.manual_seed(0)
    layer = MaskedLinear(4, 3)
    x = torch.randn(2, 4)
    dense = layer(x)
    layer.neuron_mask[1] = False  # in place: a new _version
    assert torch.equal(layer(x)[:, 1], torch.zeros(2)) and torch.equal(layer(x)[:, 0], dense[:, 0])
    layer.input_mask = torch.tensor([True, False, True, True])  # replaced: another tensor
    expected = x[:, [0, 2, 3]] @ layer.weight[0, [0, 2, 3]] + layer.bias[0]
    assert torch.allclose(layer(x)[:, 0], expected)
    layer.weight_mask[0, 0] = False  # an element mask, allocated on first write
    expected = x[:, [2, 3]] @ layer.weight[0, [2, 3]] + layer.bias[0]
    assert torch.allclose(layer(x)[:, 0], expected)
