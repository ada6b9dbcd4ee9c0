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

    pr = sub.add_parser("predictor", help="SmartFRZ predictor: collect training data, train the predictor")
    prs = pr.add_subparsers(dest="predictor_command", required=True, metavar="STEP")
    col = prs.add_parser("collect", help="train a reference, retrain recording snapshots + CKA, label (paper 3.4)")
    col.add_argument("overrides", nargs="*", help="config overrides of the run (model.name=..., data.name=...)")
    col.add_argument("--out", required=True, help="dataset file to write (.pt)")
    col.add_argument("--window", type=int, default=30, help="snapshots per sample (paper: 30)")
    col.add_argument("--tailor-size", type=int, default=1024, help="weights per snapshot (paper: 1024)")
    col.add_argument("--record-every", type=int, default=None, help="steps between snapshots (default ~30/epoch)")
    col.add_argument("--checks-per-epoch", type=int, default=1, help="CKA checks (label times) per epoch")
    col.add_argument("--oracle-window", type=int, default=3, help="CKA-oracle rule: window of checks")
    col.add_argument("--var-threshold", type=float, default=1e-4, help="CKA-oracle rule: variance threshold")
    col.add_argument("--cutoff", type=float, default=0.3, help="CKA-oracle rule: CKA cutoff")
    col.add_argument("--seed", type=int, default=0, help="tailoring seed")
    col.add_argument("--run-id", default=None, help="id of this run in the dataset")
    col.add_argument("--no-track", action="store_true", help="do not log the dataset to MLflow")
    col.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    trn = prs.add_parser("train", help="train the predictor on collected datasets (split by run)")
    trn.add_argument("datasets", nargs="+", help="dataset files from `predictor collect`")
    trn.add_argument("--out", required=True, help="predictor weights file to write (.pt)")
    trn.add_argument("--val-runs", default="", help="comma-separated run ids held out (default: the last run)")
    trn.add_argument("--epochs", type=int, default=20)
    trn.add_argument("--lr", type=float, default=1e-3)
    trn.add_argument("--batch-size", type=int, default=256)
    trn.add_argument("--norm", default="standardize", choices=["standardize", "delta", "none"])
    trn.add_argument("--seed", type=int, default=0)
    trn.add_argument("--no-track", action="store_true", help="do not log the predictor to MLflow")
    trn.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ev = prs.add_parser("evaluate", help="agreement of a predictor with the oracle labels of held-out datasets")
    ev.add_argument("weights", help="predictor weights file")
    ev.add_argument("datasets", nargs="+", help="dataset files from `predictor collect`")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

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


def cmd_predictor(args: argparse.Namespace) -> int:
    try:
        return _predictor(args)
    except (ValueError, FileNotFoundError) as e:  # bad datasets, run ids or paths: the user's to fix
        raise FreezebenchError(str(e)) from e


def _predictor(args: argparse.Namespace) -> int:
    if args.predictor_command == "collect":
        from .predictors.collect import collect

        path = collect(_split_overrides(args.overrides), out=args.out, window=args.window,
                       tailor_size=args.tailor_size, record_every=args.record_every,
                       checks_per_epoch=args.checks_per_epoch, oracle_window=args.oracle_window,
                       var_threshold=args.var_threshold, cutoff=args.cutoff, seed=args.seed, run_id=args.run_id)
        print(f"dataset written: {path}")
        if not args.no_track:
            from .predictors.collect import load_dataset

            data = load_dataset(path)
            run = data["runs"][0]
            _log_predictor_step(
                f"collect-{run['id']}", {"kind": "predictor-collect", "model": run["model"], "dataset": run["dataset"]},
                {"model": run["model"], "dataset": run["dataset"], "seed": run["seed"], "window": args.window,
                 "tailor_size": args.tailor_size, "checks_per_epoch": args.checks_per_epoch,
                 "oracle_window": args.oracle_window, "var_threshold": args.var_threshold, "cutoff": args.cutoff},
                {"samples": float(len(data["labels"])), "freeze_frac": float(data["labels"].float().mean())},
                path, "dataset")
        return 0
    if args.predictor_command == "evaluate":
        from .predictors.train import evaluate_predictor

        m = evaluate_predictor(args.weights, args.datasets)
        print("agreement with the oracle: " + "  ".join(f"{k} {v:.4g}" for k, v in m.items()))
        return 0
    from .predictors.train import train_predictor

    val = [r for r in args.val_runs.split(",") if r] or None
    metrics = train_predictor(args.datasets, out=args.out, val_runs=val, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, norm=args.norm, seed=args.seed)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print("validation: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    print(f"predictor written: {args.out}")
    if not args.no_track:
        _log_predictor_step("predictor-train", {"kind": "predictor-train"},
                            {"datasets": ",".join(args.datasets), "val_runs": args.val_runs or "(last run)",
                             "epochs": args.epochs, "lr": args.lr, "norm": args.norm, "seed": args.seed},
                            {f"val/{k}": float(v) for k, v in shown.items()}, args.out, "predictor")
    return 0


def _log_predictor_step(name: str, tags: dict, params: dict, metrics: dict, path: str, folder: str) -> None:
    """One MLflow run (experiment ``freezebench-predictor``) holding a pipeline step's file and figures."""
    import math

    import mlflow

    from .trainer.tracking import resolve_uri

    mlflow.set_tracking_uri(resolve_uri(None))
    mlflow.set_experiment("freezebench-predictor")
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(tags)
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        mlflow.log_artifact(str(path), folder)
    print(f"logged to MLflow run {run.info.run_id} (experiment freezebench-predictor)")


COMMANDS = {"train": cmd_train, "config": cmd_config, "list": cmd_list, "predictor": cmd_predictor}


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
