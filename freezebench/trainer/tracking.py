"""MLflow tracking: one run per fit.

Tracking URI: ``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
working directory (MLflow 3's ``./mlruns`` file store is refused unless ``MLFLOW_ALLOW_FILE_STORE=true``).
Under ``mlflow run`` the process attaches to the run MLflow created (``$MLFLOW_RUN_ID``) instead of
starting a new one. ``tracking.enabled=false`` gives a :class:`NullTracker` that writes nothing.

:class:`MlflowTracker` makes the calls in this process; ``freezebench train`` makes them in a second process
(:class:`TrackingProcess` and its :class:`RemoteTracker`), which imports MLflow while the trainer imports torch.
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


def make_tracker(cfg: Any, process: TrackingProcess | None = None) -> NullTracker:
    """The tracker of ``tracking.*``: in this process, or through ``process`` (a :class:`TrackingProcess`)."""
    if not cfg.enabled:
        return NullTracker()
    if process is not None:
        return RemoteTracker(process, cfg.uri, cfg.experiment, cfg.system_metrics, cfg.parent_run_id, cfg.run_id)
    return MlflowTracker(cfg.uri, cfg.experiment, cfg.system_metrics, cfg.parent_run_id, cfg.run_id)


# --- MLflow in a second process (``freezebench train``) -------------------------------------------------------
class TrackingProcess:
    """A process that imports MLflow and its store while this one imports torch and builds data and model.

    Importing MLflow and its SQL store is pure Python (about two fifths of the default job's start-up, issue
    17): in a thread it would only take turns with torch's import under the GIL, in a second process it runs on
    another core. ``freezebench train`` starts one at launch (:meth:`spawn`); the trainer's
    :class:`RemoteTracker` then makes every call of :class:`MlflowTracker` in it, one at a time, each answered
    before the next (the same order and the same exactly-once logging as in one process). The run, its tags
    (MLflow's source tags from this command line), params, metrics and artifacts are those of an in-process
    :class:`MlflowTracker`; library use (``Trainer(cfg)``, sweeps) keeps MLflow in the process.

    The process ignores SIGINT/SIGTERM (it runs in a session of its own: Ctrl-C reaches only this process,
    whose tracking hook then marks the run KILLED through it). When this process exits normally it tells the
    other to exit as one would (MLflow's exit handlers run); when this one dies (SIGKILL) the other sees the
    pipe close and exits at once, leaving the run as a killed process leaves it.
    """

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._pending = 0  # requests sent whose answer was not read (an interrupted call)
        self._closed = False
        self._used = False  # no call yet: no store opened, no run; closing may simply stop the process

    @classmethod
    def spawn(cls, uri: str | None, debug: bool = False) -> TrackingProcess | None:
        """Start the process for the store ``uri`` (resolved as :func:`resolve_uri`); None if it cannot start."""
        import atexit
        import pickle
        import sys

        try:
            proc = subprocess.Popen([sys.executable, "-c", "from freezebench.trainer.tracking import serve; serve()"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
            pickle.dump({"uri": resolve_uri(uri), "argv": list(sys.argv), "debug": bool(debug)}, proc.stdin)
            proc.stdin.flush()
        except OSError as e:
            log.warning("could not start the MLflow tracking process (%s): tracking in this process", e)
            return None
        worker = cls(proc)
        atexit.register(worker.close)
        return worker

    def call(self, name: str, *args: Any) -> Any:
        """``name(*args)`` of the process's tracker; its answer, or its error raised here as one line."""
        import pickle

        if self._closed:
            raise TrackingError("the MLflow tracking process was closed")
        self._used = True
        try:
            while self._pending:  # an answer left unread by an interrupted call (Ctrl-C twice)
                pickle.load(self.proc.stdout)
                self._pending -= 1
            pickle.dump((name, args), self.proc.stdin)
            self.proc.stdin.flush()
            self._pending += 1
            status, value = pickle.load(self.proc.stdout)
            self._pending -= 1
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            code = self.proc.poll()
            why = f"exit status {code}" if code is not None else str(e)
            raise TrackingError(f"the MLflow tracking process stopped ({why}; any error it printed is above); "
                                "pass tracking.enabled=false to train untracked") from None
        if status == "ok":
            return value
        raise TrackingError(value)

    def close(self, timeout: float = 30.0) -> None:
        """Let the process exit as a process exits normally (MLflow's exit handlers), and wait for it; a
        process never called (the command failed before its run began) is stopped at once."""
        import pickle

        if self._closed:
            return
        self._closed = True
        if not self._used:  # the command ended before tracking began (an error): nothing to close there
            self.proc.kill()
            self.proc.wait()
            return
        try:
            pickle.dump(("exit", ()), self.proc.stdin)
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the MLflow tracking process did not exit within %.0f s", timeout)


class RemoteTracker(NullTracker):
    """:class:`MlflowTracker` in a :class:`TrackingProcess`: the same calls, answered there.

    Values are converted here as :class:`MlflowTracker` would convert them there (params and tags to str,
    metrics to float, a dict to its JSON text), so no torch or numpy object crosses; a figure is saved here
    as MLflow's ``log_figure`` saves it (``savefig`` to a file named after the artifact) and logged there.
    """

    def __init__(self, process: TrackingProcess, uri: str | None, experiment: str, system_metrics: bool = True,
                 parent_run_id: str | None = None, run_id: str | None = None):
        self.process = process
        self.uri = resolve_uri(uri)
        self.run_id = None
        self.experiment_id = None
        self._args = (uri, experiment, system_metrics, parent_run_id, run_id)

    def start(self, run_name: str, tags: dict[str, str]) -> None:
        self.run_id, self.experiment_id = self.process.call(
            "start", self._args, str(run_name), {k: str(v) for k, v in tags.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.process.call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_params(self, params: dict[str, Any]) -> None:
        self.process.call("log_params", {k: str(v) for k, v in params.items()})

    def delete_tags(self, keys: list[str]) -> None:
        self.process.call("delete_tags", [str(k) for k in keys])

    def skip_held_metrics(self) -> None:
        self.process.call("skip_held_metrics")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.process.call("log_metrics", {k: float(v) for k, v in metrics.items()}, int(step))

    def log_text(self, text: str, path: str) -> None:
        self.process.call("log_text", str(text), path)

    def log_dict(self, data: Any, path: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), path)

    def log_table(self, columns: dict[str, list[Any]], path: str) -> None:
        self.process.call("log_table", {k: list(v) for k, v in columns.items()}, path)

    def log_figure(self, fig: Any, path: str) -> None:
        import posixpath
        import tempfile

        norm = posixpath.normpath(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, posixpath.basename(norm))
            fig.savefig(local)
            self.process.call("log_artifact", local, posixpath.dirname(norm) or None)

    def log_artifact(self, local: str, folder: str | None = None) -> None:
        self.process.call("log_artifact", os.path.abspath(local), folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        try:
            self.process.call("finish", status)
        except TrackingError as e:  # never mask the original error of a failed run
            log.warning("could not close MLflow run %s: %s", self.run_id, e)


def _warm_store(uri: str) -> None:
    """Open an existing sqlite store and resolve MLflow's context tags (git, source) before the first call.

    Only a store whose file exists already: a command that fails before its run begins must create nothing.
    Any error is left for the real call to report.
    """
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    try:
        if path and path != ":memory:" and Path(path).expanduser().is_file():
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)  # the store: engine, schema check
        from mlflow.tracking.context.registry import resolve_tags

        resolve_tags({})
    except Exception:
        pass


def serve() -> None:
    """The :class:`TrackingProcess`'s side: warm MLflow up, then answer calls until told to exit."""
    import pickle
    import signal
    import sys

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, not into the answers
    try:
        hello = pickle.load(requests)
    except (EOFError, OSError, pickle.UnpicklingError):  # the trainer's process is gone already
        os._exit(0)
    sys.argv = hello["argv"]  # MLflow's source tags name the command line, as in one process
    debug = hello["debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    import mlflow  # noqa: F401  (the warm-up: what the first call would import)
    import mlflow.entities  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    uri = hello["uri"]
    if "://" in uri and not uri.startswith(("http:", "https:", "file:", "databricks")):
        try:
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        except ImportError:
            pass
    _warm_store(uri)
    from ..progress import phase

    phase("tracking-ready")
    tracker: MlflowTracker | None = None
    while True:
        try:
            name, args = pickle.load(requests)
        except (EOFError, OSError, pickle.UnpicklingError):  # the trainer's process died: leave things as they are
            os._exit(0)
        if name == "exit":
            break
        try:
            if name == "start":
                tracker = MlflowTracker(*args[0])
                tracker.start(*args[1:])
                answer: tuple[str, Any] = ("ok", (tracker.run_id, tracker.experiment_id))
            else:
                answer = ("ok", getattr(tracker, name)(*args))
        except TrackingError as e:
            answer = ("error", str(e))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            answer = ("error", f"MLflow {name} failed: {type(e).__name__}: {first}")
        pickle.dump(answer, answers)
        answers.flush()
    from ..cli import exit_now

    exit_now(0)


def csv_text(columns: dict[str, list[Any]]) -> str:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf)
    keys = list(columns)
    w.writerow(keys)
    for row in zip(*(columns[k] for k in keys)):
        w.writerow(row)
    return buf.getvalue()
