"""CriteoStream: parsing, ragged lines, transforms, malformed rows, and the real Kaggle samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_prune.data import MISSING_ID, CriteoStream
from torchrec_prune.data.criteo import count_lines

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo"


def line(label: str = "0", dense: list[str] | None = None, cats: list[str] | None = None) -> str:
    dense = [str(i) for i in range(13)] if dense is None else dense
    cats = [f"{i:08x}" for i in range(26)] if cats is None else cats
    return "\t".join([label, *dense, *cats])


def write(tmp_path: Path, lines: list[str], end: str = "\n") -> Path:
    path = tmp_path / "rows.tsv"
    path.write_text("\n".join(lines) + end)
    return path


def test_transforms_follow_dlrm_and_hash_into_reserved_table(tmp_path: Path) -> None:
    dense = ["", "-3", "10", *["0"] * 10]
    cats = ["ff", "", *["a"] * 24]
    stream = CriteoStream(write(tmp_path, [line("1", dense, cats)]), num_embeddings=11)
    (batch,) = list(stream.batches(8))
    assert batch.labels.tolist() == [1.0]
    assert batch.dense_features[0, :3].tolist() == pytest.approx([0.0, 0.0, math.log(11)])
    kjt = batch.sparse_features.to_dict()
    assert kjt["cat_0"].values().tolist() == [1 + 0xFF % 10]
    assert kjt["cat_1"].values().tolist() == [MISSING_ID]
    assert stream.feature_names == [f"cat_{i}" for i in range(26)] and stream.num_dense == 13


def test_ragged_line_equals_its_padded_form(tmp_path: Path) -> None:
    full = line("1", cats=[f"{i:x}" for i in range(1, 24)] + ["", "", ""])
    ragged = full.rstrip("\t")
    assert ragged.count("\t") == 36
    stream = CriteoStream(write(tmp_path, [full, ragged, "0"]))
    (batch,) = list(stream.batches(8))
    assert torch.equal(batch.dense_features[0], batch.dense_features[1])
    values = batch.sparse_features.values().view(26, 3)
    assert torch.equal(values[:, 0], values[:, 1])
    assert values[23:, 0].tolist() == [MISSING_ID] * 3
    assert values[:, 2].tolist() == [MISSING_ID] * 26 and batch.dense_features[2].abs().sum() == 0
    assert stream.stats.malformed_rows == 0


def test_rows_come_in_file_order_and_line_count_is_exact(tmp_path: Path) -> None:
    rows = [line(str(i % 2), dense=[str(i), *["0"] * 12]) for i in range(11)]
    for end in ("\n", ""):
        path = write(tmp_path, rows, end=end)
        assert count_lines(path) == 11
        batches = list(CriteoStream(path).batches(3))
        dense = torch.cat([b.dense_features for b in batches])
        labels = torch.cat([b.labels for b in batches])
        assert torch.expm1(dense[:, 0]).round().tolist() == list(range(11))
        assert labels.tolist() == [i % 2 for i in range(11)]


def test_two_ranks_read_disjoint_halves_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, [line(dense=[str(i), *["0"] * 12]) for i in range(21)])
    seen = []
    for rank in range(2):
        stream = CriteoStream(path)
        batches = list(stream.batches(4, rank=rank, world_size=2))
        assert len(batches) == stream.num_batches(4, world_size=2) == 3
        seen += torch.cat([b.dense_features[:, 0] for b in batches]).expm1().round().long().tolist()
    assert sorted(seen) == list(range(21)) and len(set(seen)) == 21


MALFORMED = [
    (line(label="2"), "bad_label"),
    (line(label=""), "bad_label"),
    ("", "bad_label"),
    (line(dense=["1.5", *["0"] * 12]), "bad_dense"),
    (line(dense=["x", *["0"] * 12]), "bad_dense"),
    (line(dense=[" 5", *["0"] * 12]), "bad_dense"),
    (line(cats=["zz", *["a"] * 25]), "bad_categorical"),
    (line(cats=["0x1f", *["a"] * 25]), "bad_categorical"),
    (line() + "\textra", "too_many_columns"),
]


def test_malformed_rows_are_counted_and_skipped(tmp_path: Path) -> None:
    good = line("1")
    lines = [good]
    for bad, _ in MALFORMED:
        lines += [bad, good]
    stream = CriteoStream(write(tmp_path, lines))
    batches = list(stream.batches(4))
    assert len(batches) == stream.num_batches(4) == math.ceil(len(lines) / 4)
    assert sum(len(b.labels) for b in batches) == len(MALFORMED) + 1 == stream.stats.rows_read
    expected: dict[str, int] = {}
    for _, reason in MALFORMED:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stream.stats.malformed) == expected


@pytest.mark.parametrize(("bad", "reason"), MALFORMED)
def test_strict_raises_with_line_number(tmp_path: Path, bad: str, reason: str) -> None:
    path = write(tmp_path, [line(), line(), bad, line()])
    with pytest.raises(ValueError, match=rf"rows.tsv:3: malformed row \({reason}\)"):
        list(CriteoStream(path, strict=True).batches(2))


def test_constructor_checks(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Criteo TSV file not found"):
        CriteoStream(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match=r"num_embeddings must be an integer >= 2, got 1"):
        CriteoStream(write(tmp_path, [line()]), num_embeddings=1)


def real_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real Criteo sample {path} is absent (see shared/data/README.md)")
    return path


def test_real_ragged_sample_parses_every_line() -> None:
    stream = CriteoStream(real_file("kaggle_first_1k.tsv"), num_embeddings=1000)
    batches = list(stream.batches(128))
    assert stream.num_rows == 1000 and stream.stats.rows_read == 1000 and stream.stats.malformed_rows == 0
    labels = torch.cat([b.labels for b in batches])
    assert labels.mean().item() == pytest.approx(0.205, abs=1e-3)
    values = torch.cat([b.sparse_features.values() for b in batches])
    assert int(values.min()) >= 0 and int(values.max()) < 1000
    assert (values == MISSING_ID).any()


def test_real_head_splits_match_readme_click_rates() -> None:
    for name, rows, ctr in [
        ("kaggle_head_train.tsv", 7200, 0.215),
        ("kaggle_head_dev.tsv", 409, 0.227),
        ("kaggle_head_test.tsv", 391, 0.220),
    ]:
        stream = CriteoStream(real_file(name))
        labels = np.concatenate([b.labels.numpy() for b in stream.batches(512)])
        assert stream.num_rows == len(labels) == rows and stream.stats.malformed_rows == 0
        assert labels.mean() == pytest.approx(ctr, abs=1e-3)


def test_real_two_rank_read_covers_the_file_once() -> None:
    path = real_file("kaggle_first_1k.tsv")
    whole = torch.cat([b.dense_features for b in CriteoStream(path).batches(50)])
    parts = [list(CriteoStream(path).batches(50, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 10
    interleaved = torch.cat([b.dense_features for pair in zip(*parts, strict=True) for b in pair])
    assert torch.equal(interleaved, whole)


def test_max_rows_caps_the_stream(tmp_path: Path) -> None:
    path = write(tmp_path, [line(dense=[str(i), *["0"] * 12]) for i in range(30)], end="")
    assert [count_lines(path, limit) for limit in (0, 7, 30, 99)] == [0, 7, 30, 30]
    stream = CriteoStream(path, max_rows=7)
    assert stream.num_rows == 7
    dense = torch.cat([b.dense_features for b in stream.batches(4)])
    assert torch.expm1(dense[:, 0]).round().tolist() == list(range(7))
    with pytest.raises(ValueError, match="max_rows must be an integer >= 0"):
        CriteoStream(path, max_rows=-1)
