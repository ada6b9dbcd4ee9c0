"""Sweeps with real worker processes: two workers on one PostgreSQL study, and a worker killed mid-trial."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import TINY
from freezebench.sweeps import run_sweep
from freezebench.sweeps.storage import open_storage
from optuna.trial import TrialState

pytestmark = pytest.mark.slow


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if
                  d.split("/")[-2].isdigit() else 0)
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on loopback (initdb + pg_ctl), stopped and deleted afterwards. PostgreSQL
    refuses to run as root, so as root it runs as ``nobody``."""
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install 'freezebench[postgres]'")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) found; .ci/run installs the Debian package postgresql")
    root = tempfile.mkdtemp(prefix="freezebench-pg-")
    data = os.path.join(root, "data")
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chmod(root, 0o755)
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    port = _free_port()

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(as_user + [str(bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=120, check=check, cwd=root)

    try:
        pg("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C")
        pg("pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o",
           f"-h 127.0.0.1 -p {port} -k {root} -F", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr or e.stdout}") from None
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _worker(space: str, storage: str, study: str, overrides: list[str], flags: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "freezebench", "sweep", space, *overrides, "--storage", storage, "--study", study,
           "--no-plots", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONUNBUFFERED": "1"})


def test_two_workers_on_postgres_run_every_point_once(tmp_path, mlflow_uri, postgres_url):
    space = tmp_path / "grid.yaml"
    space.write_text("name: grid\nparams:\n  policy: [static, full, freezeout_linear]\nseeds: [0, 1]\n")
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    client.search_experiments()  # the MLflow store's tables exist before the workers start
    # both workers start together: they race to create the Optuna tables, the study and its queue
    workers = [_worker(str(space), postgres_url, "two-workers", TINY + ["trainer.epochs=2"]) for _ in range(2)]
    outs = [w.communicate(timeout=400)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    study = optuna.load_study(study_name="two-workers", storage=open_storage(postgres_url))
    print(*outs, sep="\n----\n")
    trials = study.get_trials()
    # 3 points x 2 seeds: every grid entry ran exactly once, none twice, none re-queued
    assert sorted(t.user_attrs["grid_index"] for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE and "retry_of" not in t.user_attrs for t in trials)
    ran = [sum(1 for line in o.splitlines() if line.startswith("trial ")) for o in outs]
    assert sum(ran) == 6, outs
    # one parent run; every trial's run sits under it
    parent = study.user_attrs["mlflow_parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string="tags.study = 'two-workers' and tags.kind = 'sweep-trial'",
                              max_results=100)
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs)
    sweeps = client.search_runs([exp], filter_string="tags.kind = 'sweep' and tags.study = 'two-workers'")
    assert [r.info.run_id for r in sweeps] == [parent]
    assert all("val acc (%)" in o for o in outs)


def test_killed_worker_trial_is_taken_over_on_rerun(tmp_path, mlflow_uri):
    space = tmp_path / "k.yaml"
    space.write_text("name: k\nparams:\n  policy: [static, full, freezeout_linear]\n")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    mlflow.tracking.MlflowClient(mlflow_uri).search_experiments()
    overrides = TINY + ["trainer.epochs=10"]  # trials of a few seconds: time to kill one
    w = _worker(str(space), storage, "s", overrides, ["--heartbeat", "0.5", "--grace", "3"])
    try:
        deadline = time.monotonic() + 300
        killed = None
        while killed is None:  # kill the worker in the middle of its second trial
            assert time.monotonic() < deadline and w.poll() is None, "the worker ended before it could be killed"
            try:
                trials = optuna.load_study(study_name="s", storage=storage).get_trials()
            except Exception:  # study not created yet
                trials = []
            for t in trials:
                if t.user_attrs.get("grid_index") == 1 and t.state == TrialState.RUNNING and \
                        "sweep:heartbeat" in t.system_attrs:
                    killed = t.number
            time.sleep(0.05)
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=30)
    finally:
        if w.poll() is None:
            w.kill()
    before = {t.number: t.state for t in optuna.load_study(study_name="s", storage=storage).get_trials()}
    assert before == {0: TrialState.COMPLETE, 1: TrialState.RUNNING, 2: TrialState.WAITING}

    res = run_sweep(str(space), overrides, storage=storage, study="s", heartbeat_s=0.5, grace_s=3, plots=False,
                    echo=None)
    trials = res.study.get_trials()
    by_index: dict[int, list] = {}
    for t in trials:
        by_index.setdefault(t.user_attrs["grid_index"], []).append(t)
    assert sorted(by_index) == [0, 1, 2]
    assert [t.state for t in by_index[0]] == [TrialState.COMPLETE]  # done before the kill: not run again
    lost, retry = by_index[1]
    assert lost.number == killed and lost.state == TrialState.FAIL
    assert lost.user_attrs["fail_reason"].startswith("worker lost: no heartbeat")
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == killed, retry.user_attrs
    assert [t.state for t in by_index[2]] == [TrialState.COMPLETE]
    assert sorted(res.ran) == sorted([retry.number, by_index[2][0].number])
    assert [r["n"] for r in res.rows] == [1, 1, 1] and all(r["failed"] == 0 for r in res.rows)
