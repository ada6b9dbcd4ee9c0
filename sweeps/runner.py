"""The study runner: one worker process running a sweep's trials in-process until the study is done.

Mechanics (ARCHITECTURE.md, "Sweeps"):

* **One study, many workers.** The first worker creates the study (``create_study`` is atomic in the
  storage: the others get ``DuplicatedStudyError`` and join), stores the space's spec and the parent MLflow
  run id on it, and for a grid enqueues every (point, seed) once, with its ``grid_index``. Workers pop
  WAITING trials with the storage's atomic WAITING -> RUNNING transition, so a grid point runs exactly once
  whatever the number of workers. (Optuna's GridSampler alone picks points per worker and repeats them.)
* **Failures.** A trial that raises is told FAIL with its reason (user attribute ``fail_reason``) and the
  sweep goes on; a FAIL counts as done (``retry_failed`` re-queues those).
* **Stopped workers.** SIGTERM or Ctrl-C during a trial stops the worker: the trainer checkpoints at the
  next step boundary, the trial is failed as ``interrupted`` and re-queued to resume that checkpoint, and
  the worker exits (128 + the signal's number) instead of starting the next trial; a re-run continues.
* **Killed workers.** While a trial runs, a thread writes a heartbeat (system attribute) every
  ``heartbeat_s``. A RUNNING trial whose heartbeat is older than ``grace_s`` belongs to a dead worker: any
  worker (or a re-run) fails it atomically and enqueues a copy, which then runs once. The mechanism is ours,
  not Optuna's RDB heartbeat, so it also works for the journal storage.
* **No orphans.** A trial's child MLflow run is created (and stored on the trial as ``mlflow_run_id``,
  with its checkpoint path as ``checkpoint``) before training starts, so a killed worker's trial still
  points at its run. When a worker is declared lost, its child run is marked KILLED with the reason
  (tag ``error``), and the re-queued trial *resumes the lost trial's checkpoint* (``resume_from``) into a
  new child run (tag ``retry_of_run``): the metrics the checkpoint covers are logged there once, and the
  training continues bit for bit instead of starting over (``freezebench.trainer.reliability``).
* **Tracking.** One parent MLflow run per study (created with ``MlflowClient``, never the fluent active
  run, so each trial's own fluent run cannot collide with it); each trial's run is its child through
  ``tracking.parent_run_id``, in the parent's experiment, and its id is stored on the trial
  (``mlflow_run_id``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from freezebench import faults, progress
from freezebench.errors import FreezebenchError, TrainingInterrupted
from freezebench import metrics as M

from .space import Space, SweepError, load_space, spec_json
from .storage import open_storage, redact

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "sweep:heartbeat"  # trial system attribute: worker's time.time() at its last beat
READY_KEY = "sweep_ready"  # study user attribute, set last by the worker that initialised the study
METRICS = (M.VAL_ACC, M.COST_TFLOPS, M.TIME_TOTAL_S, M.COST_SAVING_FRAC, M.FROZEN_UNITS)


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns."""

    study: Any  # optuna.Study
    parent_run_id: str | None
    rows: list[dict[str, Any]]  # the summary table (freezebench.sweeps.table.summary_rows)
    table: str  # the same, formatted
    ran: list[int] = field(default_factory=list)  # numbers of the trials this worker ran


# --- study set-up ----------------------------------------------------------------------------------------
def _first_point(space: Space) -> dict[str, Any]:
    return {p.key: (p.choices[0] if p.kind == "categorical" else p.low) for p in space.params}


def _base_cfg(space: Space) -> Any:
    """The config of the space's first point: what tracking settings (URI, experiment) the sweep uses."""
    from freezebench.config import load_config

    return load_config(space.trial_overrides(_first_point(space)))


def _validate_points(space: Space) -> None:
    """Every grid point (or, for tpe, each range's ends) must make a valid config: fail before any trial."""
    from freezebench.config import load_config

    if space.sampler == "grid":
        points = space.grid()
    else:
        points = [{p.key: (p.choices[i % len(p.choices)] if p.kind == "categorical" else (p.low, p.high)[i % 2])
                   for p in space.params} for i in range(2)]
    seen: set[str] = set()
    for point in points:
        key = json.dumps(point, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            load_config(space.trial_overrides(point))
        except FreezebenchError as e:
            raise SweepError(f"space {space.name!r}, point {_point_text(point)}: {e}") from None


NAMED_KEYS = ("policy", "policy.name", "model.name", "data.name", "trainer.seed")  # already in a run's name


def child_run_name(cfg: Any, point: dict[str, Any]) -> str:
    """A trial's MLflow run name: the trainer's ``<policy>-<model>-<dataset>-s<seed>`` plus the swept values
    the name does not already hold (``smartfrz-resnet20-digits-s0 window=40``), so the run list tells the
    trials apart. ``policy.`` is dropped from the keys, as in the report's row labels."""
    base = f"{cfg.policy.name}-{cfg.model.name}-{cfg.data.name}-s{cfg.trainer.seed}"
    extra = [f"{k[len('policy.'):] if k.startswith('policy.') else k}={v}" for k, v in point.items()
             if k not in NAMED_KEYS]
    return " ".join([base, *extra])


def _point_text(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def _create_parent(space: Space, study_name: str, storage_url: str, cfg: Any) -> str | None:
    """The sweep's parent MLflow run (or the run ``mlflow run`` made for this process)."""
    if not cfg.tracking.enabled:
        return None
    from mlflow.tracking import MlflowClient

    from freezebench.trainer.tracking import git_commit, resolve_uri

    uri = resolve_uri(cfg.tracking.uri)
    tags = {"kind": "sweep", "sweep": space.name, "study": study_name, "storage": redact(storage_url),
            "mlflow.runName": f"sweep-{study_name}"}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    try:
        client = MlflowClient(uri)
        env_run = os.environ.get("MLFLOW_RUN_ID")
        if env_run:  # launched by `mlflow run -e sweep`: that run is the parent
            run_id = env_run
        else:
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
            run_id = client.create_run(exp_id, run_name=f"sweep-{study_name}").info.run_id
        from mlflow.entities import Param, RunTag

        params = {"sweep.space": space.name, "sweep.sampler": space.sampler, "sweep.objective": space.objective,
                  "sweep.seeds": ",".join(map(str, space.seeds)), "sweep.overrides": " ".join(space.overrides),
                  "sweep.params": spec_json(space.spec()["params"])[:6000], "sweep.study": study_name}
        existing = client.get_run(run_id).data.params
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if k not in existing],
                         tags=[RunTag(k, str(v)) for k, v in tags.items()])
    except Exception as e:
        raise SweepError(f"cannot create the sweep's parent MLflow run at {uri}: {str(e).splitlines()[0]}") from None
    return run_id


def _enqueue_grid(study: Any, space: Space) -> int:
    n = 0
    for i, point in enumerate(space.grid()):
        for seed in space.seeds:
            study.enqueue_trial(point, user_attrs={"grid_index": n, "point_index": i, "seed": seed})
            n += 1
    return n


def open_study(space: Space, study_name: str, storage_url: str | None, *, create: bool = True,
               init_timeout_s: float = 120.0) -> tuple[Any, str | None]:
    """Create or join the study; returns it and its parent run id. Checks that the spec matches."""
    import optuna

    storage = open_storage(storage_url)
    url = storage_url or "sqlite:///optuna.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if create:
        try:
            study = optuna.create_study(study_name=study_name, storage=storage, directions=space.directions,
                                        sampler=_sampler(space))
        except optuna.exceptions.DuplicatedStudyError:
            study = None
        except Exception as e:
            raise SweepError(f"cannot create study {study_name!r} in {redact(url)}: {str(e).splitlines()[0]}") from None
        if study is not None:  # we won the creation: initialise it
            try:
                study.set_user_attr("sweep_spec", space.spec())
                study.set_user_attr("sweep_space", space.name)
                study.set_user_attr("sweep_description", space.description)
                parent = _create_parent(space, study_name, url, _base_cfg(space))
                study.set_user_attr("mlflow_parent_run_id", parent)
                if space.sampler == "grid":
                    study.set_user_attr("grid_size", _enqueue_grid(study, space))
                study.set_user_attr(READY_KEY, True)
            except BaseException:  # leave no half-made study behind: a re-run starts it afresh
                with contextlib.suppress(Exception):
                    optuna.delete_study(study_name=study_name, storage=storage)
                raise
            return study, parent
    study = _load(study_name, storage, url, space)
    deadline = time.monotonic() + init_timeout_s
    while not study.user_attrs.get(READY_KEY):  # another worker is initialising it right now
        if time.monotonic() > deadline:
            raise SweepError(f"study {study_name!r} in {redact(url)} was never fully initialised (its first worker "
                             f"died while setting it up); delete it (optuna delete-study --study-name "
                             f"{study_name} --storage URL) and start again")
        time.sleep(0.5)
    _check_spec(study, space, url)  # the spec may have been written while we waited
    return study, study.user_attrs.get("mlflow_parent_run_id")


def _load(study_name: str, storage: Any, url: str, space: Space | None) -> Any:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage,
                                  sampler=_sampler(space) if space else None)
    except KeyError:
        raise SweepError(f"no study {study_name!r} in {redact(url)}") from None
    if space is not None:
        _check_spec(study, space, url)
    return study


def _check_spec(study: Any, space: Space, url: str) -> None:
    stored = study.user_attrs.get("sweep_spec")
    if stored is None or spec_json(stored) == spec_json(space.spec()):
        return
    want = space.spec()
    diff = [k for k in want if spec_json(want[k]) != spec_json(stored.get(k))]
    raise SweepError(
        f"study {study.study_name!r} in {redact(url)} exists with a different sweep ({', '.join(diff)} differ: "
        f"stored {', '.join(f'{k}={spec_json(stored.get(k))}' for k in diff)}); use another --study name, or "
        f"the same space, overrides and seeds to continue it"
    )


def _sampler(space: Space) -> Any:
    import optuna

    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=None)
    # grid trials are all enqueued with fixed params: the sampler never draws a value
    return optuna.samplers.RandomSampler()


# --- trial bookkeeping ----------------------------------------------------------------------------------
class Heartbeat:
    """Writes ``time.time()`` to the trial's system attribute every ``interval`` seconds, in a thread."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sweep-heartbeat-{trial_id}", daemon=True)

    def beat(self) -> bool:
        try:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_KEY, time.time())
            return True
        except Exception as e:  # the trial was taken over (stale) or the storage hiccuped: stop beating
            log.debug("heartbeat of trial %d stopped: %s", self.trial_id, e)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.beat():
                return

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _retry_attrs(trial: Any) -> dict[str, Any]:
    """The user attributes of a re-queued copy of ``trial``: its grid entry, a pointer to it, and the
    checkpoint and MLflow run it left (the copy resumes that checkpoint)."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("grid_index", "point_index", "seed")}
    attrs["retry_of"] = trial.number
    if trial.user_attrs.get("checkpoint"):
        attrs["resume_from"] = trial.user_attrs["checkpoint"]
    if trial.user_attrs.get("mlflow_run_id"):
        attrs["retry_of_run"] = trial.user_attrs["mlflow_run_id"]
    return attrs


def _retry(study: Any, trial: Any, reason: str) -> None:
    """Re-queue a trial whose worker was lost: same params and grid index, a pointer to the lost trial."""
    attrs = _retry_attrs(trial)
    study.enqueue_trial(dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {})), user_attrs=attrs)
    log.warning("trial %d: %s; re-queued", trial.number, reason)


def fail_stale(study: Any, grace_s: float, on_lost: Any = None) -> list[int]:
    """Fail RUNNING trials with no heartbeat for ``grace_s`` seconds and re-queue each one (exactly once);
    ``on_lost(trial, reason)`` is called for each (the runner marks the trial's MLflow run KILLED)."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    now = time.time()
    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.system_attrs.get(HEARTBEAT_KEY)
        if beat is None:  # died between pop and first beat: judge by its start time
            beat = t.datetime_start.timestamp() if t.datetime_start else now
        if now - beat <= grace_s:
            continue
        reason = f"worker lost: no heartbeat for {now - beat:.0f} s"
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first and re-queued it
        if on_lost is not None:
            on_lost(storage.get_trial(t._trial_id), reason)
        _retry(study, t, reason)
        lost.append(t.number)
    return lost


def _pop_waiting(study: Any) -> int | None:
    """Take one WAITING trial (the storage's WAITING -> RUNNING transition is atomic); None if none."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return t._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


@dataclass
class Progress:
    total: int
    done: int  # grid entries with a finished trial (COMPLETE, or FAIL that raised)
    pending: int  # grid entries with a WAITING or RUNNING trial
    running: int
    missing: list[int]  # grid entries with neither (lost before re-queueing, or failed with retry_failed)


def grid_progress(study: Any, retry_failed: bool = False) -> Progress:
    from optuna.trial import TrialState

    total = int(study.user_attrs.get("grid_size", 0))
    complete: set[int] = set()
    raised: set[int] = set()
    busy: set[int] = set()
    running = 0
    for t in study.get_trials(deepcopy=False):
        gi = t.user_attrs.get("grid_index")
        if gi is None:
            continue
        running += t.state == TrialState.RUNNING
        if t.state == TrialState.COMPLETE:
            complete.add(gi)
        elif t.state == TrialState.FAIL and t.user_attrs.get("raised"):
            raised.add(gi)
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            busy.add(gi)
    # a grid entry is done when a trial completed, or raised (unless retried now or asked to retry)
    done_set = complete | (set() if retry_failed else raised - busy)
    pending_set = busy - done_set
    done, pending = len(done_set), len(pending_set)
    missing = [i for i in range(total) if i not in done_set and i not in pending_set]
    return Progress(total, done, pending, running, missing)


# --- one trial ------------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _failed_child_run(cfg: Any, parent: str, run_name: str, tags: dict[str, str], reason: str) -> str | None:
    """A FAILED child run for a trial that failed before its trainer could start one (so every trial shows
    under the parent)."""
    try:
        from mlflow.tracking import MlflowClient

        from freezebench.trainer.tracking import resolve_uri

        client = MlflowClient(resolve_uri(cfg.tracking.uri))
        exp_id = client.get_run(parent).info.experiment_id
        run = client.create_run(exp_id, run_name=run_name,
                                tags={**tags, "mlflow.parentRunId": parent, "error": reason[:400]})
        client.set_terminated(run.info.run_id, "FAILED")
        return run.info.run_id
    except Exception as e:  # tracking trouble must not hide the trial's own failure
        log.warning("could not record the failed trial in MLflow: %s", e)
        return None


def kill_child_run(uri: str, trial: Any, reason: str) -> None:
    """Mark the MLflow run of a lost trial KILLED, with the reason as its ``error`` tag (if still RUNNING)."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return
        client.set_tag(run_id, "error", f"trial {trial.number}: {reason}"[:400])
        client.set_terminated(run_id, "KILLED")
    except Exception as e:  # tracking trouble must not stop the take-over
        log.warning("could not mark the MLflow run %s of lost trial %d KILLED: %s", run_id, trial.number, e)


def _start_child_run(cfg: Any, parent: str, trial: Any, tags: dict[str, str], resume_from: str | None) -> str:
    """Create the trial's child run now and point the config at it, so the trial links to its run (and its
    checkpoint) before any training: a worker killed mid-trial leaves no run that nothing points at."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from freezebench.trainer.tracking import resolve_uri

    client = MlflowClient(resolve_uri(cfg.tracking.uri))
    exp_id = client.get_run(parent).info.experiment_id
    extra = {"retry_of_run": str(trial.user_attrs["retry_of_run"])} if trial.user_attrs.get("retry_of_run") else {}
    run_id = client.create_run(exp_id, run_name=f"trial-{trial.number}",
                               tags={**tags, **extra, "mlflow.parentRunId": parent}).info.run_id
    cfg.tracking.run_id = run_id  # the trainer attaches to it
    checkpoint = resume_from or str(Path(cfg.trainer.output_dir).absolute() / run_id / "last.pt")
    _attrs(trial, {"mlflow_run_id": run_id, "checkpoint": checkpoint})
    return run_id


def _close_run(cfg: Any, run_id: str, reason: str) -> None:
    """Mark a created child run FAILED with ``reason`` (the trial failed before its trainer started it)."""
    try:
        from mlflow.tracking import MlflowClient

        from freezebench.trainer.tracking import resolve_uri

        client = MlflowClient(resolve_uri(cfg.tracking.uri))
        client.set_tag(run_id, "error", reason[:400])
        client.set_terminated(run_id, "FAILED")
    except Exception as e:  # tracking trouble must not hide the trial's own failure
        log.warning("could not record the failed trial in MLflow: %s", e)


def run_trial(study: Any, trial_id: int, space: Space, parent: str | None, *, heartbeat_s: float,
              seed: int | None = None, study_name: str = "", echo: Any = print) -> Any:
    """Run one trial in this process: build the config, fit, tell. Returns the FrozenTrial."""
    import optuna
    from optuna.trial import TrialState

    from freezebench.config import load_config
    from freezebench.trainer import Trainer

    trial = optuna.Trial(study, trial_id)
    frozen = study._storage.get_trial(trial_id)
    if seed is None:
        seed = int(frozen.user_attrs["seed"])
    else:
        trial.set_user_attr("seed", seed)
    point = {p.key: p.suggest(trial) for p in space.params}
    progress.describe(f"trial {trial.number} [{_point_text(point)} seed={seed}]")
    tags = {"sweep": space.name, "study": study_name, "trial": str(trial.number), "kind": "sweep-trial"}
    extra = space.trial_overrides(point) + [f"trainer.seed={seed}"]
    resume_from = frozen.user_attrs.get("resume_from")
    if resume_from and not os.path.isfile(resume_from):
        resume_from = None  # the lost trial died before its first checkpoint: start over
    if resume_from:
        extra.append(f"resume={resume_from}")
    trainer = None
    cfg = None
    with Heartbeat(study._storage, trial_id, heartbeat_s):
        try:
            cfg = load_config(extra)
            if cfg.tracking.run_name is None:
                cfg.tracking.run_name = child_run_name(cfg, point)
            if parent is not None and cfg.tracking.enabled:
                _nest(cfg, parent, tags)
                _start_child_run(cfg, parent, trial, tags, resume_from)
            if resume_from:
                echo(f"trial {trial.number}: resuming the lost trial {frozen.user_attrs.get('retry_of')}'s "
                     f"checkpoint {resume_from}")
            trainer = Trainer(cfg)
            faults.set_in_trial(True)  # arms the mid_trial fault point (tests only)
            try:
                result = trainer.fit()
            finally:
                faults.set_in_trial(False)
        except TrainingInterrupted as e:
            # SIGTERM/SIGINT at a step boundary: the trainer wrote a checkpoint and marked the run KILLED;
            # the trial is re-queued to resume that checkpoint, and this worker stops (it does not go on to
            # the next trial, which would take one more signal per trial to stop)
            if e.checkpoint:
                _attrs(trial, {"checkpoint": os.path.abspath(e.checkpoint)})
            _tell_interrupted(study, trial, frozen)
            raise
        except KeyboardInterrupt:
            _tell_interrupted(study, trial, frozen)
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:1000]
            run_id = trainer.tracker.run_id if trainer is not None else None
            created = cfg.tracking.run_id if cfg is not None and parent is not None else None
            if run_id is None and created:  # the child run exists, but the trainer never started it
                _close_run(cfg, created, reason)
                run_id = created
            if run_id is None and parent is not None and cfg is not None and cfg.tracking.enabled:
                run_id = _failed_child_run(cfg, parent, f"trial-{trial.number}", tags, reason)
            _attrs(trial, {"fail_reason": reason, "raised": True, "mlflow_run_id": run_id})
            _tell(study, trial, state=TrialState.FAIL)
            echo(f"trial {trial.number} [{_point_text(point)} seed={seed}] FAILED: {reason}")
            return study._storage.get_trial(trial_id)
    m = result.metrics
    _attrs(trial, {"mlflow_run_id": result.run_id, **{k: float(m[k]) for k in METRICS if _finite(m.get(k))}})
    acc, tflops = m.get(M.VAL_ACC), m.get(M.COST_TFLOPS)
    values = [acc] if space.objective == "accuracy" else [acc, tflops]
    if not all(_finite(v) for v in values):
        _attrs(trial, {"fail_reason": f"no finite objective (val/acc={acc}, cost/tflops={tflops})", "raised": True})
        _tell(study, trial, state=TrialState.FAIL)
    else:
        _tell(study, trial, values=values)
    echo(f"trial {trial.number} [{_point_text(point)} seed={seed}]: val/acc {acc:.4f}  "
         f"{m.get(M.COST_TFLOPS, float('nan')):.4g} TFLOPs  {m.get(M.TIME_TOTAL_S, float('nan')):.1f} s"
         + (f"  (MLflow run {result.run_id})" if result.run_id else ""))
    return study._storage.get_trial(trial_id)


def _nest(cfg: Any, parent: str, tags: dict[str, str]) -> None:
    """Make the trial's run a child of ``parent``, in the parent's experiment, with the sweep's tags."""
    from mlflow.tracking import MlflowClient
    from omegaconf import open_dict

    from freezebench.trainer.tracking import resolve_uri

    client = MlflowClient(resolve_uri(cfg.tracking.uri))
    cfg.tracking.parent_run_id = parent
    cfg.tracking.experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
    with open_dict(cfg.tracking.tags):
        for k, v in tags.items():
            cfg.tracking.tags[k] = v


def _attrs(trial: Any, attrs: dict[str, Any]) -> None:
    import optuna

    for k, v in attrs.items():
        if v is None:
            continue
        try:
            trial.set_user_attr(k, v)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # taken over by another worker meanwhile (we were presumed dead)


def _tell(study: Any, trial: Any, **kw: Any) -> None:
    import optuna

    try:
        study.tell(trial, **kw)
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was taken over by another worker (missed heartbeats); its result is dropped",
                    trial.number)


def _tell_interrupted(study: Any, trial: Any, frozen: Any) -> None:
    """Ctrl-C mid-trial: fail it without ``raised`` and re-queue it, so a re-run runs it again."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        _attrs(trial, {"fail_reason": "interrupted"})
        study.tell(trial, state=TrialState.FAIL)
        _retry(study, study._storage.get_trial(trial._trial_id), "interrupted")


# --- the worker loop ------------------------------------------------------------------------------------
def run_sweep(
    space: str | Space,
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    storage: str | None = None,
    study: str | None = None,
    *,
    heartbeat_s: float = 30.0,  # seconds between a running trial's heartbeats
    grace_s: float | None = None,  # a RUNNING trial without a heartbeat this long is taken over (default 4 beats)
    poll_s: float | None = None,  # wait between checks while other workers finish (default: heartbeat_s / 2)
    retry_failed: bool = False,  # re-run grid points whose trial raised
    max_trials: int | None = None,  # stop this worker after running this many trials
    plots: bool = True,  # log Optuna's plots to the parent run at the end
    echo: Any = print,  # progress lines (None: silent)
) -> SweepResult:
    """Run (or join, or finish) a sweep in this process until every grid point has run (grid) or ``n_trials``
    trials exist (tpe). Returns the study, the parent MLflow run id and the summary table.

    ``space``: a name in ``sweeps/spaces/``, a YAML path or a :class:`Space`; ``overrides`` are config
    overrides for every trial; ``seeds`` replace the space's seeds; ``storage``: an Optuna storage URL
    (default ``sqlite:///optuna.db``); ``study``: the study name (default: the space's name).
    """
    from .table import finish_report

    echo = progress.write if echo is print else (echo or (lambda *a, **k: None))  # lines above the bar
    space = load_space(space).with_(overrides=list(overrides or []), seeds=seeds)
    study_name = study or space.name
    grace_s = 4 * heartbeat_s if grace_s is None else grace_s
    poll_s = max(0.2, heartbeat_s / 2) if poll_s is None else poll_s
    if heartbeat_s <= 0 or grace_s <= heartbeat_s:
        raise SweepError(f"heartbeat ({heartbeat_s} s) must be positive and below the grace period ({grace_s} s)")
    _validate_points(space)
    env_run = os.environ.get("MLFLOW_RUN_ID")
    st, parent = open_study(space, study_name, storage)
    # the trainer attaches to $MLFLOW_RUN_ID (set by `mlflow run`): trials must start their own child runs
    os.environ.pop("MLFLOW_RUN_ID", None)
    ran: list[int] = []
    bar = progress.start(*_trial_total(st, space), f"sweep {space.name}", unit="trial")  # done of total, ETA
    try:
        if parent is not None:
            _check_parent(space, parent)
            if env_run and env_run != parent:
                _tag_run(space, env_run, {"sweep_parent_run_id": parent})
        echo(f"sweep {space.name!r}: study {study_name!r} in {redact(storage or 'sqlite:///optuna.db')}, "
             f"worker {socket.gethostname()}:{os.getpid()}" + (f", MLflow parent run {parent}" if parent else ""))
        if space.sampler == "grid":
            _grid_loop(st, space, parent, study_name, heartbeat_s, grace_s, poll_s, retry_failed, max_trials,
                       ran, echo)
        else:
            _tpe_loop(st, space, parent, study_name, heartbeat_s, grace_s, poll_s, max_trials, ran, echo)
    finally:
        bar.close()
        if env_run:
            os.environ["MLFLOW_RUN_ID"] = env_run
    rows, text = finish_report(st, parent, space=space, plots=plots, final=_complete(st, space))
    echo(text)
    return SweepResult(study=st, parent_run_id=parent, rows=rows, table=text, ran=ran)


def _trial_total(study: Any, space: Space) -> tuple[int, int]:
    """(trials of the sweep, done already): grid entries (points x seeds), or tpe's n_trials."""
    if space.sampler == "grid":
        p = grid_progress(study)
        return p.total, p.done
    return int(space.n_trials or 0), 0


def _check_parent(space: Space, parent: str) -> None:
    from mlflow.tracking import MlflowClient

    from freezebench.trainer.tracking import resolve_uri

    cfg = _base_cfg(space)
    uri = resolve_uri(cfg.tracking.uri)
    try:
        MlflowClient(uri).get_run(parent)
    except Exception:
        raise SweepError(f"the study's parent MLflow run {parent} is not in the tracking store {uri}: run every "
                         f"worker with the same MLFLOW_TRACKING_URI (or tracking.uri)") from None


def _tag_run(space: Space, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    from freezebench.trainer.tracking import resolve_uri

    with contextlib.suppress(Exception):
        client = MlflowClient(resolve_uri(_base_cfg(space).tracking.uri))
        for k, v in tags.items():
            client.set_tag(run_id, k, v)


def _complete(study: Any, space: Space) -> bool:
    from optuna.trial import TrialState

    if space.sampler == "grid":
        p = grid_progress(study)
        return p.done == p.total
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state == TrialState.COMPLETE or t.user_attrs.get("raised")]
    busy = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return len(finished) >= (space.n_trials or 0) and not busy


def _on_lost(space: Space, parent: str | None) -> Any:
    """What to do with a lost trial's MLflow run: mark it KILLED (nothing when the sweep is untracked)."""
    if parent is None:
        return None
    from freezebench.trainer.tracking import resolve_uri

    uri = resolve_uri(_base_cfg(space).tracking.uri)
    return lambda trial, reason: kill_child_run(uri, trial, reason)


def _grid_loop(st: Any, space: Space, parent: str | None, study_name: str, heartbeat_s: float, grace_s: float,
               poll_s: float, retry_failed: bool, max_trials: int | None, ran: list[int], echo: Any) -> None:
    if retry_failed:
        p = grid_progress(st, retry_failed=True)
        _requeue(st, p.missing, "retry_failed")
    waited = False
    on_lost = _on_lost(space, parent)
    while True:
        fail_stale(st, grace_s, on_lost)
        if max_trials is not None and len(ran) >= max_trials:
            return
        tid = _pop_waiting(st)
        if tid is not None:
            waited = False
            t = run_trial(st, tid, space, parent, heartbeat_s=heartbeat_s, study_name=study_name, echo=echo)
            ran.append(t.number)
            p = grid_progress(st)
            progress.advance_to(p.done)
            echo(f"[{p.done}/{p.total} grid points done]")
            continue
        p = grid_progress(st)
        if p.done == p.total:
            return
        if p.missing and not p.pending:
            # entries lost without a re-queue (e.g. a worker died while re-queueing): queue them again
            _requeue(st, p.missing, "missing")
            continue
        if not waited:
            echo(f"waiting for {p.running} trial(s) running in other workers ({p.done}/{p.total} done)")
            waited = True
        time.sleep(poll_s)


def _requeue(st: Any, grid_indices: list[int], why: str) -> None:
    if not grid_indices:
        return
    latest: dict[int, Any] = {}
    for t in st.get_trials(deepcopy=False):
        gi = t.user_attrs.get("grid_index")
        if gi in grid_indices:
            latest[gi] = t
    for gi in grid_indices:
        t = latest.get(gi)
        if t is None:  # never enqueued: rebuild from the space
            continue
        attrs = _retry_attrs(t)
        st.enqueue_trial(dict(t.params) or dict(t.system_attrs.get("fixed_params", {})), user_attrs=attrs)
    log.info("re-queued %d grid entries (%s)", len(grid_indices), why)


def _tpe_loop(st: Any, space: Space, parent: str | None, study_name: str, heartbeat_s: float, grace_s: float,
              poll_s: float, max_trials: int | None, ran: list[int], echo: Any) -> None:
    from optuna.trial import TrialState

    seed = space.seeds[0]
    waited = False
    on_lost = _on_lost(space, parent)
    while True:
        fail_stale(st, grace_s, on_lost)
        if max_trials is not None and len(ran) >= max_trials:
            return
        tid = _pop_waiting(st)
        if tid is None:
            trials = st.get_trials(deepcopy=False)
            counted = [t for t in trials if "retry_of" not in t.user_attrs]
            if len(counted) < space.n_trials:
                tid = st.ask()._trial_id  # a new point from TPE (workers may overshoot n_trials by one each)
        if tid is not None:
            waited = False
            t = run_trial(st, tid, space, parent, heartbeat_s=heartbeat_s, seed=seed, study_name=study_name, echo=echo)
            ran.append(t.number)
            progress.advance()
            continue
        if not st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        if not waited:
            echo("waiting for trials running in other workers")
            waited = True
        time.sleep(poll_s)


def report(study: str, storage: str | None = None, *, plots: bool = True) -> SweepResult:
    """The summary table of an existing study (printed by the CLI, logged to its parent run)."""
    from .table import finish_report

    st = _load(study, open_storage(storage), storage or "sqlite:///optuna.db", None)
    spec = st.user_attrs.get("sweep_spec")
    if spec is None:
        raise SweepError(f"study {study!r} was not made by freezebench sweep (no sweep_spec attribute)")
    from .space import parse_space

    space = parse_space({"name": st.user_attrs.get("sweep_space", study),
                         "description": st.user_attrs.get("sweep_description", ""), "params": {
        k: (v["choices"] if "choices" in v else {kk: vv for kk, vv in v.items() if vv is not None})
        for k, v in spec["params"].items()}, "sampler": spec["sampler"], "n_trials": spec["n_trials"],
        "objective": spec["objective"], "seeds": spec["seeds"], "overrides": spec["overrides"]}, study)
    parent = st.user_attrs.get("mlflow_parent_run_id")
    rows, text = finish_report(st, parent, space=space, plots=plots, final=False)
    return SweepResult(study=st, parent_run_id=parent, rows=rows, table=text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: freezebench sweep ...")
