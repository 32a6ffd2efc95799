"""Ray jobs on a cluster one already has, and token authentication on every Ray the tools start.

A real head (``ray start --head``) runs on loopback with its own ports, token authentication on and its
temp dir under the test's folder, started in its own session; the fixture kills that session's processes
even when a test fails, and checks with ``ps`` that none is left. Jobs are submitted from a fresh folder
through the Job Submission API, so the package they run is the one shipped in their runtime env.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from torchrec_prune.distributed.ps import ray_session  # before ray: loopback
from torchrec_prune.distributed.ps.auth import TOKEN_FILE, ensure_token

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [
    "--num-embeddings", "500", "--dense-arch", "32,16,4", "--over-arch", "32,1", "--rows", "4000",
    "--increment-rows", "1000", "--window", "1000", "--trainers", "2", "--servers", "1",
]  # fmt: skip


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``, as ``ps`` lists them."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines())
    return [int(pid) for pid, s, state in rows if int(s) == sid and not state.startswith("Z")]


def _kill_session(sid: int, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL, every process of the head's session: only what the fixture started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout / 2
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray auth settings or a cluster address, plus ``extra``."""
    drop = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    return {k: v for k, v in os.environ.items() if k not in drop} | extra


@dataclass
class Head:
    address: str  # the dashboard: Job Submission API
    gcs: str
    token: Path
    sid: int


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")  # short: Ray's socket paths live under the temp dir
    token = ensure_token(root)
    gcs, dash, client, node, objects, agent, agent_grpc, runtime_env, metrics = _free_ports(9)
    low = random.randrange(20_000, 31_000, 100)
    env = _clean_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every listener on 127.0.0.1 (see runtime.py)
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this environment's
    )
    cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--node-manager-port={node}", f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        f"--min-worker-port={low}", f"--max-worker-port={low + 99}", "--num-cpus=2",
        f"--temp-dir={root / 'ray'}", "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        yield Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token, proc.pid)
    finally:
        proc.kill()
        _kill_session(proc.pid)
        left = _session_pids(proc.pid)
        assert not left, f"processes of the test's Ray head left running: {left}"


@pytest.fixture
def client_env(monkeypatch, tmp_path):
    """No Ray auth settings in this process, and a HOME without ~/.ray/auth_token."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from torchrec_prune.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _gcs_client(gcs: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = f"import ray; ray.init(address={gcs!r}); print('CONNECTED')"
    env = env | {"RAY_NUM_REDIS_GET_RETRIES": "2"}  # a refused client gives up after 2 tries, not 20
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def _listeners(pids: list[int]) -> set[str]:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            found.add(line.split()[3].rsplit(":", 1)[0])
    return found


def test_head_listens_on_loopback_only_and_refuses_clients_without_its_token(head, client_env, capsys):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    assert _listeners(_session_pids(head.sid)) <= {"127.0.0.1", "[::ffff:127.0.0.1]"}
    with pytest.raises(AuthenticationError, match="Missing authentication token"):
        JobSubmissionClient(head.address, headers={})
    refused = _gcs_client(head.gcs, _clean_env())
    assert refused.returncode != 0 and "Authentication token is missing or incorrect" in refused.stderr
    wrong = head.token.parent / "wrong" / TOKEN_FILE
    ensure_token(wrong.parent)
    code, _, err = _cli(["ray-submit", "--address", head.address, "--auth-token-file", str(wrong),
                         "--", "ray-train", *TINY], capsys)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refused the Ray token" in err
    assert JobSubmissionClient(head.address, headers=_bearer(head.token)).list_jobs() == []  # none submitted


def _bearer(token: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.read_text().strip()}"}


def test_embedded_ray_runs_with_token_auth_kept_owner_only_in_the_named_folder(tmp_path, client_env):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    with ray_session(None, num_cpus=1, token_dir=tmp_path):
        token = tmp_path / TOKEN_FILE
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        gcs = ray.get_runtime_context().gcs_address
        refused = _gcs_client(gcs, _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64))
        assert refused.returncode != 0 and "Authentication token is missing or incorrect" in refused.stderr
        accepted = _gcs_client(gcs, _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)))
        assert accepted.returncode == 0 and "CONNECTED" in accepted.stdout
    assert "RAY_AUTH_MODE" not in os.environ  # the process's own settings are back


def _client(head: Head, command: str, *args: str) -> list[str]:
    return [command, "--address", head.address, "--auth-token-file", str(head.token), *args]


def _submit(head: Head, *args: str) -> list[str]:
    return _client(head, "ray-submit", *args)


def test_a_grow_prune_job_from_a_fresh_folder_runs_the_shipped_package_and_its_metrics_read_back(
    head, client_env, tmp_path, monkeypatch, capsys
):
    fresh, run = tmp_path / "fresh", tmp_path / "run"
    fresh.mkdir()
    monkeypatch.chdir(fresh)  # nothing here to import: the job gets the package from its runtime env
    job = [
        "ray-train",
        *TINY,
        "--schedule",
        "alternate",
        "--window-steps",
        "5",
        "--beta",
        "0.5",
        "--drift",
        "1",
    ]
    code, out, err = _cli(_submit(head, "--", *job, "--run-dir", str(run), "--no-checkpoint"), capsys)
    assert code == 0, err[-3000:]
    package = re.search(r"torchrec-prune job: package (\S+)", out).group(1)
    assert "/runtime_resources/py_modules_files/" in package and not package.startswith(str(REPO))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples"] == 4000 and summary["closed_weight_violations"] == 0
    assert summary["mask_versions"] == [4] and len(summary["trainers"]) == 2
    job_id = re.search(r"submitted (\S+);", err).group(1)

    code, out, _ = _cli(_client(head, "ray-status", job_id), capsys)
    assert code == 0 and out.startswith(f"{job_id} SUCCEEDED")
    code, out, _ = _cli(_client(head, "ray-logs", job_id), capsys)
    assert code == 0 and "trained 4000 samples on 2 async trainers" in out


def test_a_job_that_fails_inside_exits_1_with_one_line_and_its_status_reads_failed(
    head, client_env, tmp_path, capsys
):
    work = tmp_path / "work"
    shutil.copytree(
        REPO / "torchrec_prune", work / "torchrec_prune", ignore=shutil.ignore_patterns("__pycache__")
    )
    job = ["--", "ray-train", *TINY, "--trainers", "99"]
    code, out, err = _cli(_submit(head, "--working-dir", str(work), *job), capsys)
    assert code == 1
    assert "/runtime_resources/working_dir_files/" in out  # the job ran the shipped folder
    assert "--trainers 99 with --batch-size 128 needs global batches" in out  # the job's own error
    (line,) = [e for e in err.splitlines() if e.startswith("torchrec-prune: error:")]
    assert re.match(r"torchrec-prune: error: job \S+ FAILED: .*exit code 2", line)
    job_id = line.split()[3]
    code, out, _ = _cli(_client(head, "ray-status", job_id), capsys)
    assert code == 1 and out.startswith(f"{job_id} FAILED")

    code, out, _ = _cli(_submit(head, "--no-wait", *job), capsys)  # shipped as a py_module this time
    assert code == 0 and re.fullmatch(r"raysubmit_\w+", out.strip())
    deadline = time.monotonic() + 120
    while (status := _cli(_client(head, "ray-status", out.strip()), capsys))[0] == 0:
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status[1].startswith(f"{out.strip()} FAILED")


def test_bad_input_is_one_line_and_exit_2_before_anything_is_submitted(head, client_env, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    jobs = len(JobSubmissionClient(head.address, headers=_bearer(head.token)).list_jobs())
    (closed,) = _free_ports(1)
    shared = head.token.parent / "shared"
    shared.mkdir()
    (shared / TOKEN_FILE).write_text("0" * 64)
    (shared / TOKEN_FILE).chmod(0o644)
    job = ["--", "ray-train", *TINY]
    cases = {
        "is unreachable": ["ray-submit", "--address", f"http://127.0.0.1:{closed}", *job],
        "no Ray auth token": ["ray-submit", "--address", head.address, *job],  # HOME holds none either
        "is readable by others": [
            *_submit(head, *job)[:3],
            "--auth-token-file",
            str(shared / TOKEN_FILE),
            *job,
        ],
        "does not contain the torchrec_prune package": _submit(head, "--working-dir", str(tmp_path), *job),
        "needs a command after --": _submit(head, "--"),
        "a job's help is this machine's": _submit(head, "--", "ray-train", "--help"),
        "must be http://HOST:PORT": ["ray-submit", "--address", head.gcs, *job],
        "--drift applies only with --data synthetic": _submit(
            head, *job, "--data", "criteo:x", "--drift", "1"
        ),
    }
    for message, argv in cases.items():
        code, _, err = _cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    code, _, err = _cli(_client(head, "ray-status", "raysubmit_none"), capsys)
    assert code == 2 and "raysubmit_none" in err and len(err.strip().splitlines()) == 1
    assert len(JobSubmissionClient(head.address, headers=_bearer(head.token)).list_jobs()) == jobs


def test_the_launch_script_is_the_command(tmp_path):
    (closed,) = _free_ports(1)
    proc = subprocess.run(
        [
            str(REPO / "launch" / "ray_submit.sh"),
            "--address",
            f"http://127.0.0.1:{closed}",
            "--",
            "ray-train",
        ],
        env=_clean_env(PYTHON=sys.executable, HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().endswith("Connection refused")


def test_every_flag_that_applies_only_with_another_is_checked_against_the_job_not_ray_submit(
    client_env, capsys
):
    """main() checks ``_APPLIES`` over its whole argv, the job's flags included: none may crash it."""
    from torchrec_prune.cli import _APPLIES

    (closed,) = _free_ports(1)
    for flag, (needs, _) in _APPLIES.items():
        command = "d2s" if flag in ("--threshold", "--min-age") else "train"
        argv = ["ray-submit", "--address", f"http://127.0.0.1:{closed}", "--", command, flag, "1"]
        code, _, err = _cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (flag, err)  # no AttributeError
        assert f"{flag} applies only with {needs}" in err or "is unreachable" in err, (flag, err)
