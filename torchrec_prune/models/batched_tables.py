"""An ``EmbeddingBagCollection`` on fbgemm's table-batched kernel, with ordinary autograd gradients.

TorchRec's unsharded ``EmbeddingBagCollection`` calls ``nn.EmbeddingBag`` once per feature, forward
and backward; with 26 small tables that loop is most of a small batch's step (4.9 ms against 0.43 ms
for the batched kernel on 26 tables of 4096 rows, batch 128, one thread, here). Under DMP the sharded
collection already runs fbgemm's table-batched kernels; this module gives a process without DMP the
same kernel while keeping the gradient in ``.grad`` (fbgemm's dense TBE, TorchRec's ``DENSE`` compute
kernel), for code that must see the gradient instead of having a fused optimizer apply it: the
parameter server's trainers push it.

All tables live in one flat parameter; ``table_weight`` and ``table_grad`` are row-major views of one
table in it. With ``pool_rows`` every feature looks up one shared pool of rows instead (tables of one
width): a caller that maps each table's ids to rows of the pool itself (the parameter server's
trainers: a row cache over all tables) reads and writes it with ``pool_weight`` and ``pool_grad``.

Example::

    tables = [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0"])]
    ebc = BatchedEmbeddingBagCollection(tables)
    pooled = ebc(KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1, 2]), lengths=torch.tensor([2])))
    pooled.values().sum().backward()
    ebc.table_grad("t0")[1]  # ones: row 1 was looked up once
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

# fbgemm's CPU lookup computes its gradient inside its own autograd function, which torch reports as a
# missing autograd kernel at every backward; the gradient equals nn.EmbeddingBag's (tests compare them).
warnings.filterwarnings(
    "ignore",
    message=r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel",
    category=UserWarning,
)

_POOLING = {PoolingType.SUM: PoolingMode.SUM, PoolingType.MEAN: PoolingMode.MEAN}


class BatchedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Pooled embeddings of every feature from one table-batched lookup (CPU, unweighted).

    Args:
        tables: the collection's tables, as for ``EmbeddingBagCollection``; all with one pooling.
        pool_rows: when set, one pool of this many rows shared by every feature (the ids a forward gets
            are pool rows); the tables' own sizes are then not used.

    Raises:
        ValueError: tables with different poolings, or a pooling other than sum or mean; with
            ``pool_rows``, tables of different widths.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], pool_rows: int | None = None) -> None:
        super().__init__()
        self._configs = list(tables)
        poolings = {config.pooling for config in self._configs}
        if len(poolings) != 1 or next(iter(poolings)) not in _POOLING:
            raise ValueError(f"tables must share one pooling, sum or mean; got {sorted(map(str, poolings))}")
        self._features = [name for config in self._configs for name in config.feature_names]
        self._dims = [config.embedding_dim for config in self._configs for _ in config.feature_names]
        specs = [(config.num_embeddings, config.embedding_dim) for config in self._configs]
        feature_table = [t for t, config in enumerate(self._configs) for _ in config.feature_names]
        if pool_rows is not None:
            if len(set(self._dims)) != 1:
                widths = sorted(set(self._dims))
                raise ValueError(f"a shared pool needs tables of one width; got widths {widths}")
            specs, feature_table = [(pool_rows, self._dims[0])], [0] * len(self._features)
        self.pool_rows = pool_rows
        self.tbe = DenseTableBatchedEmbeddingBagsCodegen(
            specs,
            feature_table_map=feature_table,
            pooling_mode=_POOLING[next(iter(poolings))],
            use_cpu=True,
        )
        self._spans: dict[str, tuple[int, int, int]] = {}  # table -> (offset, rows, dim) in the flat weight
        if pool_rows is None:
            for config, offset in zip(self._configs, self.tbe.weights_physical_offsets, strict=False):
                self._spans[config.name] = (offset, config.num_embeddings, config.embedding_dim)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.keys() != self._features:
            features = features.permute([features.keys().index(name) for name in self._features])
        pooled = self.tbe(features.values(), features.offsets())
        return KeyedTensor(keys=self._features, length_per_key=self._dims, values=pooled)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return False

    def pool_weight(self) -> torch.Tensor:
        """The shared pool's rows (``pool_rows`` set): a view of the parameter, writes untracked."""
        return self.tbe.weights.detach().view(self.pool_rows, -1)

    def pool_grad(self) -> torch.Tensor | None:
        """The pool's rows of the last backward's gradient, or ``None`` before any."""
        grad = self.tbe.weights.grad
        return None if grad is None else grad.view(self.pool_rows, -1)

    def table_weight(self, table: str) -> torch.Tensor:
        """``table``'s rows: a view into the flat weight (writes go to the parameter, not tracked)."""
        offset, rows, dim = self._spans[table]
        return self.tbe.weights.detach()[offset : offset + rows * dim].view(rows, dim)

    def table_grad(self, table: str) -> torch.Tensor | None:
        """``table``'s rows of the last backward's gradient, or ``None`` before any."""
        grad = self.tbe.weights.grad
        if grad is None:
            return None
        offset, rows, dim = self._spans[table]
        return grad[offset : offset + rows * dim].view(rows, dim)
