"""``torchrec-prune compress`` and ``export``: outputs, the budget, bad input refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchrec_prune as tp
from torchrec_prune.cli import main
from torchrec_prune.data import SyntheticStream
from torchrec_prune.train.flops import fc_flops

TINY = ["--num-embeddings", "100", "--dense-arch", "16,4", "--over-arch", "16,8,1"]
STREAM = [
    "--rows",
    "1500",
    "--window",
    "500",
    "--increment-rows",
    "500",
    "--no-progress",
    "--batch-size",
    "64",
]


def _compress(run_dir: Path, *extra: str) -> int:
    return main(["compress", "--run-dir", str(run_dir), "--umec-rows", "1000", *TINY, *STREAM, *extra])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("compress") / "run"
    assert _compress(run_dir, "--budget", "0.4") == 0
    return run_dir


def test_compress_writes_a_run_whose_exported_model_fits_the_budget(compressed: Path):
    for name in (
        "config.json",
        "windows.jsonl",
        "summary.json",
        "allocation.json",
        "exported.pt",
        "checkpoint",
    ):
        assert (compressed / name).exists(), name
    summary = json.loads((compressed / "summary.json").read_text())
    assert summary["exported_flops_fraction"] <= 0.4
    plain, mapping = tp.load_exported(compressed / "exported.pt")
    assert mapping["format"] == 1
    stream = SyntheticStream(1500, drift=1.0, num_embeddings=100)
    batch = next(iter(stream.batches(32)))
    with torch.no_grad():
        assert plain(batch)[1][1].shape == (32,)
    allocation = json.loads((compressed / "allocation.json").read_text())
    assert allocation["steps"] and set(allocation["steps"][-1]["removed"]) == set(allocation["layers"])


def test_export_command_compacts_a_checkpoint(compressed: Path, tmp_path: Path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(compressed / "checkpoint"), "--out", str(out)]) == 0
    assert "of the dense model's FC FLOPs" in capsys.readouterr().out
    plain, _ = tp.load_exported(out)
    again, _ = tp.load_exported(compressed / "exported.pt")
    assert fc_flops(plain).forward == fc_flops(again).forward
    with pytest.raises(SystemExit) as e:  # --out exists
        main(["export", "--checkpoint", str(compressed / "checkpoint"), "--out", str(out)])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "0"], "--budget) must be a fraction of the dense model in (0, 1]"),
        (["--budget", "1.5"], "--budget) must be a fraction of the dense model in (0, 1]"),
        (["--budget", "0.5", "--bytes-budget", "-1"], "--bytes-budget) must be a fraction"),
        (["--budget", "0.0001"], "below the smallest model that keeps one group per layer"),
        (["--budget", "0.5", "--umec-rows", "0"], "umec_rows must be an integer >= 1"),
        (["--budget", "0.5", "--umec-rows", "5000"], "exceeds the 1500 rows of the stream"),
    ],
)
def test_bad_compress_input_fails_in_one_line_before_training(tmp_path: Path, capsys, flags, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _compress(run_dir, *flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()  # nothing trained, nothing written


def test_export_of_a_model_with_nothing_structured_to_remove_fails_in_one_line(tmp_path: Path, capsys):
    run_dir = tmp_path / "dense"
    argv = ["train", "--run-dir", str(run_dir), "--checkpoint-every", "0", *TINY, *STREAM]
    assert main(argv) == 0
    capsys.readouterr()  # the training run's own output
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(run_dir / "checkpoint"), "--out", str(tmp_path / "m.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nothing structured to remove" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_compress_fine_tunes_compacted_layers_with_the_masked_forward_s_results(
    compressed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The default run fine-tunes on compacted layers; ``--no-compact`` fine-tunes the masked model: the
    windows and the exported model are the same, and the run ends with full-size layers."""
    import torchrec_prune.compress as compress

    compacted: list[list[str]] = []
    real = compress.compact_
    monkeypatch.setattr(compress, "compact_", lambda *a: compacted.append(real(*a)) or compacted[-1])
    assert _compress(tmp_path / "compact", "--budget", "0.4") == 0
    assert len(compacted) == 1 and compacted[0]  # the fine-tune trained smaller layers
    assert _compress(tmp_path / "masked", "--budget", "0.4", "--no-compact") == 0
    assert len(compacted) == 1

    def windows(run: Path) -> list[float]:
        return [json.loads(line)["ce"] for line in (run / "windows.jsonl").read_text().splitlines()]

    assert windows(tmp_path / "compact") == windows(tmp_path / "masked") == windows(compressed)
    a, _ = tp.load_exported(tmp_path / "compact" / "exported.pt")
    b, _ = tp.load_exported(tmp_path / "masked" / "exported.pt")
    for (key, value), other in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(value, other), key
