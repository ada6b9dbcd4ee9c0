"""What the command line tells a user, worded in one place: unit counts, training positions, run endings.

- :func:`frozen_text`: ``"19 of 19 freezable units (the head trains)"``; the last unit of a partition, the
  classifier head, is never frozen, so "19/19" must not read as "everything frozen".
- :func:`position_text`: one epoch convention for stop, resume and the progress bar: epochs count from 1,
  ``"epoch 3/10, after batch 12 of 45"`` is the epoch in progress and how many of its batches are done.
- :func:`ending_lines`: the last lines of a tracked run: the MLflow run's name and id, the exact
  ``mlflow ui`` command for a local store, and the URLs of the experiment's *Training runs* page and of the
  run. MLflow 3 opens an experiment on its GenAI "Traces" tab (``#/experiments/<id>``); the classic runs
  table is the ``runs`` tab (``#/experiments/<id>/runs``, the route ``experimentPageTabRuns`` of MLflow 3's
  UI) and a run's page is ``#/experiments/<id>/runs/<run id>`` (the form ``mlflow`` itself prints).
- :func:`tag_failed_launch`: a config error under ``mlflow run`` names the run MLflow created (otherwise a
  random ``skillful-wren-365``) as ``freezebench train`` would and tags it ``error``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

#: where ``mlflow ui`` serves by default
UI_DEFAULT = "http://127.0.0.1:5000"


def frozen_text(frozen: int, freezable: int) -> str:
    return f"{frozen} of {freezable} freezable units (the head trains)"


def position_text(epoch: int, batch: int, epochs: int, steps_per_epoch: int | None = None) -> str:
    """``epoch`` 0-based index of the epoch in progress, ``batch`` batches of it done -> 1-based text."""
    of = f" of {steps_per_epoch}" if steps_per_epoch else ""
    return f"epoch {epoch + 1}/{epochs}, after batch {batch}{of}"


def epoch_line(epoch: int, epochs: int, train_loss: float, val_acc: float, frozen: int, freezable: int,
               epoch_s: float, policy_s: float, elapsed_s: float) -> str:
    """The line printed after each epoch (1-based ``epoch``), with the time left for the whole run."""
    from .progress import eta_seconds, format_duration

    eta = eta_seconds(elapsed_s, epoch, epochs)
    left = f"  ETA {format_duration(eta)}" if eta and epoch < epochs else ""
    return (f"epoch {epoch:>3}/{epochs}  loss {train_loss:.4f}  val/acc {val_acc:.4f}  "
            f"frozen {frozen} of {freezable}  {epoch_s:.1f}s (policy {policy_s:.2f}s){left}")


def _absolute_store(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/path/mlflow.db`` (the command works from any folder)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain folder (file store)
        return str(Path(uri).resolve())
    if uri.startswith("file://"):
        return uri
    return uri


def ui_base(uri: str) -> str:
    """The address of the UI showing the store ``uri``: the server itself, else what ``mlflow ui`` serves."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return UI_DEFAULT


def ui_command(uri: str) -> str | None:
    """The ``mlflow ui`` command for a local store (None for a tracking server, whose UI is up already)."""
    if uri.startswith(("http://", "https://")) or uri.startswith("databricks"):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(_absolute_store(uri))}"


def runs_page_url(uri: str, experiment_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def ending_lines(uri: str, experiment_id: str | None, run_id: str, run_name: str) -> list[str]:
    """The last lines of a tracked run."""
    lines = [f"MLflow run {run_name} ({run_id}) in {uri}"]
    cmd = ui_command(uri)
    if cmd:
        lines.append(f"open the UI with: {cmd}")
    if experiment_id is not None:
        lines.append(f"  training runs: {runs_page_url(uri, experiment_id)}")
        lines.append(f"  this run:      {run_url(uri, experiment_id, run_id)}")
    return lines


def _setting(overrides: Sequence[str], key: str, default: str) -> str:
    value = default
    for item in overrides:
        k, sep, v = item.partition("=")
        if sep and k.strip() == key:
            value = v.strip()
    return value


def run_name_of(overrides: Sequence[str]) -> str:
    """The name ``freezebench train`` gives these overrides' run (``<policy>-<model>-<dataset>-s<seed>``),
    read from the overrides alone (for a config that did not load)."""
    given = _setting(overrides, "tracking.run_name", "")
    if given and given not in ("null", "None"):
        return given
    from .config import ModelConfig, DataConfig, TrainerConfig  # noqa: I001  (dataclass defaults, no torch)

    policy = _setting(overrides, "policy.name", _setting(overrides, "policy", "full"))
    return (f"{policy}-{_setting(overrides, 'model.name', ModelConfig.name)}-"
            f"{_setting(overrides, 'data.name', DataConfig.name)}-s{_setting(overrides, 'trainer.seed', str(TrainerConfig.seed))}")


def tag_failed_launch(overrides: Sequence[str], error: BaseException) -> str | None:
    """Under ``mlflow run`` ($MLFLOW_RUN_ID set) a train command that failed before its run started: give
    MLflow's run freezebench's name and an ``error`` tag. Returns the run id tagged (None: nothing to do)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    try:
        from .config import split_overrides

        try:
            overrides = split_overrides(overrides)
        except Exception:  # the overrides themselves are what failed: read them unsplit
            overrides = list(overrides)
        from mlflow.tracking import MlflowClient

        from .trainer.tracking import resolve_uri

        client = MlflowClient(resolve_uri(_setting(overrides, "tracking.uri", "") or None))
        run = client.get_run(run_id)
        if "error" in run.data.tags:  # the trainer's own run start already recorded it
            return None
        client.set_tag(run_id, "mlflow.runName", run_name_of(overrides))
        client.set_tag(run_id, "error", f"{type(error).__name__}: {str(error)[:400]}")
    except Exception:  # reporting the error matters more than tagging it
        return None
    return run_id
