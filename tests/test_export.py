"""Export (SPEC 3 compaction): smaller plain TorchRec modules, equal outputs, loadable without the plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, wrapped_mlp
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

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
    with pytest.raises(ValueError, match="removes those only from TorchRec's DLRM"):
        tp.export(model)
