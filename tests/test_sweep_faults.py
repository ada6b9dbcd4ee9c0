"""A sweep worker SIGKILLed at each fault point (``FREEZEBENCH_FAULT``), then the sweep run again.

After the re-run: every grid point completed exactly once, the lost trial's MLflow child is KILLED with the
reason, its retry resumed the lost trial's checkpoint (not started over) and ends with the weights and
metrics of an uninterrupted run, logged once per step, and no run of the study is left RUNNING.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from conftest import TINY
from freezebench.config import load_config
from freezebench.sweeps import run_sweep
from freezebench.trainer import Trainer
from helpers import THREADS
from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
PER_EPOCH = ("train/loss", "val/acc", "cost/tflops", "freeze/frozen_units")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Grid point 0 (policy=full, seed 0) trained once without interruption, ``THREADS`` threads."""
    torch.set_num_threads(THREADS)
    out = tmp_path_factory.mktemp("ref")
    t = Trainer(load_config([*TINY, "policy=full", "trainer.seed=0", "tracking.enabled=false",
                             "trainer.checkpoint_every=0", f"trainer.output_dir={out}"]))
    result = t.fit()
    return {k: v.clone() for k, v in t.model.state_dict().items()}, result.history


def kill_worker_and_rerun(fault: str, tmp_path: Path, mlflow_uri: str, reference, sig: str = "SIGKILL") -> None:
    """Run a sweep worker until ``fault`` sends it ``sig``, check what it left, re-run the sweep and check
    that it completes exactly as an uninterrupted sweep would."""
    study = f"fault-{fault.replace(':', '-')}-{sig}"
    space = tmp_path / "g.yaml"
    space.write_text("name: g\nparams:\n  policy: [full, static]\nseeds: [0]\n")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    client.search_experiments()  # the store's tables exist before the worker starts
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update({"FREEZEBENCH_FAULT": fault, "FREEZEBENCH_FAULT_SIGNAL": sig, "OMP_NUM_THREADS": str(THREADS),
                "PYTHONPATH": str(HERE.parent),
                "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"})
    worker = subprocess.run([sys.executable, "-m", "freezebench", "sweep", str(space), *TINY, "--storage", storage,
                             "--study", study, "--no-plots", "--heartbeat", "0.5", "--grace", "3"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    lost = trials[0]
    if sig == "SIGKILL":
        assert worker.returncode == -signal.SIGKILL, worker.stdout + worker.stderr
        assert lost.state == TrialState.RUNNING and lost.user_attrs["mlflow_run_id"]  # linked when it started
        assert client.get_run(lost.user_attrs["mlflow_run_id"]).info.status == "RUNNING"  # the orphan, for now
        lost_reason = "worker lost: no heartbeat"
    else:  # a signal the worker handles: it checkpoints, re-queues the trial and stops, starting no other
        assert worker.returncode == 128 + signal.Signals[sig], worker.stdout + worker.stderr
        [line] = [ln for ln in worker.stderr.splitlines() if ln.startswith("freezebench: SIG")
                  and "re-queued" in ln]
        assert f"{lost.user_attrs['mlflow_run_id']}/last.pt" in line and "resume=" not in line
        assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"] == "interrupted"
        assert [t.state for t in trials[1:]] == [TrialState.WAITING] * 2  # grid point 1 was never started
        [retry] = [t for t in trials[1:] if "retry_of" in t.user_attrs]
        assert retry.user_attrs["retry_of"] == lost.number and retry.user_attrs["grid_index"] == 0
        assert retry.user_attrs["resume_from"] == lost.user_attrs["checkpoint"]
        assert Path(lost.user_attrs["checkpoint"]).is_absolute()
        assert Path(lost.user_attrs["checkpoint"]).is_file()
        assert client.get_run(lost.user_attrs["mlflow_run_id"]).info.status == "KILLED"
        lost_reason = None

    res = run_sweep(str(space), list(TINY), storage=storage, study=study, heartbeat_s=0.5, grace_s=3, plots=False,
                    echo=None)
    by_index: dict[int, list] = {}
    for t in res.study.get_trials():
        by_index.setdefault(t.user_attrs["grid_index"], []).append(t)
    assert sorted(by_index) == [0, 1]
    assert [t.state for t in by_index[1]] == [TrialState.COMPLETE]
    first, retry = by_index[0]
    assert first.number == lost.number and first.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == lost.number
    assert retry.user_attrs["resume_from"] == lost.user_attrs["checkpoint"]  # resumed, not started over
    killed = client.get_run(lost.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED"
    if lost_reason:
        assert lost_reason in killed.data.tags["error"]

    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["retry_of_run"] == killed.info.run_id
    assert run.data.tags["mlflow.parentRunId"] == res.parent_run_id
    weights, history = reference
    final = torch.load(tmp_path / "outputs" / run.info.run_id / "final.pt", weights_only=True)["model_state"]
    assert all(torch.equal(weights[k], final[k]) for k in weights)
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    for key in PER_EPOCH:
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == [(i + 1, h[key]) for i, h in enumerate(history)], key
    exp = client.get_run(res.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.study = '{study}'", max_results=100)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert sorted(r.info.status for r in runs if r.data.tags.get("kind") == "sweep-trial") == \
        ["FINISHED", "FINISHED", "KILLED"]
    assert list((tmp_path / "outputs").rglob("*.tmp")) == []


@pytest.mark.slow
def test_worker_lost_mid_trial_resumes_its_checkpoint(tmp_path, mlflow_uri, reference):
    kill_worker_and_rerun("mid_trial:2", tmp_path, mlflow_uri, reference)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["mid_step:1", "after_epoch_log:2", "mid_checkpoint_write:2",
                                   "mid_checkpoint_write:3", "after_final_checkpoint"])
def test_worker_killed_at_every_fault_point(fault, tmp_path, mlflow_uri, reference):
    kill_worker_and_rerun(fault, tmp_path, mlflow_uri, reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_worker_stopped_by_a_signal_requeues_and_exits(sig, tmp_path, mlflow_uri, reference):
    """SIGTERM (a scheduler's kill) or Ctrl-C in the middle of a trial: the worker checkpoints, re-queues the
    trial to resume it and exits 128 + signum, instead of failing the trial and starting the next one."""
    kill_worker_and_rerun("mid_trial:2", tmp_path, mlflow_uri, reference, sig=sig)
