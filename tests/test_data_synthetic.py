"""SyntheticStream: reproducibility, random access, calibration, power law and controlled drift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchrec_prune.data import SyntheticStream


def rows(stream: SyntheticStream, batch_size: int, **kwargs) -> tuple[torch.Tensor, ...]:
    batches = list(stream.batches(batch_size, **kwargs))
    ids = torch.cat([b.sparse_features.values().view(len(stream.feature_names), -1).T for b in batches])
    return torch.cat([b.dense_features for b in batches]), ids, torch.cat([b.labels for b in batches])


def bce(p: np.ndarray, y: np.ndarray) -> float:
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


SMALL = {"num_dense": 4, "num_sparse": 5, "num_embeddings": 500}


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a = rows(SyntheticStream(3000, seed=3, drift=0.5, **SMALL), 256)
    b = rows(SyntheticStream(3000, seed=3, drift=0.5, **SMALL), 256)
    c = rows(SyntheticStream(3000, seed=4, drift=0.5, **SMALL), 256)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])


def test_start_row_gives_the_rows_reading_from_zero_would() -> None:
    stream = SyntheticStream(10_000, drift=1.0, **SMALL)
    dense, ids, labels = rows(stream, 333)
    for start in (0, 1, 4095, 4096, 5000, 9990):
        fresh = SyntheticStream(10_000, drift=1.0, **SMALL)
        tail = rows(fresh, 97, start_row=start)
        assert torch.equal(tail[0], dense[start:]) and torch.equal(tail[1], ids[start:])
        assert torch.equal(tail[2], labels[start:])


def test_two_ranks_split_the_same_rows() -> None:
    stream = SyntheticStream(5000, **SMALL)
    whole = rows(stream, 100, num_rows=4800)[1]
    parts = [list(stream.batches(100, rank=r, world_size=2, num_rows=4800)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 24
    interleaved = torch.cat(
        [b.sparse_features.values().view(5, -1).T for pair in zip(*parts, strict=True) for b in pair]
    )
    assert torch.equal(interleaved, whole)


def test_click_rate_is_calibrated_and_ids_follow_a_power_law() -> None:
    stream = SyntheticStream(20_000, base_ctr=0.25, num_embeddings=2000)
    dense, ids, labels = rows(stream, 4096)
    assert labels.mean().item() == pytest.approx(0.25, abs=0.015)
    assert stream.click_probability(0, 20_000).mean() == pytest.approx(0.25, abs=0.01)
    assert dense.shape == (20_000, 13) and bool((dense > 0).all())
    assert int(ids.min()) >= 0 and int(ids.max()) < 2000
    widest = int(np.argmax([len(torch.unique(ids[:, f])) for f in range(26)]))
    counts = torch.unique(ids[:, widest], return_counts=True)[1].sort(descending=True).values
    assert counts[0] > 20 * counts[len(counts) // 2]  # a head of popular ids and a long tail


def test_drift_zero_is_stationary() -> None:
    stream = SyntheticStream(40_000, drift=0.0, **SMALL)
    late = stream.click_probability(30_000, 5000)
    assert np.allclose(late, stream.click_probability(30_000, 5000, at_row=0))
    labels = rows(stream, 4000)[2]
    assert labels[:20_000].mean().item() == pytest.approx(labels[20_000:].mean().item(), abs=0.02)


def test_drift_rotates_which_ids_lead_to_clicks() -> None:
    stream = SyntheticStream(40_000, drift=1.0, **SMALL)
    half_turn = stream.click_probability(20_000, 4000, at_row=20_000)
    frozen = stream.click_probability(20_000, 4000, at_row=0)
    # half a turn later every id and dense score has flipped sign: the logits sum to twice the bias
    logit_sum = np.log(half_turn / (1 - half_turn)) + np.log(frozen / (1 - frozen))
    assert np.ptp(logit_sum) < 1e-6 and np.std(np.log(frozen / (1 - frozen))) > 1.0
    current = stream.click_probability(20_000, 4000)
    labels = rows(stream, 4000, start_row=20_000, num_rows=4000)[2].numpy()
    assert bce(frozen, labels) > bce(current, labels) + 0.2
    # the slower the drift, the closer the model at mid-stream stays to the one at the start
    correlations = []
    for drift in (0.05, 0.25, 1.0):
        drifting = SyntheticStream(40_000, drift=drift, **SMALL)
        now = drifting.click_probability(20_000, 4000)
        then = drifting.click_probability(20_000, 4000, at_row=0)
        correlations.append(np.corrcoef(np.log(now / (1 - now)), np.log(then / (1 - then)))[0, 1])
    assert 1 > correlations[0] > correlations[1] > 0 > correlations[2]


def test_click_probability_matches_the_label_rate() -> None:
    stream = SyntheticStream(20_000, drift=2.0, **SMALL)
    p = stream.click_probability(0, 20_000)
    labels = rows(stream, 5000)[2].numpy()
    assert bce(p, labels) < bce(np.full_like(p, labels.mean()), labels) - 0.05
    for low, high in [(0.0, 0.1), (0.4, 0.6), (0.8, 1.0)]:
        bucket = (p >= low) & (p < high)
        assert labels[bucket].mean() == pytest.approx(p[bucket].mean(), abs=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_rows": 0}, r"num_rows must be an integer >= 1"),
        ({"drift": -0.1}, r"drift must be a finite number in \[0.0, inf\)"),
        ({"drift": float("nan")}, r"drift must be a finite number"),
        ({"base_ctr": 1.0}, r"base_ctr must be a finite number in \(0.0, 1.0\)"),
        ({"zipf_exponent": 0.0}, r"zipf_exponent must be a finite number in \(0.0, inf\)"),
        ({"num_embeddings": 1}, r"num_embeddings must be an integer in \[2, 2147483648\]"),
        ({"num_sparse": 0}, r"num_sparse must be an integer >= 1"),
        ({"seed": -1}, r"seed must be an integer >= 0"),
        ({"id_signal": -1.0}, r"id_signal must be a finite number in \[0.0, inf\)"),
    ],
)
def test_bad_settings_name_field_and_range(kwargs: dict, message: str) -> None:
    settings = {"num_rows": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        SyntheticStream(**settings)


def test_zipf_exponent_one_and_tiny_tables_work() -> None:
    stream = SyntheticStream(500, zipf_exponent=1.0, num_embeddings=2, num_sparse=3)
    ids = rows(stream, 100)[1]
    assert set(ids.unique().tolist()) <= {0, 1}
