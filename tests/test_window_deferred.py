"""Look-ahead windows with ``max_batch`` on 2 ranks: batch sizes exchanged once per window, same records
at the same updates as the per-step exchange, and an exact resume from a state with unplaced batches."""

import io
import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from torchrec_prune.metrics import LookAheadWindow

MAX_BATCH = 8
# Per step, (rank 0, rank 1) batch sizes <= MAX_BATCH: full steps and short ones (malformed rows skipped).
STEPS = [(8, 8), (8, 8), (3, 8), (8, 0), (8, 8), (1, 2), (8, 8), (8, 8), (8, 8), (0, 0), (5, 8), (8, 8)]
WINDOW = 40
CUT = 5  # steps before the state is saved: batches still unplaced there


def _scores(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, generator=g)
    return logits, (torch.rand(n, generator=g) < torch.sigmoid(logits)).float()


def _feed(window: LookAheadWindow, rank: int, steps: range) -> list[tuple[int, dict]]:
    """Feed ``steps``; the records each update returned, with the index of that update."""
    logits, labels = _scores(sum(map(sum, STEPS)))
    out = []
    for i in steps:
        start = sum(map(sum, STEPS[:i])) + sum(STEPS[i][:rank])
        stop = start + STEPS[i][rank]
        out += [(i, asdict(r)) for r in window.update(logits[start:stop], labels[start:stop])]
    return out


def _finish(window: LookAheadWindow, rank: int, first: int) -> dict:
    records = _feed(window, rank, range(first, len(STEPS)))
    last = window.flush()
    return {"records": records, "last": asdict(last) if last else None, "totals": asdict(window.totals())}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = {"all_gather": 0}
    real = dist.all_gather

    def counting(*args, **kwargs):
        calls["all_gather"] += 1
        return real(*args, **kwargs)

    try:
        reference = _finish(LookAheadWindow(WINDOW), rank, 0)
        dist.all_gather = counting
        deferred = LookAheadWindow(WINDOW, max_batch=MAX_BATCH)
        head = _feed(deferred, rank, range(CUT))
        buf = io.BytesIO()
        torch.save(deferred.state_dict(), buf)
        tail = _finish(deferred, rank, CUT)
        dist.all_gather = real
        restored = LookAheadWindow(WINDOW, max_batch=MAX_BATCH)
        restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        resumed = _finish(restored, rank, CUT)
        state = torch.load(io.BytesIO(buf.getvalue()))
        result = {
            "reference": reference,
            "deferred": {**tail, "records": head + tail["records"]},
            "resumed": {**resumed, "records": head + resumed["records"]},
            "gathers": calls["all_gather"],
            "pending": state["pending"],
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_deferred_sizes_give_the_same_records_at_the_same_updates_and_resume(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["deferred"] == got["reference"]  # bit-identical, closed by the same update
        assert got["resumed"] == got["reference"]
        assert got["pending"]  # the saved state held batches whose sizes were not exchanged
        windows = len(got["reference"]["records"]) + 1
        # Per window: sizes (at most twice: once early on short batches), then the AUC pairs; far fewer
        # than one exchange per update.
        assert got["gathers"] <= 3 * windows < len(STEPS) + windows
    assert [i for i, _ in got["reference"]["records"]] == [2, 6, 10]


def test_deferred_window_is_one_process_plain_and_checks_its_bound():
    logits, labels = _scores(20)
    plain, bounded = LookAheadWindow(6), LookAheadWindow(6, max_batch=4)
    for start in range(0, 20, 4):
        a = plain.update(logits[start : start + 4], labels[start : start + 4])
        assert a == bounded.update(logits[start : start + 4], labels[start : start + 4])
    assert bounded.state_dict()["pending"] == []
    with pytest.raises(ValueError, match="max_batch"):
        LookAheadWindow(6, max_batch=0)
    legacy = plain.state_dict()
    del legacy["pending"]  # a state written before batch sizes were deferred
    LookAheadWindow(6).load_state_dict(legacy)
