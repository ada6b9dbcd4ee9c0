"""Optuna sweeps over freezebench runs (installed as ``freezebench.sweeps``).

    freezebench sweep --list                                   # shipped spaces
    freezebench sweep window trainer.epochs=3 --seeds 0        # SmartFRZ window (paper Table 4)
    freezebench sweep freezeout_t0 --seeds 0,1,2 --storage postgresql://user:pass@host/optuna --study t0
    freezebench sweep --report --study t0 --storage ...        # the table so far, logged to the parent run
    mlflow run . -e sweep --env-manager local -P space=window -P seeds=0

Python (the API paper "suites" build on)::

    from freezebench.sweeps import run_sweep, summary_rows, format_table
    res = run_sweep("window", ["trainer.epochs=3"], seeds=[0], storage="sqlite:///optuna.db", study="w")
    res.study, res.parent_run_id, res.rows, res.table

Space files (``sweeps/spaces/<name>.yaml`` or any path)::

    name: window                                  # default study name
    description: "SmartFRZ attention window (paper Table 4)"
    overrides: [policy=smartfrz]                  # config overrides of every trial (the command line adds more)
    params:                                       # config key -> the values it takes
      policy.window: [20, 30, 40, 50]             # a list: categorical; a grid of these values
      policy.t0: {type: float, low: 0.3, high: 0.6, step: 0.1}   # a range with a step: a grid too
      policy.evals_per_epoch: {type: int, low: 2, high: 5}       # int ranges: step 1 unless given
      optim.lr: {type: float, low: 1e-3, high: 1e-1, log: true}  # no step: only sampler tpe can draw it
      policy: {registry: policies, exclude: [cka_oracle]}        # every registered name (policies|models|datasets)
    sampler: grid                                 # grid: every point x seed exactly once | tpe: n_trials draws
    n_trials: 20                                  # tpe only
    objective: accuracy                           # accuracy (maximise val/acc) | accuracy+tflops (Pareto front)
    seeds: [0, 1, 2]                              # default seeds (--seeds replaces them); tpe takes one

Any config key may be a param, including ``policy`` (the policy's name), ``model.name`` and ``data.name``,
so a grid of policies x models x datasets x seeds is one space. Every grid point is checked against the
config before a trial runs (unknown keys and bad values are errors, not failed trials).

A trial is one fit (one (point, seed)), run in the worker's process (:mod:`.runner`): its MLflow run is a
child of the sweep's parent run, its id stored on the trial (``mlflow_run_id``) with ``val/acc``,
``cost/tflops`` and ``time/total_s``. At the end the table of :mod:`.table` (accuracy mean +- std over
seeds per value, TFLOPs, time) is printed and logged to the parent run with Optuna's plots.
"""

from .runner import SweepResult, report, run_sweep
from .space import Param, Space, SweepError, available_spaces, load_space
from .table import format_table, summary_rows

__all__ = ["Param", "Space", "SweepError", "SweepResult", "available_spaces", "format_table", "load_space",
           "report", "run_sweep", "summary_rows"]
