"""``freezebench predictor``: the SmartFRZ predictor pipeline from the command line (paper section 3.4).

    freezebench predictor collect model.name=resnet20 --out d0.pt --run-id r0   # training data of one run
    freezebench predictor train d0.pt d1.pt --out predictor.pt                  # train the predictor
    freezebench predictor evaluate predictor.pt held_out.pt                     # agreement with the oracle

A plug-in command like ``sweep`` and ``compare``: entry point ``predictor`` in the group
``freezebench.commands`` (``register(subparsers)``); the core CLI does not know it by name.
"""

from __future__ import annotations

import argparse

from freezebench.errors import FreezebenchError


def register(subparsers: argparse._SubParsersAction) -> None:
    pr = subparsers.add_parser("predictor", help="SmartFRZ predictor: collect training data, train the predictor")
    pr.set_defaults(handler=cmd_predictor)
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


def cmd_predictor(args: argparse.Namespace) -> int:
    try:
        return _predictor(args)
    except (ValueError, FileNotFoundError) as e:  # bad datasets, run ids or paths: the user's to fix
        raise FreezebenchError(str(e)) from e


def _predictor(args: argparse.Namespace) -> int:
    if args.predictor_command == "collect":
        from freezebench.config import split_overrides

        from .collect import collect

        path = collect(split_overrides(args.overrides), out=args.out, window=args.window,
                       tailor_size=args.tailor_size, record_every=args.record_every,
                       checks_per_epoch=args.checks_per_epoch, oracle_window=args.oracle_window,
                       var_threshold=args.var_threshold, cutoff=args.cutoff, seed=args.seed, run_id=args.run_id)
        print(f"dataset written: {path}")
        if not args.no_track:
            from .collect import load_dataset

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
        from .train import evaluate_predictor

        m = evaluate_predictor(args.weights, args.datasets)
        print("agreement with the oracle: " + "  ".join(f"{k} {v:.4g}" for k, v in m.items()))
        return 0
    from .train import train_predictor

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

    from freezebench.trainer.tracking import resolve_uri

    mlflow.set_tracking_uri(resolve_uri(None))
    mlflow.set_experiment("freezebench-predictor")
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(tags)
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        mlflow.log_artifact(str(path), folder)
    print(f"logged to MLflow run {run.info.run_id} (experiment freezebench-predictor)")
