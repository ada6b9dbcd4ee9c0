"""Paper suites: the SmartFRZ paper's tables as sweeps, each ending with its compare report.

    freezebench suite --list
    freezebench suite table2_digits                      # scaled-down Table 2 on the digits: minutes on a CPU
    freezebench suite table2 --storage postgresql://u:p@db/optuna --workers 2   # the paper's setting (GPU, CIFAR)
    freezebench suite table2_digits --report             # the report of the runs so far; train nothing

A suite is a file in ``configs/suites/`` (or any path): a sweep space (:mod:`freezebench.sweeps.space`:
``name``, ``description``, ``overrides``, ``params``, ``sampler``, ``objective``, ``seeds``) plus

    report:     {title: ..., policies: [full, ...],      # the report's title and row order,
                 vary: [policy.t0]}                       # params that split a policy's rows (knob sweeps)
    paper: |                                              # what the paper ran (the scaled variants say what
      ...                                                 # they shrink), shown by --list --verbose
    reference:                                            # Table 1 only: the CKA oracle needs a trained model
      policy: cka_oracle                                  # grid points of this policy ...
      key: policy.reference                               # ... get key=runs:/<id> of a reference run:
      seed: 100                                           # policy full, this seed, same model and dataset
      overrides: []                                       # extra overrides of the reference runs
      policy_overrides: [policy.checks_per_epoch=1]       # extra overrides of that policy's runs

It runs through :func:`freezebench.sweeps.run_sweep` (so an interrupted suite resumes where it stopped, and
more workers on the same ``--storage`` share the trials), every trial tagged ``suite=<name>``; then
:func:`freezebench.analysis.report.compare` builds the report of the runs tagged with the suite, logs it as the MLflow
run ``report-<name>`` and writes ``outputs/report-<name>/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezebench.config import REPO_CONFIGS
from freezebench.errors import FreezebenchError, did_you_mean

from .space import SPACE_KEYS, Space, SweepError, parse_space

SUITES_DIR = REPO_CONFIGS / "suites"
SUITE_KEYS = ("report", "paper", "reference", "paper_tflops", "source")
REFERENCE_KEYS = ("policy", "key", "seed", "overrides", "policy_overrides")
SOURCE_KEYS = ("overrides", "seed")


@dataclass
class Suite:
    name: str
    space: Space
    report: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    reference: dict[str, Any] | None = None
    source_file: str = ""
    paper_tflops: dict[str, float] | None = None  # model -> the paper's full-training TFLOPs (--plan)
    source: dict[str, Any] | None = None  # a source model trained once, every run fine-tunes from it

    @property
    def policies(self) -> list[str]:
        """The policies the grid compares (``policy`` param, else the base override)."""
        for p in self.space.params:
            if p.key in ("policy", "policy.name"):
                return [str(v) for v in p.grid_values()]
        for o in self.space.overrides:
            k, _, v = o.partition("=")
            if k.strip() in ("policy", "policy.name"):
                return [v.strip()]
        return ["full"]


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (``configs/suites/<name>.yaml``) or path; :class:`SweepError` on bad input."""
    import yaml

    p = Path(name_or_path)
    path = p if p.suffix in (".yaml", ".yml") else SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = available_suites()
        raise SweepError(f"unknown suite {name_or_path!r}.{did_you_mean(name_or_path, known)} "
                         f"Suites: {', '.join(known) or '(none)'}; or give the path of a YAML file")
    try:
        from freezebench.fileio import read_text_file

        data = yaml.safe_load(read_text_file(path, what="suite file", error=SweepError))
    except yaml.YAMLError as e:
        raise SweepError(f"suite file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SweepError(f"suite file {path}: must be a mapping (a sweep space plus report/paper/reference)")
    unknown = [k for k in data if k not in SPACE_KEYS + SUITE_KEYS]
    if unknown:
        allowed = SPACE_KEYS + SUITE_KEYS
        raise SweepError(f"suite {path}: unknown key {unknown[0]!r}.{did_you_mean(str(unknown[0]), allowed)} "
                         f"Allowed: {', '.join(allowed)}")
    extra = {k: data.pop(k) for k in SUITE_KEYS if k in data}
    space = parse_space(data, path.stem, str(path))
    report = extra.get("report") or {}
    if not isinstance(report, dict) or any(k not in ("title", "policies", "vary") for k in report):
        raise SweepError(f"suite {space.name!r}: report takes title, policies and vary, got {report!r}")
    ref = extra.get("reference")
    if ref is not None:
        if not isinstance(ref, dict) or any(k not in REFERENCE_KEYS for k in ref) or "policy" not in ref:
            raise SweepError(f"suite {space.name!r}: reference needs policy (and optionally key, seed, overrides: "
                             f"{', '.join(REFERENCE_KEYS)}), got {ref!r}")
        ref = {"key": "policy.reference", "seed": 100, "overrides": [], "policy_overrides": [], **ref}
    paper_tflops = extra.get("paper_tflops")
    if paper_tflops is not None and (not isinstance(paper_tflops, dict)
                                     or not all(isinstance(v, (int, float)) for v in paper_tflops.values())):
        raise SweepError(f"suite {space.name!r}: paper_tflops maps model names to TFLOPs, got {paper_tflops!r}")
    source = extra.get("source")
    if source is not None:
        if not isinstance(source, dict) or any(k not in SOURCE_KEYS for k in source):
            raise SweepError(f"suite {space.name!r}: source takes {', '.join(SOURCE_KEYS)}, got {source!r}")
        source = {"overrides": [], "seed": 1000, **source}
    return Suite(name=space.name, space=space, report=report, paper=str(extra.get("paper") or "").strip(),
                 reference=ref, source_file=str(path), paper_tflops=paper_tflops, source=source)


def _setting(overrides: list[str], key: str, default: str | None) -> str | None:
    value = default
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == key:
            value = v.strip()
    return value


def _grid_values(space: Space, key: str) -> list[Any] | None:
    for p in space.params:
        if p.key == key:
            return list(p.grid_values())
    return None


def _space(name: str, overrides: list[str], params: dict[str, list[Any]], seeds: list[int], base: Space) -> Space:
    return parse_space({"name": name, "description": base.description, "overrides": overrides, "params": params,
                        "sampler": "grid", "objective": base.objective, "seeds": seeds}, name, base.source)


def stages(suite: Suite, overrides: list[str], seeds: list[int] | None) -> list[tuple[str, Space]]:
    """The sweeps a suite runs, in order: (study name, space). One for a plain suite; with a ``reference``:
    the reference runs, the other policies, then the referenced policy once per (model, dataset)."""
    tag = f"tracking.tags.suite={suite.name}"
    space = suite.space.with_(overrides=[*overrides, tag], seeds=seeds)
    ref = suite.reference
    if ref is None:
        return [(suite.name, space)]
    params = {p.key: list(p.grid_values()) for p in space.params if p.key not in ("policy", "policy.name")}
    others = [p for p in suite.policies if p != ref["policy"]]
    base = list(space.overrides)
    out: list[tuple[str, Space]] = []
    md = {k: params[k] for k in ("model.name", "data.name") if k in params}
    ref_over = [o for o in base if o != tag] + [f"tracking.tags.suite={suite.name}/reference", *ref["overrides"]]
    out.append((f"{suite.name}-reference", _space(f"{suite.name}-reference", ref_over, {"policy": ["full"], **md},
                                                  [int(ref["seed"])], space)))
    if others:
        out.append((suite.name, _space(suite.name, base, {"policy": others, **params}, list(space.seeds), space)))
    return out


def _reference_runs(suite: Suite, uri: str, experiment: str) -> dict[tuple[str, str], str]:
    """(model, dataset) -> id of the newest finished reference run of the suite."""
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.suite = '{suite.name}/reference' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    return {(r.data.tags["model"], r.data.tags["dataset"]): r.info.run_id for r in runs}


def _source_run(suite: Suite, uri: str, experiment: str) -> tuple[str | None, str | None]:
    """(id of the newest finished source run, status of the newest source run) of the suite."""
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None, None
    runs = client.search_runs([exp.experiment_id], f"tags.suite = '{suite.name}/source'",
                              order_by=["attributes.start_time DESC"])
    done = [r for r in runs if r.info.status == "FINISHED"]
    return (done[0].info.run_id if done else None), (runs[0].info.status if runs else None)


def source_overrides(suite: Suite, overrides: list[str], *, storage: str | None, train: bool = True,
                     echo: Any = print, wait_s: float = 7200.0, **sweep_kw: Any) -> list[str]:
    """The suite's ``source`` model: trained once (a one-trial sweep, so several workers share it: the
    others wait for it), its final weights fetched from MLflow to ``outputs/suite-<name>/source-<run>/final.pt``;
    returns ``[model.checkpoint=<that file>]`` for every run of the suite (the transfer setting of the
    paper's Table 2: every policy fine-tunes the same source model). No ``source``: ``[]``."""
    import time

    import mlflow

    from freezebench.trainer.tracking import resolve_uri

    from .runner import run_sweep

    if suite.source is None:
        return []
    all_over = list(suite.space.overrides) + list(overrides)
    experiment = _setting(all_over, "tracking.experiment", "freezebench")
    uri = resolve_uri(_setting(all_over, "tracking.uri", None))
    models = _grid_values(suite.space, "model.name") or [_setting(all_over, "model.name", "resnet20")]
    if len(models) != 1:
        raise FreezebenchError(f"suite {suite.name}: a source model needs a single model.name, got {models}")
    study = f"{suite.name}-source"
    over = [*all_over, "policy=full", *suite.source["overrides"], f"model.name={models[0]}",
            f"tracking.tags.suite={suite.name}/source", "trainer.save_checkpoint=true",
            "tracking.log_checkpoint=true"]
    run_id, status = _source_run(suite, uri, experiment)
    if run_id is None and train:
        space = parse_space({"name": study, "description": f"source model of {suite.name}", "overrides": over,
                             "params": {"policy": ["full"]}, "sampler": "grid", "objective": "accuracy",
                             "seeds": [int(suite.source["seed"])]}, study, suite.source_file)
        (echo or (lambda *a, **k: None))(f"suite {suite.name}: source model ({study}, 1 run)")
        run_sweep(space, storage=storage, study=study, echo=echo, **sweep_kw)
        deadline = time.monotonic() + wait_s  # another worker may be training it: wait for its run
        while (run_id := _source_run(suite, uri, experiment)[0]) is None:
            status = _source_run(suite, uri, experiment)[1]
            if status == "FAILED" or time.monotonic() > deadline:
                raise FreezebenchError(f"suite {suite.name}: the source model run did not finish (status {status}); "
                                       f"see study {study}, or rerun with --retry-failed")
            time.sleep(5)
    if run_id is None:
        raise FreezebenchError(f"suite {suite.name}: no finished source model run yet (tag suite={suite.name}/source)")
    dst = Path("outputs") / f"suite-{suite.name}" / f"source-{run_id}"
    path = dst / "final.pt"
    if not path.is_file():
        dst.mkdir(parents=True, exist_ok=True)
        got = mlflow.tracking.MlflowClient(uri).download_artifacts(run_id, "checkpoints/final.pt", str(dst))
        if Path(got) != path:
            Path(got).replace(path)
    return [f"model.checkpoint={path}"]


def _check_local_inputs(suite: Suite, overrides: list[str], seeds: list[int] | None) -> None:
    """Before anything trains: one line naming the local files a grid point lacks (GLUE data, a model)."""
    from freezebench.config import load_config

    space = suite.space.with_(overrides=list(overrides), seeds=seeds)
    seen = set()
    for point in space.grid():
        plain = {k: v for k, v in point.items() if k != "policy" and not k.startswith("policy.")}
        over = [o for o in space.trial_overrides(plain) if not o.split("=", 1)[0].strip().startswith("policy")]
        cfg = load_config([*over, "policy=full"])
        key = (cfg.data.name, cfg.data.task, cfg.data.root, cfg.model.hf_path)
        if cfg.data.name == "glue" and key not in seen:
            seen.add(key)
            from freezebench.zoo.text_data import check_local_inputs

            check_local_inputs(cfg, f"suite {suite.name}")


def run_suite(name: str, overrides: list[str] | None = None, seeds: list[int] | None = None, storage: str | None = None,
              out: str | None = None, run: bool = True, echo: Any = print, **sweep_kw: Any) -> tuple[Any, Path, str | None]:
    """Run the suite's sweeps (unless ``run`` is false), then build, write and log its report."""
    from freezebench.analysis.report import compare
    from freezebench.trainer.tracking import resolve_uri

    from .runner import run_sweep

    say = echo or (lambda *a, **k: None)
    suite = load_suite(name)
    overrides = list(overrides or [])
    all_over = list(suite.space.overrides) + overrides
    experiment = _setting(all_over, "tracking.experiment", "freezebench")
    uri = resolve_uri(_setting(all_over, "tracking.uri", None))
    if run:
        _check_local_inputs(suite, overrides, seeds)
        overrides = overrides + source_overrides(suite, overrides, storage=storage, echo=echo, **sweep_kw)
        for study, space in stages(suite, overrides, seeds):
            say(f"suite {suite.name}: sweep {study} ({len(space.grid()) * len(space.seeds)} trials)")
            run_sweep(space, seeds=None, storage=storage, study=study, echo=echo, **sweep_kw)
        if suite.reference is not None:
            refs = _reference_runs(suite, uri, experiment)
            ref = suite.reference
            space = suite.space.with_(overrides=[*overrides, f"tracking.tags.suite={suite.name}"], seeds=seeds)
            params = {p.key: list(p.grid_values()) for p in space.params
                      if p.key not in ("policy", "policy.name", "model.name", "data.name")}
            models = _grid_values(space, "model.name") or [_setting(all_over, "model.name", None)]
            datasets = _grid_values(space, "data.name") or [_setting(all_over, "data.name", None)]
            for model in models:
                for dataset in datasets:
                    key = (str(model or "resnet20"), str(dataset or "digits"))
                    if key not in refs:
                        raise FreezebenchError(f"suite {suite.name}: no finished reference run for {key[0]} on "
                                               f"{key[1]} (tag suite={suite.name}/reference in {experiment})")
                    over = list(space.overrides) + [f"model.name={key[0]}", f"data.name={key[1]}"]
                    # the policy's own keys go in as one-value params: the sweep's base config (overrides
                    # alone) has the default policy, which does not know them
                    own = {ref["key"]: [f"runs:/{refs[key]}"]}
                    own.update({k.strip(): [v.strip()] for k, _, v in (o.partition("=") for o in ref["policy_overrides"])})
                    study = f"{suite.name}-{ref['policy']}-{key[0]}-{key[1]}"
                    sp = _space(study, over, {"policy": [ref["policy"]], **own, **params}, list(space.seeds), space)
                    say(f"suite {suite.name}: sweep {study} ({len(sp.grid()) * len(sp.seeds)} trials)")
                    run_sweep(sp, storage=storage, study=study, echo=echo, **sweep_kw)
    report, folder, run_id = compare(experiment, f"tags.suite = '{suite.name}'", uri, out=out, name=suite.name,
                                     order=suite.report.get("policies"), title=suite.report.get("title"),
                                     tags={"suite": suite.name}, progress=True, vary=suite.report.get("vary") or ())
    return report, folder, run_id


# --- command line -----------------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    """``freezebench suite`` (entry point in group ``freezebench.commands``)."""
    p = subparsers.add_parser("suite", help="run one of the paper's tables (configs/suites/) and report it",
                              description="Run a paper suite through the sweep machinery (resumable; more workers "
                                          "with the same --storage share it), then write and log its report.")
    p.add_argument("name", nargs="?", help="a suite in configs/suites/ (freezebench suite --list) or a YAML file")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")
    p.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    p.add_argument("--storage", help="Optuna storage (default sqlite:///optuna.db); postgresql://... for machines")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine sharing the suite (default 1)")
    p.add_argument("--out", "-o", default=None, help="report folder (default: outputs/report-<name>)")
    p.add_argument("--format", default="table", choices=("table", "md", "csv", "html"), help="printed table format")
    p.add_argument("--report", action="store_true", help="report the suite's runs so far; train nothing")
    p.add_argument("--plan", action="store_true", help="print runs and full-training TFLOPs per (model, dataset) "
                   "against the paper's; train nothing, read no dataset files")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # extra local workers
    p.add_argument("--list", action="store_true", help="list the suites")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_suite)


def cmd_suite(args: argparse.Namespace) -> int:
    from freezebench.config import split_overrides
    from freezebench.analysis.report import render

    from .cli import _seeds

    if args.list:
        for name in available_suites():
            s = load_suite(name)
            n = len(s.space.grid()) * len(s.space.seeds) + (1 if s.reference else 0) + (1 if s.source else 0)
            print(f"{name:<16} ~{n:>4} runs  {s.space.description}")
        return 0
    if not args.name:
        raise FreezebenchError("give a suite: freezebench suite NAME [key=value ...] (freezebench suite --list)")
    if args.workers < 1:
        raise FreezebenchError("--workers must be at least 1")
    overrides = split_overrides(args.overrides)
    seeds = _seeds(args.seeds)
    if args.plan:
        from .plan import plan_suite, render_plan

        print(render_plan(plan_suite(load_suite(args.name), overrides, seeds), args.format), end="")
        return 0
    if args.no_report:  # a helper worker started by --workers: run the sweeps, leave the report to the first
        suite = load_suite(args.name)
        from .runner import run_sweep

        overrides = overrides + source_overrides(suite, overrides, storage=args.storage, echo=None, plots=False)
        for study, space in stages(suite, overrides, seeds):
            run_sweep(space, storage=args.storage, study=study, echo=None, plots=False)
        return 0
    helpers = []
    if args.workers > 1 and not args.report:
        cmd = [sys.executable, "-m", "freezebench", "suite", args.name, *overrides, "--no-report"]
        cmd += ["--seeds", args.seeds] if args.seeds else []
        cmd += ["--storage", args.storage] if args.storage else []
        env = {**os.environ, "FREEZEBENCH_WORKER": "1"}
        helpers = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL) for _ in range(args.workers - 1)]
    try:
        report, folder, run_id = run_suite(args.name, overrides, seeds, args.storage, out=args.out,
                                           run=not args.report)
    finally:
        for h in helpers:
            h.wait()
    print(render(report, args.format), end="")
    print(f"\nsuite {args.name}: report of {len(report.runs)} runs in {folder}/; MLflow run {run_id} (report-{args.name})")
    return 0
