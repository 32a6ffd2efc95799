"""Bad input never trains and never touches a run folder: one line on stderr naming the flag, exit 2.

Every case runs the command against a copy of a finished run folder (with run checkpoints) and asserts
that each of its files is byte-identical afterwards.
"""

import os
import shutil
from pathlib import Path

import pytest

from torchrec_prune.cli import main

TINY = ["--num-embeddings", "500", "--dense-arch", "32,16,4", "--over-arch", "32,1", "--no-progress"]
LOOP = ["--rows", "2000", "--batch-size", "50", "--window", "500", "--increment-rows", "1000"]
TRAIN = ["train", *LOOP, *TINY, "--checkpoint-every", "1000"]
PRUNE = ["prune", *LOOP, *TINY, "--method", "mp", "--prune-rows", "500"]
ROOT = os.geteuid() == 0  # root reads and writes whatever the mode bits say


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished `train` run folder with run checkpoints, and its data files."""
    base = tmp_path_factory.mktemp("bad_input")
    assert main([*TRAIN, "--run-dir", str(base / "run")]) == 0
    assert main([*TRAIN, "--checkpoint-every", "0", "--run-dir", str(base / "no_ckpt")]) == 0
    data = base / "data"
    data.mkdir()
    (data / "empty.tsv").write_bytes(b"")
    (data / "garbage.tsv").write_text("x\ty\n2\t1\n" + "0\t" * 45 + "\n")
    (data / "header.csv").write_text("ip,app,device,os,channel,click_time,attributed_time,is_attributed\n")
    (data / "secret.tsv").write_text("0\t1\n")
    (data / "secret.tsv").chmod(0)
    (data / "notes").mkdir()
    (data / "notes" / "todo.txt").write_text("mine\n")
    return base


def _truncate_data_file(folder: Path) -> None:
    data = sorted(folder.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:-7])


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("ckpt-*"))[-1]


def case(name: str, args: list[str], message: str, damage=None, marks=()):  # noqa: ANN001, ANN201
    """One bad command line ({run}: the run folder, {base}: the fixture folder), the text its error must
    hold, and what to break in the run folder first."""
    return pytest.param(args, message, damage, id=name, marks=marks)


CASES = [
    case("lr-inf", [*TRAIN, "--lr", "inf"], "--lr must be a finite number"),
    case("lr-nan", [*TRAIN, "--lr", "nan"], "--lr must be a finite number"),
    case("lr-absurd", [*TRAIN, "--lr", "1e30"], "--lr must be in (0, 1000]"),
    case("lr-zero", [*TRAIN, "--lr", "0"], "TrainConfig.lr (--lr) must be a finite number > 0"),
    case("lr-not-a-number", [*TRAIN, "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    case("drift-inf", [*TRAIN, "--drift", "inf"], "--drift must be a finite number"),
    case("timeout-zero", [*TRAIN, "--timeout", "0"], "--timeout must be a finite number of seconds > 0"),
    case(
        "batch-over-increment",
        [*TRAIN, "--batch-size", "2000", "--checkpoint-every", "4000"],
        "--increment-rows (1000) must be >= --batch",
    ),
    case("ranks-over-increment", [*TRAIN, "--nproc", "2", "--batch-size", "600"], "(600 x 2 = 1200)"),
    case("nproc-over-cores", [*TRAIN, "--nproc", "64"], "--nproc must be in [1, "),
    case("tables-over-memory", [*TRAIN, "--num-embeddings", "1000000000"], "GiB available"),
    case("momentum-adagrad", [*TRAIN, "--momentum", "0.9"], "--momentum applies only with --optimizer sgd"),
    case(
        "restarts-one-rank", [*TRAIN, "--max-restarts", "1"], "--max-restarts applies only with --nproc > 1"
    ),
    case(
        "drift-criteo",
        [*TRAIN, "--data", "criteo:{base}/data/garbage.tsv", "--drift", "2"],
        "--drift applies",
    ),
    case("data-empty", [*TRAIN, "--data", "criteo:{base}/data/empty.tsv"], "empty.tsv' is empty"),
    case("data-dir", [*TRAIN, "--data", "criteo:{base}/data"], "data' is a directory, not a data file"),
    case(
        "data-garbage",
        [*TRAIN, "--data", "criteo:{base}/data/garbage.tsv"],
        "none of its first 3 rows is valid (malformed: bad_label 2, too_many_columns 1)",
    ),
    case("data-no-rows", [*TRAIN, "--data", "talkingdata:{base}/data/header.csv"], "holds no data rows"),
    case(
        "data-unreadable",
        [*TRAIN, "--data", "criteo:{base}/data/secret.tsv"],
        "secret.tsv' is not readable",
        marks=pytest.mark.skipif(ROOT, reason="root reads any file"),
    ),
    case("run-dir-file", [*TRAIN, "--run-dir", "{run}/config.json"], "config.json' is a file, not a folder"),
    case("run-dir-below-file", [*TRAIN, "--run-dir", "{run}/config.json/x"], "is a file, not a folder"),
    case("other-settings", [*TRAIN, "--seed", "1"], "--seed (seed) is 1 on the command line but 0"),
    case(
        "other-model", [*TRAIN, "--embedding-dim", "8", "--dense-arch", "32,16,8"], "does not match the model"
    ),
    case("resume-never", [*TRAIN, "--resume", "never"], "already holds a run"),
    case(
        "finished-without-checkpoint",
        [*TRAIN, "--checkpoint-every", "0", "--run-dir", "{base}/no_ckpt"],
        "already holds a run",
    ),  # fmt: skip
    case(
        "overwrite-not-a-run",
        [*TRAIN, "--overwrite", "--run-dir", "{base}/data/notes"],
        "is not a run folder",
    ),
    case(
        "torn-checkpoint",
        [*TRAIN],
        "is torn or corrupt (data file",
        lambda run: _truncate_data_file(_newest(run)),
    ),
    case(
        "corrupt-metadata",
        [*TRAIN],
        "is torn or corrupt (UnpicklingError",
        lambda run: (_newest(run) / ".metadata").write_bytes(b"\x80\x04garbage"),
    ),
    case(
        "corrupt-manifest",
        [*TRAIN],
        "is torn or corrupt (JSONDecodeError",
        lambda run: (_newest(run) / "manifest.json").write_text('{"position": 2'),
    ),
    case(
        "threshold-fixed",
        ["d2s", *LOOP, *TINY, "--mode", "fixed", "--threshold", "0.1"],
        "--threshold applies",
    ),
    case("prune-into-source", [*PRUNE, "--checkpoint", "{run}"], "overlaps"),
    case(
        "prune-into-source-subfolder",
        [*PRUNE, "--checkpoint", "{run}/checkpoint", "--run-dir", "{run}/p"],
        "overlaps the folder of --checkpoint",
    ),
    case(
        "prune-torn-weights",
        [*PRUNE, "--checkpoint", "{run}/checkpoint", "--run-dir", "{base}/p"],
        "is torn or corrupt (data file",
        lambda run: _truncate_data_file(run / "checkpoint"),
    ),
    case(
        "prune-lam-inf",
        ["prune", *LOOP, *TINY, "--method", "aux", "--lam", "inf", "--checkpoint", "{run}"],
        "--lam must be a finite",
    ),  # fmt: skip
]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("args", "message", "damage"), CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_the_run_folder_as_it_was(
    finished, tmp_path, capsys, args, message, damage
):
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    if damage is not None:
        damage(run)
    watched = [run, finished / "no_ckpt", finished / "data"]
    before = [_files(folder) for folder in watched]
    argv = [a.format(run=run, base=finished) for a in args]
    if "--run-dir" not in argv:
        argv += ["--run-dir", str(run)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.splitlines()) == 1 and stderr.startswith("torchrec-prune"), stderr
    assert message in stderr, stderr
    assert [_files(folder) for folder in watched] == before
    assert not (finished / "p").exists()
