"""Checkpoint and resume: a run killed mid-epoch and resumed ends bit-for-bit where an uninterrupted run ends.

The killed runs are real processes (``freezebench train`` via tests/signal_at_step.py) sent ``SIGKILL`` (no
handler can run: the resume starts from the last epoch checkpoint) or ``SIGTERM`` (the trainer writes a
checkpoint at the next step boundary, mid-epoch). CPU, deterministic kernels, the same thread count everywhere (``helpers.THREADS``).
"""

from __future__ import annotations

import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from freezebench.trainer import checkpoint as ckpt
from freezebench.cli import main
from freezebench.config import load_config
from freezebench.errors import CheckpointError
from freezebench.trainer import Trainer
from helpers import THREADS, StopAt

HERE = Path(__file__).resolve().parent
# 3 epochs of 4 steps; step 6 is the middle of epoch 2
POLICIES = {
    "full": [],
    "autofreeze": ["model.granularity=layer"],
    "smartfrz": ["model.granularity=layer", "policy.weights={weights}", "policy.window=2", "policy.record_every=1"],
}


def _run_until_signal(step: int, signame: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(HERE.parent)}
    return subprocess.run([sys.executable, str(HERE / "signal_at_step.py"), str(step), signame, "train", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(POLICIES))
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(policy, mlflow_uri, tiny_overrides, tmp_path,
                                                            always_freeze_predictor):
    args = [*tiny_overrides, f"policy={policy}", *(o.replace("{weights}", always_freeze_predictor) for o in POLICIES[policy])]
    client = mlflow.tracking.MlflowClient()

    # the reference: one uninterrupted run (untracked, in this process)
    ref = Trainer(load_config([*args, "tracking.enabled=false", "trainer.checkpoint_every=0",
                               f"trainer.output_dir={tmp_path / 'ref'}"]))
    expected = ref.fit()

    # killed in the middle of epoch 2: only the epoch-1 checkpoint exists
    name = f"killed-{policy}"
    proc = _run_until_signal(6, "SIGKILL", [*args, f"tracking.run_name={name}"], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    [last] = list((tmp_path / "outputs").glob("*/last.pt"))
    saved = ckpt.read(last)
    assert saved["position"] == {"step": 4, "epoch": 1, "batch": 0, "world_size": 1}
    killed_run = saved["mlflow"]["run_id"]
    assert client.get_run(killed_run).info.status == "RUNNING"  # nobody could close it

    # resume: the same command line plus resume=auto
    assert main(["train", *args, f"tracking.run_name={name}", "resume=auto"]) == 0
    experiment = client.get_experiment_by_name("freezebench").experiment_id
    runs = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    assert [r.info.run_id for r in runs] == [killed_run]  # one MLflow run, continued
    assert client.get_run(killed_run).info.status == "FINISHED"

    final = _weights(str(tmp_path / "outputs" / killed_run / "final.pt"))
    assert final.keys() == ref.model.state_dict().keys()
    assert all(torch.equal(v, final[k]) for k, v in ref.model.state_dict().items())
    for key in ("val/acc", "val/loss", "train/loss", "cost/tflops", "cost/tflops_full", "freeze/frozen_units"):
        assert _history(client, killed_run, key) == [(i + 1, h[key]) for i, h in enumerate(expected.history)], key
    rows = open(client.download_artifacts(killed_run, "freeze_events.csv")).read().splitlines()[1:]
    assert [tuple(r.split(",")[:3]) for r in rows] == [(str(e.unit), e.name, str(e.step)) for e in expected.events]
    if policy != "full":
        assert expected.events  # something was frozen (and survived the resume)
    # the finished run's checkpoint is marked finished: resume=auto does not pick it again
    assert ckpt.read(last)["finished"] is True
    assert ckpt.find_latest(tmp_path / "outputs", saved["config"]) is None


@pytest.mark.slow
def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(mlflow_uri, tiny_overrides, tmp_path):
    args = [*tiny_overrides, "policy=autofreeze", "model.granularity=layer", "tracking.run_name=term"]
    proc = _run_until_signal(6, "SIGTERM", args, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert re.search(r"SIGTERM: stopped at step 6 \(epoch 2/\d+, after batch 2 of \d+\)", proc.stderr)
    assert "Traceback" not in proc.stderr
    [last] = list((tmp_path / "outputs").glob("*/last.pt"))
    saved = ckpt.read(last)
    assert saved["position"] == {"step": 6, "epoch": 1, "batch": 2, "world_size": 1}
    assert saved["epoch_acc"][0]["samples"] == 32  # per rank: the partial sums of epoch 2
    client = mlflow.tracking.MlflowClient()
    run_id = saved["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    assert main(["train", *args, f"resume={last}"]) == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    cfg = load_config([*tiny_overrides, "policy=autofreeze", "model.granularity=layer", "tracking.enabled=false",
                       "trainer.save_checkpoint=false", "trainer.checkpoint_every=0"])
    ref = Trainer(cfg)
    result = ref.fit()
    b = _weights(str(tmp_path / "outputs" / run_id / "final.pt"))
    assert all(torch.equal(v, b[k]) for k, v in ref.model.state_dict().items())
    assert [v for _, v in _history(client, run_id, "cost/tflops")] == [h["cost/tflops"] for h in result.history]
    assert [v for _, v in _history(client, run_id, "val/acc")] == [h["val/acc"] for h in result.history]


def _tiny_untracked(tiny_overrides, out, *extra):
    return load_config([*tiny_overrides, "tracking.enabled=false", f"trainer.output_dir={out}", *extra])


def test_resume_auto_without_checkpoint_starts_afresh_and_explicit_missing_path_is_an_error(tiny_overrides,
                                                                                            tmp_path):
    t = Trainer(_tiny_untracked(tiny_overrides, tmp_path, "resume=auto", "trainer.epochs=1"))
    assert t.resumed_from is None and t.step == 0
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(_tiny_untracked(tiny_overrides, tmp_path, f"resume={tmp_path}/nope.pt"))


def test_resume_refuses_another_config_and_a_finished_run(tiny_overrides, tmp_path):
    t = Trainer(_tiny_untracked(tiny_overrides, tmp_path, "trainer.epochs=2", "tracking.run_name=a"))
    t.fit()
    last = tmp_path / "a" / "last.pt"
    with pytest.raises(CheckpointError, match="finished run"):
        Trainer(_tiny_untracked(tiny_overrides, tmp_path, "trainer.epochs=2", f"resume={last}"))
    with pytest.raises(CheckpointError, match=r"another config \(optim.lr: checkpoint 0.05, this run 0.1"):
        Trainer(_tiny_untracked(tiny_overrides, tmp_path, "trainer.epochs=2", "optim.lr=0.1", f"resume={last}"))
    # keys that do not change the training may differ
    fp = ckpt.config_fingerprint({"trainer.progress": True, "tracking.uri": "x", "optim.lr": 0.1})
    assert fp == {"optim.lr": "0.1"}
    # resume=auto ignores finished runs and other configs: a fresh start
    assert Trainer(_tiny_untracked(tiny_overrides, tmp_path, "trainer.epochs=2", "resume=auto")).resumed_from is None


def test_untracked_run_resumed_with_tracking_logs_every_epoch(mlflow_uri, tiny_overrides, tmp_path):
    base = [*tiny_overrides, "tracking.run_name=late", f"trainer.output_dir={tmp_path / 'o'}"]
    t = Trainer(load_config([*base, "tracking.enabled=false"]), hooks=[StopAt(6)])
    with pytest.raises(Exception, match="stopped at step 6"):
        t.fit()
    result = Trainer(load_config([*base, "resume=auto"])).fit()
    client = mlflow.tracking.MlflowClient()
    assert _history(client, result.run_id, "cost/tflops") == [(i + 1, h["cost/tflops"])
                                                              for i, h in enumerate(result.history)]
    assert ckpt.read(tmp_path / "o" / "late" / "last.pt")["finished"] is True  # nothing left unfinished
