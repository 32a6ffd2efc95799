"""Issue 12: TorchRec's own models and user models wrap, train, prune, checkpoint and unwrap.

Every model is tiny; "equal" means ``torch.testing.assert_close`` at float32 round-off (the compacted
forward of a pruned MaskedLinear sums fewer terms than the plain Linear with zeros in them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM_DCN, DLRM_Projection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_prune as tp
from torchrec_prune.data.stream import BatchStream
from torchrec_prune.distributed.checkpoint import load_checkpoint, save_checkpoint
from torchrec_prune.masks import MaskedEmbeddings, masked_modules
from torchrec_prune.pruners.gradual import GradualConfig, magnitude_pruner
from torchrec_prune.train.trainer import IncrementalTrainer, TrainConfig

KEYS = ["f0", "f1", "f2"]
NUM_DENSE = 5
DIM = 4
ROWS = 20


def bag_tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
        for i, k in enumerate(KEYS)
    ]


def make_batch(generator: torch.Generator, size: int = 8) -> Batch:
    """Multi-hot rows: 0 to 3 ids per feature per row."""
    lengths = torch.randint(0, 4, (len(KEYS) * size,), generator=generator)
    return Batch(
        dense_features=torch.randn(size, NUM_DENSE, generator=generator),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            KEYS, torch.randint(0, ROWS, (int(lengths.sum()),), generator=generator), lengths
        ),
        labels=torch.randint(0, 2, (size,), generator=generator).float(),
    )


class SequenceModel(nn.Module):
    """A user model over an EmbeddingCollection: mean of each feature's sequence, then an MLP."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        tables = [
            EmbeddingConfig(name=f"s{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
            for i, k in enumerate(KEYS)
        ]
        self.ec = EmbeddingCollection(tables=tables, device=torch.device(device))
        self.mlp = nn.Sequential(
            nn.Linear(NUM_DENSE + DIM * len(KEYS), 16, device=device),
            nn.ReLU(),
            nn.Linear(16, 1, device=device),
        )

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embeddings = self.ec(sparse)
        pooled = []
        for key in KEYS:
            jt = embeddings[key]
            sums = torch.zeros(dense.shape[0], DIM, device=dense.device).index_add_(
                0, torch.repeat_interleave(torch.arange(dense.shape[0]), jt.lengths()), jt.values()
            )
            pooled.append(sums / jt.lengths().clamp(min=1).unsqueeze(1))
        return self.mlp(torch.cat([dense, *pooled], dim=1))


class FusedModel(nn.Module):
    """A user model over a FusedEmbeddingBagCollection (tables updated by SGD inside the backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = FusedEmbeddingBagCollection(
            tables=bag_tables(), optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": 0.05}
        )
        self.mlp = nn.Sequential(nn.Linear(NUM_DENSE + DIM * len(KEYS), 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(torch.cat([dense, self.ebc(sparse).values()], dim=1))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "deepfm": lambda: SimpleDeepFMNN(NUM_DENSE, EmbeddingBagCollection(tables=bag_tables()), 8, DIM),
    "dlrm_dcn": lambda: DLRM_DCN(
        EmbeddingBagCollection(tables=bag_tables()),
        NUM_DENSE,
        [8, DIM],
        [8, 1],
        dcn_num_layers=2,
        dcn_low_rank_dim=2,
    ),
    "dlrm_projection": lambda: DLRM_Projection(
        EmbeddingBagCollection(tables=bag_tables()), NUM_DENSE, [8, DIM], [8, 1], [8, DIM], [8, DIM]
    ),
    "embedding_collection": SequenceModel,
    "fused_ebc": FusedModel,
}


def forward_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's training step contract: ``(model, batch) -> (loss, logits)``."""
    logits = model(batch.dense_features, batch.sparse_features).reshape(-1)
    return F.binary_cross_entropy_with_logits(logits, batch.labels), logits.detach()


def outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.dense_features, batch.sparse_features)


def wrap_quietly(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tp.UnwrappedModuleWarning)  # DCN's cross net: tested below
        return tp.wrap(model)


def close_some(model: nn.Module) -> None:
    """Prune a column of every table, one feature's gate where its table has no other feature, and two
    neurons of the first Linear: the masks every wrapper kind applies in its forward."""
    for _, module in masked_modules(model):
        if isinstance(module, MaskedEmbeddings):
            tp.prune_(module, dim_masks={t: torch.arange(DIM) != 1 for t in module.table_names})
            gate = torch.ones_like(module.feature_gate)
            gate[-1] = False
            tp.prune_(module, feature_gate=gate)
    first = next(m for _, m in masked_modules(model) if isinstance(m, tp.MaskedLinear))
    keep = torch.ones(first.out_features, dtype=torch.bool)
    keep[:2] = False
    tp.prune_(first, neuron_mask=keep)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wrap_train_prune_checkpoint_unwrap(name: str, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    batch = make_batch(generator)
    torch.manual_seed(0)
    model = MODELS[name]()
    plain_out = outputs(model, batch)
    wrap_quietly(model)
    kinds = {type(m).__name__ for _, m in masked_modules(model)}
    embedding_kind = (
        "MaskedEmbeddingCollection" if name == "embedding_collection" else "MaskedEmbeddingBagCollection"
    )
    assert {"MaskedLinear", embedding_kind} <= kinds
    torch.testing.assert_close(outputs(model, batch), plain_out)  # masks open: the plain model

    # Train a few steps on the user's multi-hot batches with the user's forward, pruning as it goes.
    stream = BatchStream([make_batch(generator, 12) for _ in range(4)])
    train = TrainConfig(batch_size=8, increment_rows=16, window=16, progress=False)
    pruner = magnitude_pruner(model, GradualConfig(sparsity=0.5, phase_steps=4))
    result = IncrementalTrainer(model, train, hooks=[pruner], forward_fn=forward_fn).run(stream)
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(r.ce)) for r in result.records)
    assert pruner.stats() and all(s.sparsity > 0.3 for s in pruner.stats().values())
    close_some(model)
    masked_out = outputs(model, batch)

    save_checkpoint(model, tmp_path / "ckpt")
    torch.manual_seed(1)
    fresh = wrap_quietly(MODELS[name]())
    load_checkpoint(fresh, tmp_path / "ckpt")
    torch.testing.assert_close(outputs(fresh, batch), masked_out)

    plain = tp.unwrap(model)
    assert plain is model and not list(masked_modules(plain))  # in place, as wrap()
    torch.testing.assert_close(outputs(plain, batch), masked_out)
    rebuilt = MODELS[name]()  # torch and torchrec alone
    rebuilt.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(outputs(rebuilt, batch), masked_out)


def test_closed_neuron_bias_is_zeroed_by_unwrap_only() -> None:
    model = tp.wrap(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    nn.init.constant_(model[0].bias, 0.5)
    tp.prune_(model[0], neuron_mask=torch.tensor([True, False, True, True]))
    assert model[0].bias[1] == 0.5  # kept for regrowth
    plain = tp.unwrap(model)
    assert type(plain[0]) is nn.Linear and plain[0].bias[1] == 0 and plain[0].weight[1].abs().sum() == 0


def test_wrap_reports_every_module_left_out_and_strict_refuses() -> None:
    with pytest.warns(tp.UnwrappedModuleWarning, match=r"'inter_arch\.crossnet' \(LowRankCrossNet\)"):
        tp.wrap(MODELS["dlrm_dcn"]())
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Embedding(5, 3))
    with pytest.raises(TypeError, match=r"'1' \(LayerNorm\), '2' \(Embedding\)"):
        tp.wrap(model, tp.WrapConfig(strict=True))
    tp.wrap(model, tp.WrapConfig(strict=True, exclude=["1", "2"]))  # left out knowingly: no error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.wrap(MODELS["dlrm_projection"]())  # nothing left out: no warning


def test_ebc_subclass_is_composed() -> None:
    class MyEBC(EmbeddingBagCollection):
        pass

    model = nn.ModuleDict({"ebc": MyEBC(tables=bag_tables())})
    tp.wrap(model)
    assert isinstance(model["ebc"], tp.MaskedEmbeddingBagCollection) and type(model["ebc"].ebc) is MyEBC
