"""D2S's checkpointable state (exact resume at an increment boundary) and D2S on two torchrun ranks (DMP)."""

import copy
import dataclasses
import gc
import importlib.util
import io
import json
import weakref

import pytest
import torch
from conftest import REPO, run_torchrun

import torchrec_prune as tp
from torchrec_prune.data.synthetic import SyntheticStream
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners import AuxConfig
from torchrec_prune.schedules import D2SConfig, D2SController, D2SResult
from torchrec_prune.train.replica import Replica
from torchrec_prune.train.trainer import TrainConfig

CONFIG = DLRMConfig(
    num_dense=3, num_sparse=3, num_embeddings=20, embedding_dim=4, dense_arch=[16, 8, 4], over_arch=[16, 8, 1]
)
TRAIN = TrainConfig(
    batch_size=50, lr=0.05, optimizer="adagrad", window=150, increment_rows=200, progress=False
)
# A low threshold makes the adaptive line re-prune early often, so resumes land on pending early swaps.
D2S = D2SConfig(
    r=3,
    p=2,
    warmup=2,
    threshold=1e-3,
    aux=AuxConfig(lam=1.75, eps=0.3),
    lines=("fixed", "adaptive", "adaptation"),
)


def _controller() -> D2SController:
    torch.manual_seed(0)
    model = tp.wrap(build_dlrm(CONFIG))
    return D2SController(
        model, SyntheticStream(12 * 200, drift=2.0, num_dense=3, num_sparse=3, num_embeddings=20), TRAIN, D2S
    )


def _tensors(replica: Replica) -> dict[str, object]:
    """Independent copies of a replica's model and optimizer state (what a checkpoint would hold)."""
    return copy.deepcopy(
        {"model": replica.model.state_dict(), "optim": [o.state_dict() for o in replica.optimizers]}
    )


def _final_models(controller: D2SController) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: r.model.state_dict() for name, r in controller.replicas().items() if not name.startswith("snap")
    }


def _assert_same_run(a: D2SResult, b: D2SResult) -> None:
    assert a.dense == b.dense
    for name, line in a.lines.items():
        other = b.lines[name]
        assert line.records == other.records, name
        assert (line.births, line.sources, line.history, line.gaps) == (
            other.births,
            other.sources,
            other.history,
            other.gaps,
        ), name
        assert line.sparsity == other.sparsity and line.serving_flops == other.serving_flops, name
        assert line.pruning_flops == other.pruning_flops, name
    assert a.dense_flops == b.dense_flops


# Stops: in the warm-up; serving, with a look-ahead window open; with an early re-prune pending.
@pytest.mark.parametrize("stop, early", [(1, []), (4, []), (8, ["adaptive"])])
def test_resume_at_an_increment_boundary_is_bitwise_equal_to_an_uninterrupted_run(
    stop: int, early: list[str]
):
    saved: dict[str, object] = {}

    def checkpoint(k: int) -> None:
        if k == stop:
            saved["replicas"] = {name: _tensors(r) for name, r in first.replicas().items()}
            saved["state"] = copy.deepcopy(first.state_dict())

    first = _controller()
    uninterrupted = first.run(on_increment_end=checkpoint)
    state = saved["state"]
    # The state is plain Python and small CPU tensors (no model), and names only live replicas: the
    # dense model, its last p snapshots and each line's serving model once there is one.
    torch.save(state, io.BytesIO())
    names = set(saved["replicas"])
    serving = {f"line.{n}" for n in D2S.lines} if stop >= D2S.first_serving else set()
    assert names == {"dense", f"snapshot.{stop - 1}", f"snapshot.{stop}"} | serving
    assert state["next"] == stop + 1 and state["early"] == early

    resumed = _controller()
    resumed.prepare_resume(state)
    replicas = resumed.replicas()
    assert set(replicas) == names
    for name, replica in replicas.items():
        replica.model.load_state_dict(saved["replicas"][name]["model"])
        for optimizer, optimizer_state in zip(
            replica.optimizers, saved["replicas"][name]["optim"], strict=True
        ):
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    resumed.load_state_dict(state)
    _assert_same_run(uninterrupted, resumed.run())
    ends, again = _final_models(first), _final_models(resumed)
    assert set(ends) == set(again) == {"dense", *(f"line.{n}" for n in D2S.lines)}
    for name, tensors in ends.items():  # weights and every mask
        for key, value in tensors.items():
            assert torch.equal(value, again[name][key]), (name, key)


def test_resume_needs_prepare_resume_first():
    done = _controller()
    saved = {}
    done.run(
        on_increment_end=lambda k: (
            saved.setdefault("state", copy.deepcopy(done.state_dict())) if k == 4 else None
        )
    )
    with pytest.raises(ValueError, match="call prepare_resume"):
        _controller().load_state_dict(saved["state"])


def test_replicas_no_longer_needed_are_released():
    controller = _controller()
    served: dict[int, weakref.ref] = {}  # birth -> the fixed line's model born then

    def track(k: int) -> None:
        current = controller.lines["fixed"].current
        if current is not None:
            served.setdefault(current.birth, weakref.ref(current.model))
        assert len(controller.dense.snapshots) == min(k + 1, D2S.p)

    controller.run(on_increment_end=track)
    gc.collect()
    assert len(served) > 1
    assert [b for b, ref in served.items() if ref() is not None] == [controller.lines["fixed"].current.birth]


# ------------------------------------------------------------------------------------------------------
WORKER = REPO / "tests" / "dist_workers" / "d2s_worker.py"


def _worker_module():
    spec = importlib.util.spec_from_file_location("d2s_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_d2s_on_two_torchrun_ranks_agrees_across_ranks_and_matches_one_process(tmp_path):
    run_torchrun(WORKER, [str(tmp_path)])
    ranks = json.loads((tmp_path / "result.json").read_text())
    # Masks, swaps, CE gaps and windows: identical on both ranks (all-reduced figures decide).
    assert ranks["masks_identical"] and ranks["decisions_identical"]
    fixed, adaptive = ranks["lines"]["fixed"], ranks["lines"]["adaptive"]
    assert fixed["births"] == [1, 3, 5] and ranks["pruned"]["fixed"] > 0
    assert set(adaptive["births"]) - {1, 3, 5}, "the adaptive line never re-pruned early"
    # Resumed under DMP after increment 3 (an early re-prune pending): bitwise the same windows and swaps.
    assert ranks["resume_identical"]

    worker = _worker_module()
    model = worker.initial_model()
    model.load_state_dict(torch.load(tmp_path / "initial.pt"))
    config = dataclasses.replace(worker.D2S, lines=("fixed",))  # the fixed line does not depend on others
    one = D2SController(model, worker.stream(), worker.TRAIN_ONE_PROCESS, config).run()
    assert one.lines["fixed"].births == fixed["births"]
    ce_one = [r.ce for r in one.lines["fixed"].records]
    gaps = [abs(a / b - 1.0) for a, b in zip(fixed["ce"], ce_one, strict=True)]
    # Same initial weights and global batches (2 x 64 vs 128). What differs: DDP's gradient averaging
    # (float summation order), the tables' fused EXACT_ADAGRAD kernel vs torch.optim.Adagrad (other eps,
    # gradients summed over ranks; Adagrad is scale-invariant up to eps), and AUX masks are signs of
    # latent scores, so a weight near 0 may flip and shift later windows. Measured: relative CE gap per
    # window 5.5e-5 .. 2.9e-3, mean 4.6e-4 (12 windows). Bounds: 1e-2 per window, 2e-3 on the mean,
    # about 3.5x and 4x the measurement, and below the D2S effects under study (gaps of 0.3-2% vs dense).
    assert max(gaps) < 1e-2
    assert sum(gaps) / len(gaps) < 2e-3
