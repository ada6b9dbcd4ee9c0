"""`mlflow run . --env-manager local` end to end: the MLproject entry point attaches to MLflow's run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mlflow_run_static(tmp_path, fresh_mlflow_uri):
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    uri = fresh_mlflow_uri  # tmp_path/mlflow.db
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(leaked, None)  # set_experiment() in earlier tests exports the experiment id
    p = subprocess.run(
        [mlflow_bin, "run", str(ROOT), "--env-manager", "local", "-P", "policy=static", "-P", "model=tiny",
         "-P", "epochs=3", "-P", "overrides=trainer.progress=false policy.at_epoch=1 tracking.system_metrics=false "
         f"trainer.output_dir={tmp_path / 'outputs'}"],  # `mlflow run` works in the project folder: not there
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["policy"] == "static" and run.data.params["policy.name"] == "static"
    assert run.data.tags["mlflow.runName"] == "static-tiny-digits-s0"
    assert run.data.metrics["freeze/frozen_units"] == 1  # half of the tiny model's 2 freezable units
    assert 0 < run.data.metrics["cost/tflops"] < run.data.metrics["cost/tflops_full"]
    assert {"freeze_timeline.png", "summary.json", "checkpoints"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
