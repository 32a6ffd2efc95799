"""Look-ahead window metrics against direct computation, window splitting, writers, and 2-rank reduction."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from torchrec_prune.metrics import (
    LookAheadWindow,
    MetricsWriter,
    WindowRecord,
    binary_auc,
    read_records,
    relative_accuracy,
    relative_ce,
)


def _stream(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on a coarse grid (many exact ties) with labels drawn from them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(n, generator=g) * 4) / 2
    labels = (torch.rand(n, generator=g) < torch.sigmoid(logits)).float()
    return logits, labels


def _direct(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Textbook formulas in float64, independent of the library's code paths."""
    x, y = logits.double(), labels.double()
    p = 1.0 / (1.0 + torch.exp(-x))
    ce = float(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())
    ctr = float(y.mean())
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else 0.0
    pos, neg = x[y == 1], x[y == 0]
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    pairs = (diff > 0).double() + 0.5 * (diff == 0).double()
    return {
        "n": len(y),
        "ce": ce,
        "ne": ce / entropy if entropy else math.nan,
        "ctr": ctr,
        "accuracy": float(((p >= 0.5).double() == y).double().mean()),
        "auc": float(pairs.mean()) if pos.numel() and neg.numel() else math.nan,
    }


def _assert_matches(record: WindowRecord, expected: dict[str, float], tol: float = 1e-9) -> None:
    for key, value in expected.items():
        got = getattr(record, key)
        assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=tol, abs=tol), key


def _run(window: LookAheadWindow, logits, labels, sizes) -> list[WindowRecord]:
    records, start = [], 0
    for size in sizes:
        records += window.update(logits[start : start + size], labels[start : start + size])
        start += size
    assert start == len(logits)
    last = window.flush()
    return records + ([last] if last is not None else [])


def test_auc_counts_ties_as_half_and_is_order_free():
    logits, labels = _stream(300)
    assert binary_auc(logits, labels) == pytest.approx(_direct(logits, labels)["auc"], abs=1e-12)
    perm = torch.randperm(300)
    assert binary_auc(logits[perm], labels[perm]) == pytest.approx(binary_auc(logits, labels), abs=1e-12)
    assert binary_auc(torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0])) == 0.5
    assert math.isnan(binary_auc(torch.randn(5), torch.ones(5)))


def test_windows_split_batches_exactly_and_match_direct_metrics():
    logits, labels = _stream(500)
    sizes = [7, 50, 1, 200, 13, 64, 64, 100, 1]  # 200 spans several 64-sample windows
    records = _run(LookAheadWindow(64), logits, labels, sizes)
    assert [r.n for r in records] == [64] * 7 + [500 - 7 * 64]
    assert [r.window for r in records] == list(range(8))
    assert [r.samples_end for r in records] == [64 * (i + 1) for i in range(7)] + [500]
    for r in records:
        start = r.samples_end - r.n
        _assert_matches(r, _direct(logits[start : r.samples_end], labels[start : r.samples_end]))


def test_totals_cover_the_whole_stream():
    logits, labels = _stream(300, seed=1)
    window = LookAheadWindow(100)
    _run(window, logits, labels, [30] * 10)
    totals = window.totals()
    whole = _direct(logits, labels)
    assert totals.n == 300 and window.samples_seen == 300
    for key in ("ce", "ne", "ctr", "accuracy"):
        assert getattr(totals, key) == pytest.approx(whole[key], rel=1e-9)


def test_ce_is_finite_for_saturated_logits():
    window = LookAheadWindow(4)
    (record,) = window.update(torch.tensor([200.0, -200.0, 200.0, 30.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert record.ce == pytest.approx(200.0 / 4, rel=1e-9)
    assert record.accuracy == 0.75
    assert record.auc == (0.5 + 1 + 0 + 1) / 4  # positives {200, 30} against negatives {200, -200}


def test_single_class_window_has_undefined_ne_and_auc():
    window = LookAheadWindow(3)
    (record,) = window.update(torch.randn(3), torch.zeros(3))
    assert record.ctr == 0.0 and math.isfinite(record.ce)
    assert math.isnan(record.ne) and math.isnan(record.auc)
    assert window.flush() is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_window_size_is_validated(bad):
    with pytest.raises(ValueError, match="window_size"):
        LookAheadWindow(bad)


def test_mismatched_batch_is_rejected():
    with pytest.raises(ValueError, match="labels"):
        LookAheadWindow(8).update(torch.randn(4, 1), torch.ones(3))


def test_writer_outputs_parse_back(tmp_path):
    logits, labels = _stream(90, seed=2)
    labels[:20] = 0.0  # first window single-class: NaN NE and AUC must survive the round trip
    records = _run(LookAheadWindow(20), logits, labels, [15] * 6)
    with MetricsWriter(tmp_path / "run") as writer:
        writer.write(records[0])
        # Flushed per record: readable while the run is still going.
        assert [r.samples_end for r in read_records(tmp_path / "run" / "windows.jsonl")] == [20]
        assert [r.samples_end for r in read_records(tmp_path / "run" / "windows.csv")] == [20]
        writer.write_all(records[1:])
    line = json.loads((tmp_path / "run" / "windows.jsonl").read_text().splitlines()[0])
    assert line["ne"] is None and line["auc"] is None
    header = (tmp_path / "run" / "windows.csv").read_text().splitlines()[0]
    assert header == "window,samples_end,n,ce,ne,ctr,accuracy,auc"
    for name in ("windows.jsonl", "windows.csv"):
        back = read_records(tmp_path / "run" / name)
        assert len(back) == len(records)
        for got, want in zip(back, records, strict=True):
            for key, value in want.__dict__.items():
                other = getattr(got, key)
                assert (math.isnan(value) and math.isnan(other)) or other == value, (name, key)
    with pytest.raises(ValueError, match="jsonl"):
        read_records(tmp_path / "run" / "windows.txt")


def test_relative_ce_and_accuracy_on_the_same_samples():
    logits, labels = _stream(200, seed=3)
    reference = _run(LookAheadWindow(50), logits, labels, [40] * 5)
    model = _run(LookAheadWindow(50), logits * 0.5, labels, [25] * 8)
    rel = relative_ce(model, reference)
    assert rel == pytest.approx([m.ce / r.ce - 1 for m, r in zip(model, reference, strict=True)])
    assert all(v != 0 for v in rel)
    assert relative_accuracy(reference, reference) == [0.0] * 4
    assert relative_accuracy(model, reference) == pytest.approx(
        [m.accuracy / r.accuracy - 1 for m, r in zip(model, reference, strict=True)]
    )
    shifted = _run(LookAheadWindow(40), logits, labels, [40] * 5)
    with pytest.raises(ValueError, match="ending at"):
        relative_ce(shifted[:4], reference)
    with pytest.raises(ValueError, match="same windows"):
        relative_accuracy(shifted, reference)


# ---- two ranks over gloo ------------------------------------------------------------------------------
GLOBAL_SIZES = [10, 33, 1, 0, 80, 24, 60, 12]  # global batch per step; the last window is partial
WINDOW = 32


def _rank_slices(step_size: int) -> list[tuple[int, int]]:
    """Uneven split of one global batch: rank 0 takes the first third (possibly nothing)."""
    cut = step_size // 3
    return [(0, cut), (cut, step_size)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits, labels = _stream(sum(GLOBAL_SIZES), seed=4)
        window = LookAheadWindow(WINDOW)
        records, start = [], 0
        for size in GLOBAL_SIZES:
            lo, hi = _rank_slices(size)[rank]
            records += window.update(logits[start + lo : start + hi], labels[start + lo : start + hi])
            start += size
        records.append(window.flush())
        totals = window.totals()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"records": [r.__dict__ for r in records], "totals": totals.__dict__}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_reproduce_single_process_records(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, labels = _stream(sum(GLOBAL_SIZES), seed=4)
    single = LookAheadWindow(WINDOW)
    expected = _run(single, logits, labels, GLOBAL_SIZES)
    assert [r.n for r in expected] == [32] * 6 + [28]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        records = [WindowRecord.from_dict(r) for r in got["records"]]
        assert [(r.window, r.samples_end, r.n) for r in records] == [
            (r.window, r.samples_end, r.n) for r in expected
        ]
        for mine, ref in zip(records, expected, strict=True):
            _assert_matches(mine, {k: getattr(ref, k) for k in ("ce", "ne", "ctr", "accuracy", "auc")}, 1e-6)
        assert got["totals"]["ce"] == pytest.approx(single.totals().ce, rel=1e-6)
