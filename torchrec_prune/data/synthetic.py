"""A Criteo-shaped synthetic click stream whose ground-truth click model drifts at a set rate (SPEC 1).

Real samples span too little time to show drift, so drift experiments need a stream where it is known
and controlled. Rows are generated in fixed blocks of ``BLOCK_ROWS`` positions, block ``j`` from its own
seeded generator and per-id parameters from a counter-based hash of ``(seed, feature, id)``: any
position range is reproducible on its own, and no table of ids or rows is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from torchrec_prune.data.stream import DEFAULT_NUM_EMBEDDINGS, Rows, Stream, check_int

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _hash_uniform(key: np.ndarray, salt: int) -> np.ndarray:
    """A uniform in (0, 1) per element of the uint64 array ``key``, one independent draw per ``salt``."""
    bits = _splitmix64(key ^ _splitmix64(np.full(1, salt, dtype=np.uint64)))
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _check_float(
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """Return ``value`` as a float if it is finite and within the bounds; else raise ValueError naming it."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (low < value if open_low else low <= value)
        and (value < high if open_high else value <= high)
    )
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high or high == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")
    return float(value)


@dataclass
class _Block:
    dense: np.ndarray
    latent: np.ndarray
    ids: np.ndarray
    labels: np.ndarray


class SyntheticStream(Stream):
    """Synthetic non-stationary click stream: 13 dense and 26 categorical features by default.

    Click model, for the row at position ``p`` and time ``t = p / num_rows`` (so ``drift`` is the number
    of full turns the model makes over the stream; ``theta = 2 * pi * drift * t``, and drift 0 gives a
    stationary stream)::

        P(click) = sigmoid(bias + w(t) . z + sum_f amp_f * r_f(id_f) * cos(theta + phi_f(id_f)))
        w(t)     = w_a * cos(theta) + w_b * sin(theta)

    - ``z`` ~ N(0, I) is a latent per dense feature; the row's dense value is ``log(1 + exp(mu + s * z))``,
      positive and heavy-tailed like Criteo's ``log(x + 1)`` counts, and monotone in ``z``.
    - Feature ``f`` draws a popularity rank from a power law with exponent ``zipf_exponent`` over its own
      cardinality (log-uniform in [4, num_embeddings]); an affine bijection of ``Z_num_embeddings`` maps
      the rank to the id, so popular ids are scattered over the table.
    - Each id carries a 2-D latent of Gaussian length ``r`` and uniform phase ``phi``: its score is the
      latent's projection on a direction that rotates with ``theta``, so drift changes which ids lead to
      clicks while the spread of scores stays the same. ``amp_f`` sets per-feature importance, scaled so
      that the id terms have standard deviation ``id_signal``; ``w_a``, ``w_b`` give the dense term
      standard deviation ``dense_signal``.
    - ``bias`` is calibrated once (on a fixed sample) so that the click rate is about ``base_ctr``;
      labels are Bernoulli draws of ``P(click)``.

    Features do not depend on ``num_rows`` or ``drift``, so with drift 0 a shorter stream is a prefix of
    a longer one with the same seed; with drift > 0 the clock ``t`` runs at a speed set by ``num_rows``.

    Args:
        num_rows: positions in the stream (>= 1).
        drift: full rotations of the click model over the stream (>= 0).
        seed: selects the click model and the rows (>= 0).
        num_dense, num_sparse: feature counts (>= 1).
        num_embeddings: ids per feature, in [2, 2**31].
        zipf_exponent: power-law exponent of id popularity (> 0).
        base_ctr: target click rate, in (0, 1).
        id_signal, dense_signal: standard deviations of the categorical and dense logit terms (>= 0).

    Example::

        stream = SyntheticStream(100_000, drift=1.0, seed=0)
        for batch in stream.batches(512, start_row=50_000, num_rows=10_000):
            ...
    """

    BLOCK_ROWS = 4096

    def __init__(
        self,
        num_rows: int,
        *,
        drift: float = 0.0,
        seed: int = 0,
        num_dense: int = 13,
        num_sparse: int = 26,
        num_embeddings: int = DEFAULT_NUM_EMBEDDINGS,
        zipf_exponent: float = 1.1,
        base_ctr: float = 0.22,
        id_signal: float = 2.0,
        dense_signal: float = 0.7,
    ) -> None:
        super().__init__()
        self.num_rows = check_int("num_rows", num_rows, 1)
        self.seed = check_int("seed", seed, 0)
        self.num_dense = check_int("num_dense", num_dense, 1)
        self.num_embeddings = check_int("num_embeddings", num_embeddings, 2, 2**31)
        self.feature_names = [f"cat_{i}" for i in range(check_int("num_sparse", num_sparse, 1))]
        self.drift = _check_float("drift", drift, 0.0)
        self.zipf_exponent = _check_float("zipf_exponent", zipf_exponent, 0.0, open_low=True)
        self.base_ctr = _check_float("base_ctr", base_ctr, 0.0, 1.0, open_low=True, open_high=True)
        self.id_signal = _check_float("id_signal", id_signal, 0.0)
        self.dense_signal = _check_float("dense_signal", dense_signal, 0.0)
        self._init_model()
        self._cached: tuple[int, _Block] | None = None

    def _init_model(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        d, f, n = self.num_dense, len(self.feature_names), self.num_embeddings
        self._mu = rng.uniform(0.5, 3.0, d)
        self._sigma = rng.uniform(0.5, 1.5, d)
        self._w = rng.normal(0.0, self.dense_signal / math.sqrt(d), (2, d))
        low = min(4, n)
        self._cardinality = np.exp(rng.uniform(math.log(low), math.log(n), f)).round().astype(np.int64)
        self._mult = np.array([self._coprime(rng, n) for _ in range(f)], dtype=np.int64)
        self._shift = rng.integers(0, n, f)
        weight = rng.uniform(0.2, 1.0, f)
        self._amp = self.id_signal * weight / np.linalg.norm(weight)
        self._bias = 0.0  # so that _logits below gives the unbiased logits to calibrate on
        calibration = self._sample(np.random.default_rng([self.seed, 2]), 16_384)
        self._bias = self._calibrate(self._logits(calibration, np.zeros(16_384)))

    @staticmethod
    def _coprime(rng: np.random.Generator, n: int) -> int:
        while True:
            a = int(rng.integers(1, n))
            if math.gcd(a, n) == 1:
                return a

    def _calibrate(self, logits: np.ndarray) -> float:
        """Bias that makes the mean click probability of ``logits`` equal ``base_ctr`` (bisection)."""
        low, high = -30.0, 30.0
        for _ in range(60):
            mid = (low + high) / 2
            if np.mean(1 / (1 + np.exp(-(logits + mid)))) < self.base_ctr:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    def _sample(self, rng: np.random.Generator, rows: int) -> _Block:
        """Features of ``rows`` rows drawn from ``rng``; labels are left empty (they need the logits)."""
        latent = rng.standard_normal((rows, self.num_dense))
        dense = np.log1p(np.exp(self._mu + self._sigma * latent)).astype(np.float32)
        u = rng.random((rows, len(self.feature_names)))
        a, card = self.zipf_exponent, self._cardinality + 1.0
        if abs(a - 1.0) < 1e-9:
            x = card**u
        else:
            x = (1.0 - u * (1.0 - card ** (1.0 - a))) ** (1.0 / (1.0 - a))
        rank = np.minimum(np.floor(x).astype(np.int64) - 1, self._cardinality - 1)
        ids = (rank * self._mult + self._shift) % self.num_embeddings
        return _Block(dense=dense, latent=latent, ids=ids, labels=np.empty(0, dtype=np.float32))

    def _id_latent(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Length and phase of each id's 2-D latent, a pure function of ``(seed, feature, id)``."""
        feature = np.arange(ids.shape[1], dtype=np.uint64)
        key = _splitmix64(_splitmix64(np.full(1, self.seed, dtype=np.uint64)) ^ feature)
        key = _splitmix64(key ^ ids.astype(np.uint64))
        length = np.sqrt(-2.0 * np.log(_hash_uniform(key, 1)))
        return length, 2 * np.pi * _hash_uniform(key, 2)

    def _logits(self, block: _Block, t: np.ndarray) -> np.ndarray:
        theta = 2 * np.pi * self.drift * t
        cos, sin = np.cos(theta), np.sin(theta)
        dense_term = (block.latent @ self._w[0]) * cos + (block.latent @ self._w[1]) * sin
        length, phase = self._id_latent(block.ids)
        id_term = (self._amp * length * np.cos(theta[:, None] + phase)).sum(axis=1)
        return self._bias + dense_term + id_term

    def _block(self, index: int) -> _Block:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        start = index * self.BLOCK_ROWS
        positions = np.arange(start, min(start + self.BLOCK_ROWS, self.num_rows))
        rng = np.random.default_rng([self.seed, 1, index])
        block = self._sample(rng, len(positions))
        prob = 1 / (1 + np.exp(-self._logits(block, positions / self.num_rows)))
        block.labels = (rng.random(len(positions)) < prob).astype(np.float32)
        self._cached = (index, block)
        return block

    def _slices(self, start: int, stop: int) -> Iterator[tuple[_Block, int, slice]]:
        """The blocks covering ``[start, stop)``, each with its first position and the slice inside it."""
        if stop <= start:
            return
        for index in range(start // self.BLOCK_ROWS, (stop - 1) // self.BLOCK_ROWS + 1):
            base = index * self.BLOCK_ROWS
            cut = slice(max(start, base) - base, min(stop, base + self.BLOCK_ROWS) - base)
            yield self._block(index), base, cut

    def _read(self, ranges: Iterable[tuple[int, int]]) -> Iterator[Rows]:
        for start, stop in ranges:
            parts = [(block, cut) for block, _, cut in self._slices(start, stop)]
            yield Rows(
                dense=np.concatenate([b.dense[c] for b, c in parts]),
                ids=np.concatenate([b.ids[c] for b, c in parts]),
                labels=np.concatenate([b.labels[c] for b, c in parts]),
            )

    def click_probability(self, start_row: int, num_rows: int, *, at_row: int | None = None) -> np.ndarray:
        """Ground-truth click probabilities of positions ``[start_row, start_row + num_rows)``.

        By default each row is scored by the model of its own time; ``at_row`` scores every row with the
        model as it was at that position instead (the best a model frozen there could do).
        """
        stop = self._resolve(start_row, num_rows)
        if at_row is not None:
            check_int("at_row", at_row, 0, self.num_rows)
        out = [np.empty(0)]
        for block, base, cut in self._slices(start_row, stop):
            part = _Block(block.dense[cut], block.latent[cut], block.ids[cut], block.labels[cut])
            positions = np.arange(base + cut.start, base + cut.stop)
            if at_row is not None:
                positions = np.full_like(positions, at_row)
            out.append(1 / (1 + np.exp(-self._logits(part, positions / self.num_rows))))
        return np.concatenate(out)
