"""``torchrec-prune prune`` and the prune-then-fixed-mask procedure behind it (SPEC 4, D2S paper 6.1)."""

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from torchrec_prune.cli import main
from torchrec_prune.data import SyntheticStream
from torchrec_prune.distributed.checkpoint import load_checkpoint
from torchrec_prune.masks import wrap
from torchrec_prune.masks.linear import MaskedLinear
from torchrec_prune.metrics import read_records, relative_ce
from torchrec_prune.models import DLRMConfig, build_dlrm
from torchrec_prune.pruners.run import LambdaSearch, PruneConfig, TrainedState, prune_and_train
from torchrec_prune.train.job import JobConfig, model_config_for, run_job
from torchrec_prune.train.trainer import TrainConfig, make_optimizer

TINY = ["--num-embeddings", "100", "--dense-arch", "16,4", "--over-arch", "16,1"]
# The checkpoint is trained on the first 2,000 rows of a 4,000-row stream: same drift per row.
STREAM = ["--rows", "4000", "--drift", "1.0", "--window", "500", "--increment-rows", "1000", "--no-progress"]
PRUNE = ["--start-row", "2000", "--prune-rows", "1000"]


def _tiny_model(stream: SyntheticStream) -> torch.nn.Module:
    config = DLRMConfig(num_embeddings=100, dense_arch=[16, 4], over_arch=[16, 1])
    return wrap(build_dlrm(model_config_for(stream, config)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dense")
    config = JobConfig(
        rows=2000,
        drift=0.5,
        model=DLRMConfig(num_embeddings=100, dense_arch=[16, 4], over_arch=[16, 1]),
        train=TrainConfig(window=500, increment_rows=1000, progress=False),
        run_dir=str(run_dir),
    )
    run_job(config)
    return run_dir / "checkpoint"


def _prune(checkpoint: Path, run_dir: Path, *extra: str) -> int:
    argv = ["prune", "--checkpoint", str(checkpoint), "--run-dir", str(run_dir), *TINY, *STREAM, *PRUNE]
    return main([*argv, *extra])


def _sparsity_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "sparsity.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


RUN_FILES = ("config.json", "windows.jsonl", "windows.csv", "sparsity.csv", "summary.json", "window_ce.png")


def test_mp_prunes_each_hidden_layer_to_the_target_then_trains_on_with_the_mask(checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "mp"
    assert _prune(checkpoint, run_dir, "--method", "mp", "--sparsity", "0.5") == 0
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoint" / ".metadata").is_file()
    records = read_records(run_dir / "windows.jsonl")
    assert [r.samples_end for r in records] == [500, 1000, 1500, 2000]  # rows 2000..4000, phase included
    linear = {r["fqn"]: float(r["sparsity"]) for r in _sparsity_rows(run_dir) if r["kind"] == "linear"}
    output = "model.over_arch.model.1"
    assert linear.pop(output) == 0.0  # the logit layer is never pruned
    assert linear and all(s == pytest.approx(0.5, abs=0.01) for s in linear.values())
    out = capsys.readouterr().out
    assert "sparsity" in out and "model.dense_arch.model._mlp.0._linear" in out and "mp(0.5)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pruned_layers_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert summary["phase_steps"] == 8  # 1,000 rows in batches of 128

    # The saved model has the fixed mask: pruned weights are exact zeros.
    model = _tiny_model(SyntheticStream(4000, num_embeddings=100))
    load_checkpoint(model, run_dir / "checkpoint")
    for _, layer in model.named_modules():
        if isinstance(layer, MaskedLinear):
            assert torch.all(layer.weight[~layer.weight_mask] == 0)


@pytest.mark.parametrize(
    ("method", "knob"),
    [
        ("aux", ["--lam", "1.0", "--eps", "1.0"]),
        ("tp", ["--sparsity", "0.7"]),
        ("mop", ["--sparsity", "0.7"]),
    ],
)
def test_unstructured_methods_write_a_sparse_run(checkpoint, tmp_path, method, knob):
    run_dir = tmp_path / method
    assert _prune(checkpoint, run_dir, "--method", method, *knob) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.3 < summary["pruned_layers_sparsity"] < 1.0
    assert len(read_records(run_dir / "windows.csv")) == 4


def test_taylor_neuron_prunes_neurons_of_hidden_layers(checkpoint, tmp_path):
    run_dir = tmp_path / "neuron"
    assert _prune(checkpoint, run_dir, "--method", "taylor-neuron", "--beta", "0.5", "--no-checkpoint") == 0
    assert not (run_dir / "checkpoint").exists()
    neurons = {r["fqn"]: int(r["kept"]) for r in _sparsity_rows(run_dir) if r["kind"] == "neurons"}
    assert neurons["model.over_arch.model.0._mlp.0._linear"] == 8  # 16 neurons, half pruned
    assert neurons["model.dense_arch.model._mlp.0._linear"] == 8
    assert neurons["model.over_arch.model.1"] == 1


def test_the_job_starts_from_the_checkpoint_weights(checkpoint, tmp_path):
    from torchrec_prune.pruners.run import PruneJobConfig, prepare_prune_job

    config = PruneJobConfig(
        checkpoint=str(checkpoint),
        job=JobConfig(
            rows=4000,
            drift=1.0,
            model=DLRMConfig(num_embeddings=100, dense_arch=[16, 4], over_arch=[16, 1]),
            run_dir=str(tmp_path / "unused"),
        ),
        prune=PruneConfig("mp", prune_rows=1000),
        start_row=2000,
    )
    prepared = prepare_prune_job(config)
    torch.manual_seed(123)  # another initialisation: equal weights can only come from the checkpoint
    reference = _tiny_model(prepared.stream)
    load_checkpoint(reference, checkpoint)
    for key, value in reference.state_dict().items():
        assert torch.equal(prepared.model.state_dict()[key], value), key
    assert not (tmp_path / "unused").exists()  # preparing trains and writes nothing


ERRORS = [
    (["--method", "aux", "--lam", "-0.5"], "lam"),
    (["--method", "mp", "--sparsity", "1.0"], "sparsity"),
    (["--method", "mp", "--sparsity", "-0.1"], "sparsity"),
    (["--method", "taylor-neuron", "--beta", "0"], "beta"),
    (["--method", "taylor-neuron", "--beta", "1"], "beta"),
    (["--method", "magnitude"], "method"),
    (["--method", "aux", "--sparsity", "0.8"], "--sparsity applies to"),
    (["--method", "mp", "--prune-rows", "0"], "prune_rows"),
    (["--method", "mp", "--start-row", "3500"], "exceeds"),
    (["--method", "mp", "--dense-arch", "32,4"], "does not match the model"),
    (["--method", "mp", "--num-embeddings", "50"], "does not match the model"),
]


@pytest.mark.parametrize(("flags", "message"), ERRORS)
def test_bad_input_is_one_line_exit_2_before_training(checkpoint, tmp_path, capsys, flags, message):
    run_dir = tmp_path / "run"
    argv = ["prune", "--checkpoint", str(checkpoint), "--run-dir", str(run_dir), *STREAM, *PRUNE]
    # Later flags win, so the error cases can override the tiny shape.
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *TINY, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torchrec-prune: error:") and message in err
    assert not run_dir.exists()


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _prune(tmp_path / "nowhere", tmp_path / "run", "--method", "mp")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no DCP checkpoint" in err


def test_fine_tuning_keeps_the_phase_mask_and_dense_reference_shares_the_windows():
    stream = SyntheticStream(3000, drift=1.0, num_embeddings=100)
    train = TrainConfig(window=500, increment_rows=1000, progress=False)
    trained = _tiny_model(stream)
    prune_and_train(trained, stream, train, None, stop_row=1000)  # a short dense pre-training
    config = PruneConfig("aux", lam=1.0, eps=1.0, prune_rows=1000)

    phase_only = copy.deepcopy(trained)
    phase = prune_and_train(phase_only, stream, train, config, start_row=1000, stop_row=2000)
    full_model = copy.deepcopy(trained)
    full = prune_and_train(full_model, stream, train, config, start_row=1000)
    dense = prune_and_train(copy.deepcopy(trained), stream, train, None, start_row=1000)

    assert 0.3 < phase.sparsity < 1 and full.sparsity == phase.sparsity
    assert full.prune_samples == 1000 and full.phase_steps == 8 and dense.phase_steps == 0
    masks = {k: v for k, v in phase_only.state_dict().items() if k.endswith("weight_mask")}
    for key, mask in masks.items():
        assert torch.equal(full_model.state_dict()[key], mask), key  # frozen during fine-tuning
    for _, layer in full_model.named_modules():
        if isinstance(layer, MaskedLinear):
            assert torch.all(layer.weight[~layer.weight_mask] == 0)
    # The phase's windows are the same samples in both runs, and the dense run matches window by window.
    assert [r.ce for r in full.records[:2]] == [r.ce for r in phase.records]
    rel = relative_ce(full.records, dense.records)
    assert len(rel) == 4 and all(math.isfinite(x) for x in rel)


def test_restored_copies_continue_exactly_like_the_captured_model():
    stream = SyntheticStream(2000, drift=1.0, num_embeddings=100)
    train = TrainConfig(window=500, increment_rows=1000, progress=False)
    model = _tiny_model(stream)
    optimizer = make_optimizer(model.parameters(), train)
    prune_and_train(model, stream, train, None, stop_row=1000, optimizers=[optimizer])
    state = TrainedState.capture(model, optimizer)
    assert all(float(v["sum"].abs().sum()) > 0 for v in state.optimizer_state["state"].values())

    torch.manual_seed(7)  # another initialisation, overwritten by restore
    copy_model = _tiny_model(stream)
    copy_optimizer = state.restore(copy_model, train)
    original = prune_and_train(model, stream, train, None, start_row=1000, optimizers=[optimizer])
    restored = prune_and_train(copy_model, stream, train, None, start_row=1000, optimizers=[copy_optimizer])
    assert [r.ce for r in restored.records] == [r.ce for r in original.records]


def test_rows_that_do_not_fit_the_stream_are_rejected():
    stream = SyntheticStream(1000, num_embeddings=100)
    model = _tiny_model(stream)
    with pytest.raises(ValueError, match="do not fit"):
        prune_and_train(
            model, stream, TrainConfig(progress=False), PruneConfig("mp", prune_rows=800), start_row=500
        )


def test_lambda_search_hits_each_target_and_reuses_runs():
    calls: list[float] = []

    def sparsity_at(lam: float) -> float:  # monotone, like AUX: density exp(-lam^1.3) scaled
        calls.append(lam)
        return 1.0 - 0.9 * math.exp(-0.8 * lam**1.3)

    search = LambdaSearch(sparsity_at, rel_tol=0.05)
    for target in (0.5, 0.8, 0.95, 0.99):
        lam, sparsity = search.find(target)
        assert abs(math.log((1 - sparsity) / (1 - target))) <= math.log(1.05)
        assert sparsity == sparsity_at(lam)
    assert len(calls) == len(set(calls)) + 4  # each lambda ran once (the 4 extra are the checks above)
    assert len(search.runs) <= 16


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"lam": -1.0}, "lam"), ({"sparsity": 1.0}, "sparsity"), ({"beta": 1.0}, "beta"), ({"eps": 0.0}, "eps")],
)
def test_prune_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PruneConfig.{field}"):
        PruneConfig("aux", **kwargs)
