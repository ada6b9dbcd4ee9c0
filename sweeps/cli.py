"""``freezebench sweep``: run, join or finish an Optuna sweep; print its table.

    freezebench sweep window trainer.epochs=3 --seeds 0              # SmartFRZ window, paper Table 4
    freezebench sweep freezeout_t0 model.name=resnet20 --seeds 0,1,2 --storage postgresql://u:p@db/optuna
    freezebench sweep my_space.yaml --study mine                     # a space file of your own
    freezebench sweep --report --study window                        # the table of a study so far
    freezebench sweep --list                                         # the shipped spaces
"""

from __future__ import annotations

import argparse
import sys

from freezebench.errors import FreezebenchError, TrainingInterrupted


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="an Optuna sweep over config keys (one parent MLflow run, one child run per trial)",
        description="Run a sweep's trials in this process until the study is done; start the same command on "
                    "more machines (same --storage and --study) to share the work.")
    p.add_argument("space", nargs="?", help="a space name (freezebench sweep --list) or a YAML file")
    p.add_argument("overrides", nargs="*", help="config overrides for every trial, key=value")
    p.add_argument("--seeds", help="comma-separated seeds (default: the space's); each (point, seed) is one trial")
    p.add_argument("--storage", help="Optuna storage: sqlite:///optuna.db (default), postgresql://..., "
                                     "or journal:///path/study.log")
    p.add_argument("--study", help="study name (default: the space's name); workers on one study share it")
    p.add_argument("--heartbeat", type=float, default=30.0, help="seconds between a running trial's heartbeats")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds without a heartbeat after which a trial is taken over (default: 4 heartbeats)")
    p.add_argument("--retry-failed", action="store_true", help="run again the grid points whose trial raised")
    p.add_argument("--max-trials", type=int, default=None, help="stop this worker after this many trials")
    p.add_argument("--no-plots", action="store_true", help="do not log Optuna's plots to the parent run")
    p.add_argument("--report", action="store_true", help="print (and log) the table of --study; run nothing")
    p.add_argument("--list", action="store_true", help="list the shipped spaces")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_sweep)


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise FreezebenchError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise FreezebenchError("--seeds needs at least one seed")
    return seeds


def cmd_sweep(args: argparse.Namespace) -> int:
    from freezebench.config import split_overrides

    from .runner import report, run_sweep
    from .space import available_spaces, load_space

    if args.list:
        for name in available_spaces():
            s = load_space(name)
            size = f"{len(s.grid())} points" if s.sampler == "grid" else f"tpe, {s.n_trials} trials"
            print(f"{name:<14} {size:<11} seeds {','.join(map(str, s.seeds)):<6} {s.description}")
        return 0
    if args.report:
        if not args.study and not args.space:
            raise FreezebenchError("--report needs --study NAME (or a space, whose name is the default study)")
        res = report(args.study or load_space(args.space).name, args.storage, plots=not args.no_plots)
        print(res.table)
        if res.parent_run_id:
            print(f"logged to MLflow run {res.parent_run_id} (sweep/table.txt)")
        return 0
    if not args.space:
        raise FreezebenchError("give a space: freezebench sweep SPACE [key=value ...] (freezebench sweep --list)")
    if args.max_trials is not None and args.max_trials < 1:
        raise FreezebenchError("--max-trials must be positive")
    try:
        res = run_sweep(args.space, split_overrides(args.overrides), seeds=_seeds(args.seeds), storage=args.storage,
                        study=args.study, heartbeat_s=args.heartbeat, grace_s=args.grace,
                        retry_failed=args.retry_failed, max_trials=args.max_trials, plots=not args.no_plots)
    except TrainingInterrupted as e:  # SIGTERM/SIGINT mid-trial: checkpointed and re-queued; exit as the signal would
        from freezebench.progress import clear_bars

        clear_bars()
        stopped = str(e).split("; continue with")[0]  # the trainer's advice (resume=...) is for `train`
        print(f"freezebench: {stopped}; the trial is re-queued to resume it: run the same sweep command to "
              f"continue", file=sys.stderr)
        return 128 + e.signum
    if res.parent_run_id:
        print(f"MLflow parent run {res.parent_run_id}; live view of the study: "
              f"optuna-dashboard {args.storage or 'sqlite:///optuna.db'}")
    return 0
