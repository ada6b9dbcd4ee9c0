"""``freezebench predictor``: collect training data, train and evaluate SmartFRZ's predictor, rebuild the family.

    freezebench predictor collect model.name=resnet20 data.name=digits trainer.epochs=8 --out data/r20.pt
    freezebench predictor train data/a.pt data/b.pt --val data/c.pt --window 30 --tailor-size 1024 --out p.pt
    freezebench predictor evaluate data/test.pt                      # the shipped default predictor
    freezebench predictor evaluate data/test.pt --weights p.pt --json
    freezebench predictor build --data data/corpus                   # the whole shipped family, from scratch

Registered through the ``freezebench.commands`` entry point (``register``); the core knows nothing of it.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from freezebench.errors import FreezebenchError


def register(subparsers: argparse._SubParsersAction) -> None:
    pr = subparsers.add_parser("predictor", help="SmartFRZ predictor: collect data, train, evaluate, build the family")
    prs = pr.add_subparsers(dest="predictor_command", required=True, metavar="STEP")
    hidden = dict(action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    col = prs.add_parser("collect", help="record two seeds of a config, label each against the other (paper 3.4)")
    col.add_argument("overrides", nargs="*", help="config overrides of the runs (model.name=..., data.name=...)")
    col.add_argument("--out", required=True, help="dataset file to write (.pt)")
    col.add_argument("--seeds", default="0,1", help="the two seeds (each run is the other's reference)")
    col.add_argument("--tailor-size", type=int, default=4096, help="weights per snapshot; smaller sizes are prefixes")
    col.add_argument("--record-every", type=int, default=None, help="steps between snapshots (default ~30/epoch)")
    col.add_argument("--checks-per-epoch", type=int, default=2, help="CKA checks (label times) per epoch")
    col.add_argument("--window-epochs", type=float, default=None, help="oracle rule: window in epochs (default 2)")
    col.add_argument("--var-threshold", type=float, default=None, help="oracle rule: variance threshold (1e-4)")
    col.add_argument("--cutoff", type=float, default=None, help="oracle rule: CKA cutoff (0.3)")
    col.add_argument("--tailor-seed", type=int, default=0, help="tailoring seed (policy.seed)")
    col.add_argument("--run-id", default=None, help="run id prefix in the dataset")
    col.add_argument("--no-track", action="store_true", help="do not log the dataset to MLflow")
    col.add_argument("--debug", **hidden)

    trn = prs.add_parser("train", help="train one predictor: fit on TRAIN runs, select on --val runs")
    trn.add_argument("datasets", nargs="+", help="training dataset files from `predictor collect`")
    trn.add_argument("--val", nargs="+", required=True, help="validation dataset files (epoch and threshold)")
    trn.add_argument("--out", required=True, help="predictor weights file to write (.pt)")
    trn.add_argument("--window", type=int, default=30)
    trn.add_argument("--tailor-size", type=int, default=1024)
    trn.add_argument("--norm", default="first_delta", choices=["first_delta", "diff", "standardize", "delta", "none"])
    trn.add_argument("--epochs", type=int, default=6)
    trn.add_argument("--samples-per-epoch", type=int, default=768)
    trn.add_argument("--lr", type=float, default=1e-3)
    trn.add_argument("--seed", type=int, default=0)
    trn.add_argument("--no-track", action="store_true", help="do not log the predictor to MLflow")
    trn.add_argument("--debug", **hidden)

    ev = prs.add_parser("evaluate", help="agreement of a predictor with the oracle labels of held-out datasets")
    ev.add_argument("datasets", nargs="+", help="dataset files from `predictor collect`")
    ev.add_argument("--weights", default=None, help="predictor file (default: the shipped default predictor)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--debug", **hidden)

    bd = prs.add_parser("build", help="regenerate the shipped family: source model, corpus, 7 predictors")
    bd.add_argument("--data", required=True, help="folder for the corpus (resumes what it holds)")
    bd.add_argument("--corpus", default="image", choices=["image", "text"],
                    help="image: the CNN family (7 members); text: the BERT predictor smartfrz_text_w30_t1024.pt")
    bd.add_argument("--weights-dir", default=None, help="where to write the family (default: the package's)")
    bd.add_argument("--collect-only", action="store_true", help="collect the corpus, train nothing")
    bd.add_argument("--train-only", action="store_true", help="train on the corpus files present, collect nothing")
    bd.add_argument("--norm", default=None, help="skip the normalisation selection and use this one")
    bd.add_argument("--epochs", type=int, default=6, help="training epochs per predictor")
    bd.add_argument("--samples-per-epoch", type=int, default=768, help="training samples drawn per epoch")
    bd.add_argument("--debug", **hidden)
    pr.set_defaults(handler=cmd_predictor)


def cmd_predictor(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # bad datasets, paths or sizes: the user's to fix
        raise FreezebenchError(str(e)) from e


def _log_step(name: str, tags: dict, params: dict, metrics: dict, path: Any, folder: str) -> None:
    """One MLflow run (experiment ``freezebench-predictor``) holding a pipeline step's file and figures."""
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


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _run(args: argparse.Namespace) -> int:
    from freezebench.cli import _split_overrides

    cmd = args.predictor_command
    if cmd == "collect":
        from .collect import collect

        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise FreezebenchError(f"--seeds {args.seeds!r}: give two comma-separated integers, e.g. 0,1") from None
        if len(seeds) != 2:
            raise FreezebenchError(f"--seeds {args.seeds!r}: give exactly two seeds")
        rule = {k: getattr(args, k) for k in ("window_epochs", "var_threshold", "cutoff") if getattr(args, k) is not None}
        path = collect(_split_overrides(args.overrides), out=args.out, seeds=seeds, tailor_size=args.tailor_size,
                       record_every=args.record_every, checks_per_epoch=args.checks_per_epoch,
                       tailor_seed=args.tailor_seed, run_id=args.run_id, **rule)
        print(f"dataset written: {path}")
        if not args.no_track:
            from .collect import load_dataset

            runs = load_dataset(path)["runs"]
            labels = [v for r in runs for h in r["labels"] for v in h]
            _log_step(f"collect-{args.run_id or runs[0]['model']}",
                      {"kind": "predictor-collect", "model": runs[0]["model"], "dataset": runs[0]["dataset"]},
                      {"model": runs[0]["model"], "dataset": runs[0]["dataset"], "seeds": args.seeds,
                       "tailor_size": args.tailor_size, "checks_per_epoch": args.checks_per_epoch,
                       **{f"rule.{k}": v for k, v in runs[0]["label_rule"].items()}},
                      {"checks_labelled": float(len(labels)),
                       "freeze_frac": float(sum(labels) / len(labels)) if labels else float("nan")}, path, "dataset")
        return 0
    if cmd == "train":
        from .train import train_predictor

        m = train_predictor(train=args.datasets, val=args.val, out=args.out, window=args.window,
                            tailor_size=args.tailor_size, norm=args.norm, epochs=args.epochs,
                            samples_per_epoch=args.samples_per_epoch, lr=args.lr, seed=args.seed)
        print("validation: " + "  ".join(f"{k} {_fmt(v)}" for k, v in m.items()))
        print(f"predictor written: {args.out}")
        if not args.no_track:
            _log_step("predictor-train", {"kind": "predictor-train"},
                      {"train": ",".join(args.datasets), "val": ",".join(args.val), "window": args.window,
                       "tailor_size": args.tailor_size, "norm": args.norm, "epochs": args.epochs, "lr": args.lr,
                       "seed": args.seed},
                      {f"val/{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))}, args.out, "predictor")
        return 0
    if cmd == "evaluate":
        from .train import evaluate_predictor
        from .weights import DEFAULT_WEIGHTS

        weights = args.weights or DEFAULT_WEIGHTS
        m = evaluate_predictor(weights, args.datasets)
        m["weights"] = str(weights)
        if args.json:
            print(json.dumps(_plain(m), sort_keys=True))
            return 0
        print(f"predictor {weights} (window {m['window']}, tailor {m['tailor_size']}, threshold {m['threshold']:.4f})")
        cols = ("auc", "accuracy", "precision", "recall", "f1", "n", "freeze_frac")
        print("run".ljust(28) + "".join(c.rjust(12) for c in cols) + "  median freeze delta (epochs)")
        for rid, r in {**m.get("runs", {}), "ALL": m}.items():
            t = r["timing"]["median_delta_epochs"]
            print(rid.ljust(28) + "".join(_fmt(r[c]).rjust(12) for c in cols) + f"  {'-' if t is None else f'{t:+.2f}'}")
        return 0
    if cmd == "build":
        from .build import collect_corpus, corpus_paths, split_ids
        from .train import train_family
        from .weights import family_of, family_file

        if args.collect_only and args.train_only:
            raise FreezebenchError("--collect-only and --train-only exclude each other")
        if not args.train_only:
            collect_corpus(args.data, corpus=args.corpus, log=lambda s: print(s, flush=True))
        if args.collect_only:
            return 0
        c = args.corpus
        train, val = corpus_paths(args.data, "train", c), corpus_paths(args.data, "val", c)
        if not train or not val:
            raise FreezebenchError(f"{args.data}: the corpus lacks training or validation runs "
                                   f"(train {split_ids('train', c)}, val {split_ids('val', c)})")
        # text: the image family's normalisation (first_delta) unless --norm says otherwise
        norm = args.norm or ("first_delta" if c == "text" else None)
        members = family_of(c)
        report = train_family(train, val, folder=args.weights_dir, norm=norm, epochs=args.epochs,
                              members=members, paths=[family_file(w, t, args.weights_dir, c) for w, t in members],
                              samples_per_epoch=args.samples_per_epoch, log=lambda s: print(s, flush=True))
        report["corpus"] = {split: [p.stem for p in corpus_paths(args.data, split, c)] for split in ("train", "val", "test")}
        print(json.dumps(_plain(report), sort_keys=True))
        return 0
    raise FreezebenchError(f"unknown predictor step {cmd!r}")  # pragma: no cover (argparse requires one)
