"""MLflow tracking: one run per fit.

Tracking URI: ``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
working directory (MLflow 3's ``./mlruns`` file store is refused unless ``MLFLOW_ALLOW_FILE_STORE=true``).
Under ``mlflow run`` the process attaches to the run MLflow created (``$MLFLOW_RUN_ID``) instead of
starting a new one. ``tracking.enabled=false`` gives a :class:`NullTracker` that writes nothing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from ..errors import TrackingError

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class NullTracker:
    """Tracking switched off: every call is a no-op."""

    run_id: str | None = None
    uri: str | None = None
    experiment_id: str | None = None

    def start(self, run_name: str, tags: dict[str, str]) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_text(self, text: str, path: str) -> None: ...
    def log_dict(self, data: Any, path: str) -> None: ...
    def log_table(self, columns: dict[str, list[Any]], path: str) -> None: ...
    def log_figure(self, fig: Any, path: str) -> None: ...
    def log_artifact(self, local: str, folder: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def delete_tags(self, keys: list[str]) -> None: ...
    def skip_held_metrics(self) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """Logs one fit to MLflow."""

    def __init__(self, uri: str | None, experiment: str, system_metrics: bool = True,
                 parent_run_id: str | None = None, run_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.system_metrics = system_metrics
        self.parent_run_id = parent_run_id
        self.resume_run_id = run_id
        self.run_id = None
        self._client = None
        self._held: dict[str, set[int]] | None = None  # (key -> steps) already in the run; see skip_held_metrics

    def start(self, run_name: str, tags: dict[str, str]) -> None:
        mlflow = self.mlflow
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        attach = self.resume_run_id or os.environ.get("MLFLOW_RUN_ID")
        try:
            if attach:  # launched by `mlflow run`: the run exists already
                exp_id = mlflow.tracking.MlflowClient(self.uri).get_run(attach).info.experiment_id
                mlflow.set_experiment(experiment_id=exp_id)
                run = mlflow.start_run(run_id=attach, log_system_metrics=self.system_metrics)
            else:
                mlflow.set_experiment(self.experiment)
                # an explicit parent id: implicit nesting (the active run) breaks with threads and workers
                run = mlflow.start_run(run_name=run_name, log_system_metrics=self.system_metrics,
                                       parent_run_id=self.parent_run_id)
        except Exception as e:
            raise TrackingError(
                f"cannot start an MLflow run at {self.uri}: {str(e).splitlines()[0]}. Check the tracking URI "
                f"(tracking.uri or $MLFLOW_TRACKING_URI), or pass tracking.enabled=false to train untracked."
            ) from None
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id  # the UI's URLs name it (freezebench.messages)
        self._client = mlflow.tracking.MlflowClient(self.uri)
        if attach:
            tags = {**tags, "mlflow.runName": run_name}
        self.set_tags(tags)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        items = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def delete_tags(self, keys: list[str]) -> None:
        held = self._client.get_run(self.run_id).data.tags
        for k in keys:
            if k in held:
                self._client.delete_tag(self.run_id, k)

    def skip_held_metrics(self) -> None:
        """From now on, log no (key, step) the run already holds: a resumed run re-logs nothing.

        Reads the run's metric histories once (one query per key); later calls update the set locally.
        """
        held: dict[str, set[int]] = {}
        for key in self._client.get_run(self.run_id).data.metrics:
            held[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)}
        self._held = held

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if self._held is not None:
            metrics = {k: v for k, v in metrics.items() if step not in self._held.get(k, ())}
            for k in metrics:
                self._held.setdefault(k, set()).add(step)
        if not metrics:
            return
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # MLflow's log_batch takes at most 1000 metrics
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_text(self, text: str, path: str) -> None:
        self._client.log_text(self.run_id, text, path)

    def log_dict(self, data: Any, path: str) -> None:
        self._client.log_text(self.run_id, json.dumps(data, indent=2, default=str), path)

    def log_table(self, columns: dict[str, list[Any]], path: str) -> None:
        self._client.log_table(self.run_id, data=columns, artifact_file=path)

    def log_figure(self, fig: Any, path: str) -> None:
        self._client.log_figure(self.run_id, fig, path)

    def log_artifact(self, local: str, folder: str | None = None) -> None:
        self._client.log_artifact(self.run_id, local, folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        try:
            self.mlflow.end_run(status=status)
        except Exception as e:  # never mask the original error of a failed run
            log.warning("could not close MLflow run %s: %s", self.run_id, e)


#: seconds to wait for a tracking server's /health before declaring it unreachable
PROBE_TIMEOUT_S = 10.0


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast when an ``http(s)://`` tracking server does not answer.

    MLflow's HTTP client retries a refused connection for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` with
    back-off), so a typo in the URI or a server that is down would otherwise hang the run before training.
    One GET of the server's ``/health`` endpoint decides: any HTTP answer (even 401/404) means reachable.
    """
    check_sqlite_folder(uri)
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host ... --port ...), "
            f"fix tracking.uri / $MLFLOW_TRACKING_URI, or pass tracking.enabled=false to train untracked"
        ) from None


def check_sqlite_folder(uri: str) -> None:
    """Refuse a ``sqlite:///...`` URI whose folder does not exist (MLflow would create the whole tree)."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return
    folder = Path(path).expanduser().absolute().parent
    if not folder.is_dir():
        raise TrackingError(f"tracking URI {uri}: the folder {str(folder)!r} of the sqlite file does not exist; "
                            f"create it, or fix tracking.uri / $MLFLOW_TRACKING_URI")


def make_tracker(cfg: Any) -> NullTracker:
    if not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg.uri, cfg.experiment, cfg.system_metrics, cfg.parent_run_id, cfg.run_id)


def csv_text(columns: dict[str, list[Any]]) -> str:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf)
    keys = list(columns)
    w.writerow(keys)
    for row in zip(*(columns[k] for k in keys)):
        w.writerow(row)
    return buf.getvalue()
