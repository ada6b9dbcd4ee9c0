"""The sweep's summary table (like SmartFRZ Tables 4/5: accuracy mean +- std over seeds per value, with
TFLOPs and time) and Optuna's plots, logged to the parent MLflow run.

Rows come from the trials' user attributes (``val/acc``, ``cost/tflops``, ``time/total_s``, written by the
runner), so the table needs only the Optuna storage; MLflow holds the same figures in the child runs.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import warnings
from typing import Any

from freezebench import metrics as M

log = logging.getLogger(__name__)


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) >= 2 else None  # sample std over seeds


def summary_rows(study: Any, space: Any = None) -> list[dict[str, Any]]:
    """One row per point (grid: over its seeds) or per trial (tpe), in grid order / by accuracy.

    Each row: ``params`` (config key -> value), ``n`` (completed trials), ``failed``, ``acc_mean``,
    ``acc_std`` (sample std, None under 2 seeds), ``tflops_mean``, ``time_mean``, ``seeds``, ``trials``,
    ``mlflow_run_ids``, ``fail_reasons`` and, for the accuracy+tflops objective, ``pareto``.
    """
    from optuna.trial import TrialState

    groups: dict[str, dict[str, Any]] = {}
    order: dict[str, float] = {}
    keys = [p.key for p in space.params] if space is not None else None
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING):
            continue
        params = dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))
        if keys is not None:
            params = {k: params.get(k) for k in keys}
        lost = t.state == TrialState.FAIL and not t.user_attrs.get("raised")  # re-queued: counted in its copy
        if lost:
            continue
        gid = json.dumps(params, sort_keys=True, default=str)
        if "point_index" not in t.user_attrs:  # tpe: every trial its own row
            gid = f"{gid}#{t.number}"
        g = groups.setdefault(gid, {"params": params, "acc": [], "tflops": [], "time": [], "seeds": [],
                                    "trials": [], "mlflow_run_ids": [], "failed": 0, "fail_reasons": [],
                                    "pending": 0})
        order.setdefault(gid, t.user_attrs.get("point_index", t.number))
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            g["pending"] += 1
            continue
        g["trials"].append(t.number)
        if t.user_attrs.get("mlflow_run_id"):
            g["mlflow_run_ids"].append(t.user_attrs["mlflow_run_id"])
        if t.state == TrialState.FAIL:
            g["failed"] += 1
            g["fail_reasons"].append(f"trial {t.number} (seed {t.user_attrs.get('seed')}): "
                                     f"{t.user_attrs.get('fail_reason', 'failed')}")
            continue
        g["seeds"].append(t.user_attrs.get("seed"))
        g["acc"].append(float(t.user_attrs.get(M.VAL_ACC, t.values[0])))
        if M.COST_TFLOPS in t.user_attrs:
            g["tflops"].append(float(t.user_attrs[M.COST_TFLOPS]))
        if M.TIME_TOTAL_S in t.user_attrs:
            g["time"].append(float(t.user_attrs[M.TIME_TOTAL_S]))
    rows = []
    for gid, g in groups.items():
        rows.append({"params": g["params"], "n": len(g["acc"]), "failed": g["failed"], "pending": g["pending"],
                     "acc_mean": _mean(g["acc"]), "acc_std": _std(g["acc"]), "tflops_mean": _mean(g["tflops"]),
                     "time_mean": _mean(g["time"]), "seeds": g["seeds"], "trials": g["trials"],
                     "mlflow_run_ids": g["mlflow_run_ids"], "fail_reasons": g["fail_reasons"],
                     "_order": order[gid]})
    tpe = any("#" in gid for gid in groups)
    if tpe:
        rows.sort(key=lambda r: (-(r["acc_mean"] if r["acc_mean"] is not None else -1.0), r["_order"]))
    else:
        rows.sort(key=lambda r: r["_order"])
    if space is not None and space.objective == "accuracy+tflops":
        _mark_pareto(rows)
    for r in rows:
        del r["_order"]
    return rows


def _mark_pareto(rows: list[dict[str, Any]]) -> None:
    """``pareto``: no other row has accuracy >= and TFLOPs <= with one of them strict (on the means)."""
    ok = [r for r in rows if r["acc_mean"] is not None and r["tflops_mean"] is not None]
    for r in rows:
        r["pareto"] = r in ok and not any(
            o is not r and o["acc_mean"] >= r["acc_mean"] and o["tflops_mean"] <= r["tflops_mean"]
            and (o["acc_mean"] > r["acc_mean"] or o["tflops_mean"] < r["tflops_mean"]) for o in ok)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """A plain-text table: one column per swept key, then accuracy (%) mean +- std, n, TFLOPs, time."""
    keys = list(rows[0]["params"]) if rows else []
    pareto = any("pareto" in r for r in rows)
    head = keys + ["val acc (%)", "n", "TFLOPs", "time (s)", "failed"] + (["pareto"] if pareto else [])
    body = []
    for r in rows:
        acc = _fmt(None if r["acc_mean"] is None else 100 * r["acc_mean"], ".2f")
        if r["acc_std"] is not None:
            acc += f" ± {100 * r['acc_std']:.2f}"
        line = [str(r["params"][k]) for k in keys] + [acc, str(r["n"]), _fmt(r["tflops_mean"], ".4g"),
                                                       _fmt(r["time_mean"], ".1f"), str(r["failed"])]
        if pareto:
            line.append("*" if r.get("pareto") else "")
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    reasons = [x for r in rows for x in r["fail_reasons"]]
    if reasons:
        out.append(f"failed trials ({len(reasons)}):")
        out += [f"  {x}" for x in reasons[:20]] + ([f"  ... and {len(reasons) - 20} more"] if len(reasons) > 20 else [])
    pending = sum(r["pending"] for r in rows)
    if pending:
        out.append(f"{pending} trial(s) still waiting or running")
    return "\n".join(out).rstrip()


def plot_figures(study: Any) -> dict[str, Any]:
    """Optuna's matplotlib plots of the study (the ones that apply): name -> figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ov
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return {}
    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    makers = {"slice": lambda: ov.plot_slice(study, target=target, target_name=M.VAL_ACC)}
    if multi:
        makers["pareto_front"] = lambda: ov.plot_pareto_front(study, target_names=[M.VAL_ACC, "TFLOPs"])
    else:
        makers["optimization_history"] = lambda: ov.plot_optimization_history(study, target_name=M.VAL_ACC)
    if len(complete[0].params) >= 2:
        makers["param_importances"] = lambda: ov.plot_param_importances(study, target=target, target_name=M.VAL_ACC)
    figs = {}
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            first = ax.flat[0] if hasattr(ax, "flat") else ax
            figs[name] = first.figure
        except Exception as e:  # a plot that does not apply to this study (e.g. one distinct value)
            log.info("no %s plot: %s", name, e)
            plt.close("all")
    return figs


def finish_report(study: Any, parent: str | None, *, space: Any = None, plots: bool = True,
                  final: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Build the table; log it (text + JSON) and the plots to the parent run; close the parent when final."""
    rows = summary_rows(study, space)
    title = f"sweep {study.study_name}" + (f": {space.description}" if space is not None and space.description else "")
    text = format_table(rows, title)
    if parent is None:
        return rows, text
    from mlflow.tracking import MlflowClient

    from freezebench.trainer.tracking import resolve_uri

    try:
        from freezebench.config import load_config

        uri = resolve_uri(load_config(list(space.overrides) if space is not None else []).tracking.uri)
        client = MlflowClient(uri)
        client.log_text(parent, text + "\n", "sweep/table.txt")
        client.log_text(parent, json.dumps(rows, indent=2, default=str), "sweep/table.json")
        if plots:
            import matplotlib.pyplot as plt

            for name, fig in plot_figures(study).items():
                client.log_figure(parent, fig, f"sweep/plots/{name}.png")
                plt.close(fig)
        if final and client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, "FINISHED")
    except Exception as e:  # the table is printed anyway
        log.warning("could not log the sweep table to MLflow run %s: %s", parent, e)
    return rows, text
