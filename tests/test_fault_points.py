"""Kill a real ``freezebench train`` process at every named fault point, resume it, and check the outcome.

``FREEZEBENCH_FAULT=POINT[:EPOCH]`` (:mod:`freezebench.faults`) SIGKILLs the process there. After
``resume=auto`` the run must end exactly where an uninterrupted run ends: the same final weights
(``torch.equal``), one FINISHED MLflow run without an ``error`` tag, every metric logged once per step with
the uninterrupted run's values, and no temporary file left. Both processes run with ``helpers.THREADS`` threads (the
checkpoint records the thread count, and a resume under another is not bit-exact).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from freezebench.config import load_config
from freezebench.trainer import Trainer
from freezebench.trainer import checkpoint as ckpt
from helpers import THREADS

HERE = Path(__file__).resolve().parent
ARGS = ["policy=autofreeze", "model.granularity=layer"]  # freezes mid-run: the freezer state must survive
PER_EPOCH = ("train/loss", "val/acc", "val/loss", "cost/tflops", "freeze/frozen_units", "lr")


def cli(args: list[str], cwd: Path, uri: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(HERE.parent), "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    env.pop("FREEZEBENCH_FAULT", None)
    env.pop("MLFLOW_RUN_ID", None)
    if fault:
        env["FREEZEBENCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "freezebench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (untracked, ``THREADS`` threads, in this process): final weights and history."""
    from conftest import TINY

    torch.set_num_threads(THREADS)
    out = tmp_path_factory.mktemp("ref")
    t = Trainer(load_config([*TINY, *ARGS, "tracking.enabled=false", "trainer.checkpoint_every=0",
                             f"trainer.output_dir={out}"]))
    result = t.fit()
    return {k: v.clone() for k, v in t.model.state_dict().items()}, result.history


def kill_and_resume(fault: str, tiny_overrides, tmp_path, mlflow_uri, reference) -> str:
    """Run until ``fault`` kills it, resume, check every invariant; returns the MLflow run id."""
    name = f"fault-{fault.replace(':', '-')}"
    args = ["train", *tiny_overrides, *ARGS, f"tracking.run_name={name}"]
    killed = cli(args, tmp_path, mlflow_uri, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert f"fault point {fault.split(':')[0]}" in killed.stderr
    resumed = cli([*args, "resume=auto"], tmp_path, mlflow_uri)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr and "not bit-exact" not in resumed.stderr

    client = mlflow.tracking.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("freezebench").experiment_id
    [run] = client.search_runs([exp], f"attributes.run_name = '{name}'")  # one run, continued
    assert run.info.status == "FINISHED"
    assert "error" not in run.data.tags
    weights, history = reference
    final = torch.load(tmp_path / "outputs" / run.info.run_id / "final.pt", weights_only=True)["model_state"]
    assert final.keys() == weights.keys()
    assert all(torch.equal(weights[k], final[k]) for k in weights)
    for key in run.data.metrics:  # every key: one value per step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    for key in PER_EPOCH:
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == [(i + 1, h[key]) for i, h in enumerate(history)], key
    for key in ("time/total_s", "cost/saving_frac", "freeze/events"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [len(history)], key
    assert list((tmp_path / "outputs").rglob("*.tmp")) == []  # no temporary file left
    [last] = (tmp_path / "outputs").glob("*/last.pt")
    assert ckpt.read(last)["finished"] is True and (last.parent / "closed").is_file()
    # and a further resume=auto finds nothing to do: it starts afresh (a new run), it does not reopen this one
    assert ckpt.find_latest(tmp_path / "outputs", ckpt.read(last)["config"]) is None
    return run.info.run_id


@pytest.mark.slow
def test_kill_between_checkpoint_and_log_resumes_exactly_once(tiny_overrides, tmp_path, mlflow_uri, reference):
    """The classic double-logging window (epoch 2 checkpointed and logged, then killed). Like every test here it
    starts real processes (two of them): slow tier; the fast tier checks resume in-process (test_contract.py)."""
    kill_and_resume("after_epoch_log:2", tiny_overrides, tmp_path, mlflow_uri, reference)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["mid_step:1", "mid_step:2", "mid_checkpoint_write:1", "mid_checkpoint_write:3",
                                   "after_epoch_log:1", "after_epoch_log:3", "after_final_checkpoint"])
def test_kill_at_every_fault_point_then_resume(fault, tiny_overrides, tmp_path, mlflow_uri, reference):
    kill_and_resume(fault, tiny_overrides, tmp_path, mlflow_uri, reference)


@pytest.mark.slow
def test_mid_checkpoint_write_leaves_a_temporary_that_the_next_write_removes(tiny_overrides, tmp_path,
                                                                            mlflow_uri):
    """Untracked, in one process: the stale ``.last.pt.*.tmp`` of the killed writer is gone after resume."""
    args = ["train", *tiny_overrides, *ARGS, "tracking.enabled=false", "tracking.run_name=tmp",
            "trainer.save_checkpoint=false"]
    killed = cli(args, tmp_path, mlflow_uri, "mid_checkpoint_write:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "outputs" / "tmp"
    [tmp] = run.glob(".last.pt.*.tmp")
    assert ckpt.read(run / "last.pt")["position"]["epoch"] == 1  # the previous checkpoint is intact
    assert cli([*args, "resume=auto"], tmp_path, mlflow_uri).returncode == 0
    assert not tmp.exists() and list(run.glob("*.tmp")) == []
