"""Export (SPEC 3 compaction): smaller plain TorchRec modules, equal outputs, loadable without the plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, wrapped_mlp
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import prune_neurons
from torchrec_prune.pruners.umec import UMECConfig, UMECPruner
from torchrec_prune.train.flops import fc_flops
from torchrec_prune.train.hooks import StepContext

CONFIG = DLRMConfig(
    num_dense=3, num_sparse=6, num_embeddings=50, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
EBC = "model.sparse_arch.embedding_bag_collection"
BOTTOM_LAST = "model.dense_arch.model._mlp.2._linear"
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # the compacted matmuls sum the same terms in another order


def batches(n: int = 3):
    return list(SyntheticStream(64 * n, num_dense=3, num_sparse=6, num_embeddings=50, seed=1).batches(64))


def logits(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)[1][1]


def umec_dlrm(budget: float = 0.3) -> nn.Module:
    """A DLRM after a few UMEC steps and removal: neurons, features and a common column gone."""
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(CONFIG))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    pruner = UMECPruner(model, UMECConfig(budget=budget, phase_steps=5, eta4=100.0))
    for batch in batches(5):
        optimizer.zero_grad()
        model(batch)[0].backward()
        optimizer.step()
        pruner.after_step(StepContext(model=model, optimizers=[optimizer]))
    assert pruner.finalized
    ebc = model.get_submodule(EBC)
    # make sure every kind of removal is exercised: a common embedding column with its dense output
    tp.prune_(model.get_submodule(BOTTOM_LAST), neuron_mask=torch.tensor([True, False, True, True]))
    tp.prune_(ebc, dim_masks={t: torch.tensor([True, False, True, True]) for t in ebc.table_names})
    tp.prune_(ebc, feature_gate=torch.tensor([True, True, False, True, True, True]))
    return model


def test_exported_dlrm_is_smaller_plain_torchrec_with_equal_outputs():
    model = umec_dlrm()
    plain, mapping = tp.export(model)
    names = {type(m).__module__.split(".")[0] for m in plain.modules()}
    assert names <= {"torch", "torchrec"}, names
    ebc = plain.model.sparse_arch.embedding_bag_collection
    assert type(ebc) is EmbeddingBagCollection
    kept = mapping["embeddings"][EBC]
    dims = kept["columns"]
    assert "cat_2" in kept["dropped_features"] and 1 not in dims and len(dims) in (1, 2, 3)
    assert all(c.embedding_dim == len(dims) for c in ebc.embedding_bag_configs())
    assert [f for c in ebc.embedding_bag_configs() for f in c.feature_names] == kept["features"]
    assert plain.model.dense_arch.model._mlp[2]._linear.out_features == len(dims)
    top = plain.model.over_arch.model[0]._mlp[0]._linear
    f = len(kept["features"])
    assert top.in_features == len(dims) + (f + 1) * f // 2  # dense columns, dot products
    for batch in batches():
        assert torch.allclose(logits(plain, batch), logits(model, batch), **TOLERANCE)
    assert fc_flops(plain).forward <= fc_flops(model).forward


def test_exported_model_loads_in_a_process_that_cannot_import_torchrec_prune(tmp_path):
    model = umec_dlrm()
    plain, mapping = tp.export(model)
    tp.save_exported(plain, mapping, tmp_path / "model.pt")
    batch = batches(1)[0]
    torch.save(batch, tmp_path / "batch.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torchrec_prune"] = None  # any import of it fails
        import torch
        saved = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=False)
        with torch.no_grad():
            torch.save(saved["model"](batch)[1][1], {str(tmp_path / "out.pt")!r})
        assert not any(name.startswith("torchrec_prune") for name in sys.modules if sys.modules[name])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    out = torch.load(tmp_path / "out.pt")
    assert torch.allclose(out, logits(model, batch), **TOLERANCE)
    assert REPO.is_dir()


def test_taylor_neuron_pruned_mlp_exports_smaller_linears():
    torch.manual_seed(0)
    model = wrapped_mlp([5, 12, 8, 1])
    prune_neurons(model, 0.5, {"0": torch.rand(12), "2": torch.rand(8)})
    plain, mapping = tp.export(model)
    assert [m.out_features for m in plain if isinstance(m, nn.Linear)] == [6, 4, 1]
    assert [m.in_features for m in plain if isinstance(m, nn.Linear)] == [5, 6, 4]
    assert len(mapping["linears"]["0"]["rows"]) == 6
    x = torch.randn(16, 5)
    assert torch.allclose(plain(x), model(x), **TOLERANCE)


def test_closed_neurons_whose_reader_keeps_the_column_stay_as_zero_rows():
    torch.manual_seed(0)
    model = wrapped_mlp([5, 12, 8, 1])
    tp.prune_(model[0], neuron_mask=torch.arange(12) >= 3)  # column still open in the next layer
    prune_neurons(model, 0.5, {"2": torch.rand(8)})
    plain, _ = tp.export(model)
    assert plain[0].out_features == 12 and plain[2].out_features == 4
    x = torch.randn(16, 5)
    assert torch.allclose(plain(x), model(x), **TOLERANCE)


def test_nothing_structured_to_remove_is_refused():
    model = tp.wrap(build_dlrm(CONFIG))
    tp.prune_(model.get_submodule("model.over_arch.model.1"), weight_mask=torch.rand(1, 8) > 0.5)
    with pytest.raises(ValueError, match="nothing structured to remove"):
        tp.export(model)


def test_dlrm_columns_closed_in_some_tables_only_are_refused_naming_the_constraint():
    model = tp.wrap(build_dlrm(CONFIG))
    tp.prune_(model.get_submodule(EBC), dim_masks={"t_cat_1": torch.tensor([True, False, True, True])})
    with pytest.raises(ValueError, match="dot interaction needs one embedding dimension for every table"):
        tp.export(model)
    model = tp.wrap(build_dlrm(CONFIG))
    ebc = model.get_submodule(EBC)
    tp.prune_(ebc, dim_masks={t: torch.tensor([True, False, True, True]) for t in ebc.table_names})
    with pytest.raises(ValueError, match=r"outputs \[1\] of .* are open"):
        tp.export(model)


def test_embedding_masks_of_an_unknown_model_are_refused_and_sharded_models_too():
    from tests.test_your_model import MODELS, wrap_quietly

    model = wrap_quietly(MODELS["deepfm"]())
    module = next(m for _, m in tp.masked_modules(model) if isinstance(m, tp.MaskedEmbeddingBagCollection))
    tp.prune_(module, feature_gate=torch.zeros_like(module.feature_gate))
    with pytest.raises(ValueError, match="removes those only where it knows how the model reads"):
        tp.export(model)


class ConcatModel(nn.Module):
    """Dense features and pooled embeddings concatenated into an MLP: tables of different widths, one
    table read by two features, the tables plain or fused."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        tables = [
            EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=30, feature_names=["f0", "f1"]),
            EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["f2"]),
        ]
        self.ebc = (
            FusedEmbeddingBagCollection(
                tables=tables, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}
            )
            if fused
            else EmbeddingBagCollection(tables=tables)
        )
        self.mlp = nn.Sequential(nn.Linear(3 + 16, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(torch.cat([dense, self.ebc(sparse).values()], dim=1))


def concat_batch(seed: int, size: int = 16) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 3, (3 * size,), generator=generator)
    ids = torch.randint(0, 30, (int(lengths.sum()),), generator=generator)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], ids, lengths)
    return torch.randn(size, 3, generator=generator), kjt


@pytest.mark.parametrize("fused", [False, True], ids=["ebc", "fused-ebc"])
def test_a_concatenating_model_exports_tables_of_their_own_widths(fused: bool, tmp_path):
    torch.manual_seed(0)
    model = tp.wrap(ConcatModel(fused))
    ebc, first = model.ebc, model.mlp[0]
    tp.prune_(
        ebc,
        dim_masks={
            "t0": torch.tensor([1, 0, 1, 1]).bool(),
            "t1": torch.tensor([0, 1, 1, 1, 1, 1, 1, 0]).bool(),
        },
    )
    tp.prune_(ebc, feature_gate=torch.tensor([True, False, True]))  # f1 goes, its table stays for f0
    tp.prune_(first, neuron_mask=torch.arange(8) != 5)
    tp.prune_(model.mlp[2], input_mask=torch.arange(8) != 5)
    dense, kjt = concat_batch(0)
    plain, mapping = tp.export(model, probe=lambda m: m(dense, kjt))
    configs = {c.name: (c.embedding_dim, c.feature_names) for c in plain.ebc.embedding_bag_configs()}
    assert configs == {"t0": (3, ["f0"]), "t1": (6, ["f2"])}
    assert type(plain.ebc) is EmbeddingBagCollection
    assert (plain.mlp[0].in_features, plain.mlp[0].out_features) == (3 + 3 + 6, 7)
    removed = {4, 7, 8, 9, 10, 11, 18}  # dense 0-2, f0 3-6, f1 7-10, f2 11-18: t0 col 1, f1, t1 cols 0, 7
    assert mapping["linears"]["mlp.0"]["cols"] == [c for c in range(19) if c not in removed]
    assert mapping["embeddings"]["ebc"]["columns"] == {"t0": [0, 2, 3], "t1": [1, 2, 3, 4, 5, 6]}
    assert mapping["embeddings"]["ebc"]["dropped_features"] == ["f1"]
    for seed in (1, 2):
        d, k = concat_batch(seed)
        with torch.no_grad():
            torch.testing.assert_close(plain(d, k), model(d, k), **TOLERANCE)
    tp.save_exported(plain, mapping, tmp_path / "model.pt")
    loaded, _ = tp.load_exported(tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(dense, kjt), plain(dense, kjt), rtol=0, atol=0)


def test_a_model_that_reads_the_embeddings_elsewhere_too_is_refused_on_its_outputs():
    """DeepFM concatenates the embeddings into its deep Linear and also feeds them to the
    factorization machine: removing their columns changes the output, so export refuses."""
    from tests.test_your_model import MODELS, make_batch, wrap_quietly

    model = wrap_quietly(MODELS["deepfm"]())
    module = next(m for _, m in tp.masked_modules(model) if isinstance(m, tp.MaskedEmbeddingBagCollection))
    tp.prune_(module, feature_gate=torch.tensor([True, False, True]))
    batch = make_batch(torch.Generator().manual_seed(0))
    probe = lambda m: m(batch.dense_features, batch.sparse_features)  # noqa: E731
    with pytest.raises(ValueError, match="reads the embeddings somewhere other than the Linear"):
        tp.export(model, probe=probe)


def test_umec_selects_features_of_a_concatenating_model_and_its_export_fits_the_budget():
    """With a probe UMEC finds the concatenated collection and learns its features with the neurons;
    the model it leaves exports (same probe) within the FLOPs budget, counted on the exported model."""
    torch.manual_seed(0)
    model = tp.wrap(ConcatModel(fused=False))
    dense, kjt = concat_batch(0)
    probe = lambda m: m(dense, kjt)  # noqa: E731
    pruner = UMECPruner(model, UMECConfig(budget=0.3, phase_steps=40, eta4=100.0), probe=probe)
    features = next(layer for layer in pruner.layers if layer.kind == "features")
    assert features.size == 3 and features.cols["mlp.0"][0].tolist() == list(range(3, 19))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(40):
        d, k = concat_batch(100 + step)
        labels = torch.randint(0, 2, (16, 1), generator=generator).float()
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(d, k), labels).backward()
        optimizer.step()
        pruner.update()
    pruner.finalize([optimizer])
    plain, _ = tp.export(model, probe=probe)
    assert fc_flops(plain).forward <= 0.3 * fc_flops(model).dense_forward
    with torch.no_grad():
        torch.testing.assert_close(plain(*concat_batch(7)), model(*concat_batch(7)), **TOLERANCE)
    gated = int((~model.ebc.feature_gate).sum())
    assert gated == pruner.removed["features:ebc"]
    assert sum(len(c.feature_names) for c in plain.ebc.embedding_bag_configs()) == 3 - gated
