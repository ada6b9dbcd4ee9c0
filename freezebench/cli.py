"""The ``freezebench`` command line.

    freezebench train policy=static trainer.epochs=3 optim.lr=0.05
    freezebench train --config configs/digits_resnet20.yaml policy=full
    freezebench list                      # registered policies, models, datasets
    freezebench config policy=static      # print the resolved config, train nothing
    freezebench train ... resume=auto     # continue the newest unfinished checkpoint of this config

Errors a user can fix print one line (no traceback unless ``--debug``) and exit with status 2; a run that
fails after it started is marked FAILED in MLflow.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from .errors import FreezebenchError
from . import metrics as M


def _split_overrides(items: Sequence[str]) -> list[str]:
    """Overrides may come as one string (``mlflow run -P overrides="a=1 b=2"``): split on shell rules."""
    out: list[str] = []
    for item in items:
        try:
            out.extend(shlex.split(item) if (" " in item.strip() or not item.strip()) else [item])
        except ValueError as e:  # unbalanced quotes
            raise FreezebenchError(f"cannot split the overrides {item!r} into key=value items: {e}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freezebench", description="Layer-freezing policies on one trainer.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one model with one freezing policy (one MLflow run)")
    t.add_argument("--config", "-c", help="YAML preset: a path or a name in configs/")
    t.add_argument("overrides", nargs="*", help="config overrides key=value (policy=NAME selects a policy)")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    c = sub.add_parser("config", help="print the resolved config without training")
    c.add_argument("--config", "-c", help="YAML preset: a path or a name in configs/")
    c.add_argument("overrides", nargs="*", help="config overrides key=value")
    c.add_argument("--reference", action="store_true", help="print the config reference (Markdown) instead")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ls = sub.add_parser("list", help="list registered policies, models and datasets")
    ls.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _plugin_commands(sub)
    return p


def _plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Commands from other packages (entry-point group ``freezebench.commands``).

    Each entry point names a function ``register(subparsers)`` that adds its sub-parser and sets
    ``handler=<function(args) -> int>`` as a default on it. The core knows none of them by name.
    """
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="freezebench.commands"), key=lambda e: e.name):
        ep.load()(sub)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer.loop import Trainer

    from .errors import TrainingInterrupted

    cfg = load_config(_split_overrides(args.overrides), preset=args.config)
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except TrainingInterrupted as e:  # SIGTERM/SIGINT: a checkpoint was written; exit as the signal would
        if trainer.rank == 0:
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
        f"peak {m[M.PEAK_MB]:.0f} MB  frozen {int(m[M.FROZEN_UNITS])}/{len(trainer.units) - 1} units"
    )
    if result.run_id:
        uri = trainer.tracker.uri
        print(f"MLflow run {result.run_id} in {uri}; browse with: mlflow ui --backend-store-uri {uri}")
    if result.checkpoint:
        print(f"final weights: {result.checkpoint}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import load_config, reference_markdown, to_yaml

    if args.reference:
        print(reference_markdown())
        return 0

    print(to_yaml(load_config(_split_overrides(args.overrides), preset=args.config)), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import DATASETS, MODELS, POLICIES

    for title, reg in (("policies", POLICIES), ("models", MODELS), ("datasets", DATASETS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # MLflow announces its system-metrics sampler at INFO on every run (noise in sweeps)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except FreezebenchError as e:
        if debug:
            raise
        print(f"freezebench: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed
        return 0
    except KeyboardInterrupt:
        print("freezebench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
