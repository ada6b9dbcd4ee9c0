"""The ``freezebench`` command line.

    freezebench train policy=static trainer.epochs=3 optim.lr=0.05
    freezebench train --config configs/digits_resnet20.yaml policy=full
    freezebench list                      # registered policies, models, datasets
    freezebench config policy=static      # print the resolved config, train nothing
    freezebench train ... resume=auto     # continue the newest unfinished checkpoint of this config

``key=value`` overrides may stand anywhere after the command, also after options
(``freezebench sweep window --study w trainer.epochs=3``). The default policy is ``full`` (no freezing), for
``freezebench train`` and ``mlflow run .`` alike.

Start-up stays light: this module imports neither torch nor MLflow. ``--help`` and ``list`` read names from
entry-point metadata and the registries' manifests (:mod:`freezebench.registry`); a sub-command from a plug-in
(group ``freezebench.commands``) is loaded only when it is the command given, or for the overview of
``--help``. Each command imports what it uses when it runs. ``train`` starts MLflow in a second process
before it imports torch (:class:`freezebench.trainer.tracking.TrackingProcess`; ``FREEZEBENCH_TRACKING_PROCESS=0``
keeps it in this one), and the console script ends through :func:`exit_now`, skipping the interpreter's teardown.

Errors a user can fix print one line (no traceback unless ``--debug``) and exit with status 2; a run that
fails after it started is marked FAILED in MLflow (under ``mlflow run`` also one that failed before: it gets
freezebench's run name and an ``error`` tag).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .errors import FreezebenchError
from . import metrics as M

#: commands of the core; every other one comes from the ``freezebench.commands`` entry-point group
CORE_COMMANDS = ("train", "config", "list")
#: environment switch: 0 keeps ``freezebench train``'s MLflow calls in its own process (no second process)
TRACKING_PROCESS_ENV = "FREEZEBENCH_TRACKING_PROCESS"
DEFAULT_POLICY = "full"  # the dataclass default of config.py and MLproject's `policy` default say the same


def split_overrides(items: Sequence[str]) -> list[str]:
    """See :func:`freezebench.config.split_overrides` (kept here for plug-in commands' imports)."""
    from .config import split_overrides as split

    return split(items)


_split_overrides = split_overrides  # the former private name


def _parser(plugins: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``plugins``: the plug-in commands to load (None: all of them)."""
    p = argparse.ArgumentParser(
        prog="freezebench", description="Layer-freezing policies on one trainer.",
        epilog=f"The default policy is {DEFAULT_POLICY} (no freezing), for `freezebench train` and "
               "`mlflow run .` alike; policy=NAME chooses another (`freezebench list`). Overrides key=value "
               "may follow options too.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one model with one freezing policy (one MLflow run)",
                       description=f"Train one model with one freezing policy, tracked as one MLflow run. "
                                   f"Default policy: {DEFAULT_POLICY} (no freezing; the same as `mlflow run .`).")
    t.add_argument("--config", "-c", help="YAML preset: a path or a name in configs/")
    t.add_argument("overrides", nargs="*",
                   help=f"config overrides key=value (policy=NAME selects a policy; default {DEFAULT_POLICY})")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    c = sub.add_parser("config", help="print the resolved config without training")
    c.add_argument("--config", "-c", help="YAML preset: a path or a name in configs/")
    c.add_argument("overrides", nargs="*", help="config overrides key=value")
    c.add_argument("--reference", action="store_true", help="print the config reference (Markdown) instead")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ls = sub.add_parser("list", help="list registered policies, models and datasets")
    ls.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _plugin_commands(sub, plugins)
    return p


def _command_entry_points() -> dict[str, object]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="freezebench.commands")}


def _plugin_commands(sub: argparse._SubParsersAction, only: Sequence[str] | None = None) -> None:
    """Commands from other packages (entry-point group ``freezebench.commands``).

    Each entry point names a function ``register(subparsers)`` that adds its sub-parser and sets
    ``handler=<function(args) -> int>`` as a default on it. The core knows none of them by name.
    """
    for name, ep in sorted(_command_entry_points().items()):
        if only is None or name in only:
            ep.load()(sub)  # type: ignore[attr-defined]


def _command_word(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    for a in argv:
        if not a.startswith("-"):
            return a
        if a == "--":
            return None
    return None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words left over after options join the command's overrides."""
    word = _command_word(argv)
    if word in CORE_COMMANDS:
        plugins: list[str] | None = []
    elif word is not None and word in _command_entry_points():
        plugins = [word]
    else:  # --help, no command or an unknown one: the overview names every command
        plugins = None
    parser = _parser(plugins)
    args, extras = parser.parse_known_args(list(argv))
    if extras:
        overrides = [e for e in extras if "=" in e and not e.startswith("-")]
        if len(overrides) != len(extras) or not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *overrides]  # after the positional ones: later items win
    return args


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .config import load_config
    from .errors import TrainingInterrupted
    from .messages import ending_lines, frozen_text

    cfg = load_config(split_overrides(args.overrides), preset=args.config)
    process = None
    # torchrun: rank 0 tracks; MLflow imported already (a caller of main()): nothing to overlap;
    # FREEZEBENCH_TRACKING_PROCESS=0 keeps MLflow in this process
    if (cfg.tracking.enabled and os.environ.get("RANK", "0") == "0" and "mlflow" not in sys.modules
            and os.environ.get(TRACKING_PROCESS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")):
        from .trainer.tracking import TrackingProcess

        # MLflow's imports run in a second process while this one imports torch and builds data and model
        process = TrackingProcess.spawn(cfg.tracking.uri, debug=getattr(args, "debug", False))
    from .trainer.loop import Trainer

    trainer = Trainer(cfg, tracking_process=process)
    try:
        result = trainer.fit()
    except TrainingInterrupted as e:  # SIGTERM/SIGINT: a checkpoint was written; exit as the signal would
        if trainer.rank == 0:
            from .progress import clear_bars

            clear_bars()
            print(f"freezebench: {e}", file=sys.stderr)
        return 128 + e.signum
    finally:
        from .trainer.distributed import cleanup

        cleanup()
    if trainer.rank != 0:  # under torchrun rank 0 reports
        return 0
    m = result.metrics
    saving = 100 * m.get(M.COST_SAVING_FRAC, 0.0)
    print(
        f"\n{trainer.run_name}: val/acc {m.get(M.VAL_ACC, float('nan')):.4f}  "
        f"time {m[M.TIME_TOTAL_S]:.1f}s (train {sum(h[M.TIME_TRAIN_S] for h in result.history):.1f}s, "
        f"policy {m[M.TIME_POLICY_TOTAL_S]:.2f}s)  "
        f"{m[M.COST_TFLOPS]:.4f} TFLOPs ({saving:.1f}% below full training)  "
        f"peak {m[M.PEAK_MB]:.0f} MB  frozen: {frozen_text(int(m[M.FROZEN_UNITS]), len(trainer.units) - 1)}"
    )
    if result.checkpoint:
        print(f"final weights: {result.checkpoint}")
    if result.run_id:  # last: where to look
        tracker = trainer.tracker
        for line in ending_lines(tracker.uri, getattr(tracker, "experiment_id", None), result.run_id,
                                 trainer.run_name):
            print(line)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import load_config, reference_markdown, to_yaml

    if args.reference:
        print(reference_markdown())
        return 0

    print(to_yaml(load_config(split_overrides(args.overrides), preset=args.config)), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import DATASETS, MODELS, POLICIES, TEXT_MODELS

    for title, reg in (("policies", POLICIES), ("models", MODELS), ("text models", TEXT_MODELS),
                       ("datasets", DATASETS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # MLflow announces its system-metrics sampler at INFO on every run (noise in sweeps)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    from .progress import clear_bars, phase

    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except FreezebenchError as e:
        clear_bars()  # the error line starts on a clean line, not over a progress bar
        if args.command == "train":
            from .messages import tag_failed_launch

            tag_failed_launch(getattr(args, "overrides", []), e)
        if debug:
            raise
        print(f"freezebench: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed
        return 0
    except KeyboardInterrupt:
        clear_bars()
        print("freezebench: interrupted", file=sys.stderr)
        return 130
    finally:
        phase("exit")


def exit_now(code: int | None) -> None:
    """End the process with ``code`` as ``sys.exit`` would, without the interpreter's teardown.

    What a normal exit does that matters is done: non-daemon threads are joined, the ``atexit`` callbacks run
    (logging's flush, MLflow's), stdout and stderr are flushed. What is skipped is freeing every module and
    object one by one, which after torch and MLflow were imported takes a second or more of a short run's end
    (issue 17); the operating system reclaims the memory at once. Without ``atexit._run_exitfuncs`` (another
    Python): a plain ``sys.exit``.
    """
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    code = 0 if code is None else code
    if run_exitfuncs is None or not isinstance(code, int):
        sys.exit(code)
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more can be written anyway
            pass
    os._exit(code)


def run() -> None:
    """The ``freezebench`` console script and ``python -m freezebench``: :func:`main`, then :func:`exit_now`.

    (In-process callers, tests among them, call :func:`main`, which returns the exit status.)
    """
    exit_now(main())


if __name__ == "__main__":  # pragma: no cover
    run()
