"""Compare freezing policies from their MLflow runs: the SmartFRZ paper's tables and figures, from your runs.

    freezebench compare                                        # every finished run of experiment freezebench
    freezebench compare --filter "tags.suite = 'table2_digits'" --format md
    freezebench compare --experiment my-exp --out reports/mine --no-log

Training runs (those with ``policy``/``model``/``dataset`` tags and a ``val/acc`` metric) are grouped by
(model, dataset) and policy; each group gives the mean and the sample standard deviation over its seeds of
the final accuracy, wall time, training TFLOPs, peak memory and policy overhead, and the savings against
the ``full`` policy of the same (model, dataset), the layout of Table 2 of the SmartFRZ paper (Li et al.,
"SmartFRZ: An Efficient Training Framework using Attention-Based Layer Freezing", ICLR 2023). Figures:
accuracy against TFLOPs with the Pareto front, freeze timelines side by side (the paper's Figure 5b),
memory over training (Figure 5a) and the epoch at which each unit froze under each policy (a heat map).

The report is written to a folder (table in text, Markdown, CSV and HTML, ``report.json``, the figures and
an ``index.html``) and logged as an MLflow run named ``report-<name>`` tagged ``kind=report`` in the same
experiment, its description holding the table. This module reads MLflow only; it trains nothing.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FreezebenchError
from .. import metrics as M

# final metrics every training run logs (freezebench.trainer), the same keys for every policy
KEYS = {
    "acc": M.VAL_ACC,
    "time_s": M.TIME_TOTAL_S,
    "tflops": M.COST_TFLOPS,
    "tflops_full": M.COST_TFLOPS_FULL,
    "saving_frac": M.COST_SAVING_FRAC,
    "peak_mb": M.PEAK_MB,
    "policy_s": M.TIME_POLICY_TOTAL_S,
    "frozen_units": M.FROZEN_UNITS,
}
FORMATS = ("table", "md", "csv", "html")
BASELINE = "full"


@dataclass
class RunRecord:
    """One finished training run, as read back from MLflow."""

    run_id: str
    name: str
    policy: str
    model: str
    dataset: str
    seed: int
    metrics: dict[str, float]  # final values of KEYS (by metric key)
    epochs: float = 0.0
    suite: str | None = None
    memory: list[tuple[int, float]] = field(default_factory=list)  # (epoch, mem/peak_mb)
    events: list[dict[str, Any]] = field(default_factory=list)  # freeze_events.csv rows
    unit_names: list[str] = field(default_factory=list)

    def value(self, column: str) -> float:
        return float(self.metrics.get(KEYS[column], math.nan))


@dataclass
class Stat:
    """Mean and sample standard deviation (``None`` with one value) over seeds."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        vals = [float(v) for v in values if not math.isnan(float(v))]
        if not vals:
            return cls(math.nan, None, 0)
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


@dataclass
class Row:
    """One (model, dataset, policy) group: a row of the table."""

    model: str
    dataset: str
    policy: str
    seeds: list[int]
    run_ids: list[str]
    acc: Stat
    time_s: Stat
    tflops: Stat
    peak_mb: Stat
    policy_s: Stat
    overhead_frac: Stat  # policy time / total time, per run
    frozen_units: Stat
    time_saving: float | None  # 1 - mean time / mean time of `full` (None without full runs)
    flops_saving: float | None  # 1 - mean TFLOPs / mean TFLOPs of `full` (else of the cost model's full cost)


@dataclass
class Report:
    rows: list[Row]
    runs: list[RunRecord]
    title: str = "freezebench report"
    source: dict[str, Any] = field(default_factory=dict)  # experiment, filter, tracking URI

    def groups(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for r in self.rows:
            seen.setdefault((r.model, r.dataset), None)
        return list(seen)

    def runs_of(self, model: str, dataset: str, policy: str) -> list[RunRecord]:
        return sorted((r for r in self.runs if (r.model, r.dataset, r.policy) == (model, dataset, policy)),
                      key=lambda r: r.seed)


# --- reading MLflow ---------------------------------------------------------------------------------------

def _client(uri: str | None) -> Any:
    import mlflow

    from ..trainer.tracking import resolve_uri

    uri = resolve_uri(uri)
    return mlflow.tracking.MlflowClient(uri), uri


def load_runs(experiment: str = "freezebench", filter: str | None = None, uri: str | None = None,
              details: bool = True, progress: bool = False, vary: Sequence[str] = ()) -> list[RunRecord]:
    """The finished training runs of ``experiment`` matching the MLflow search ``filter``.

    ``details`` also reads each run's memory history, freeze events and unit names (for the figures).
    ``vary``: config keys (params) that split a policy's rows, e.g. ``policy.t0`` gives rows
    ``freezeout_linear t0=0.3``, ... (the paper's Tables 8 and 9).
    """
    import os

    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download otherwise

    client, uri = _client(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as e:
        raise FreezebenchError(f"cannot read the MLflow store at {uri}: {str(e).splitlines()[0]}") from None
    if exp is None:
        known = [e.name for e in client.search_experiments()]
        from ..errors import did_you_mean

        raise FreezebenchError(f"no MLflow experiment {experiment!r} at {uri}.{did_you_mean(experiment, known)} "
                               f"Experiments: {', '.join(known) or '(none)'}")
    found, token = [], None
    while True:
        try:
            page = client.search_runs([exp.experiment_id], filter_string=filter or "", max_results=1000,
                                      page_token=token)
        except MlflowException as e:
            raise FreezebenchError(f"bad --filter {filter!r}: {str(e).splitlines()[0]} (MLflow search syntax, "
                                   "e.g. \"tags.suite = 'table2_digits' and params.trainer.epochs = '3'\")") from None
        found.extend(page)
        token = page.token
        if not token:
            break
    runs = []
    from tqdm.auto import tqdm

    for run in tqdm(found, desc="reading runs", disable=not progress, leave=False):
        tags, metrics = run.data.tags, run.data.metrics
        if run.info.status != "FINISHED" or tags.get("kind") == "report":
            continue
        if not {"policy", "model", "dataset"} <= set(tags) or KEYS["acc"] not in metrics:
            continue
        label = " ".join([tags["policy"], *(f"{k.rsplit('.', 1)[-1]}={run.data.params[k]}" for k in vary
                                            if k in run.data.params)])
        rec = RunRecord(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, policy=label,
            model=tags["model"], dataset=tags["dataset"], seed=int(tags.get("seed", 0)),
            metrics={k: float(metrics[k]) for k in KEYS.values() if k in metrics},
            epochs=float(run.data.params.get("trainer.epochs", 0) or 0), suite=tags.get("suite"),
        )
        if details:
            _read_details(client, rec, int(run.data.params.get("units.count", 0) or 0))
        runs.append(rec)
    return runs


def _read_details(client: Any, rec: RunRecord, num_units: int) -> None:
    rec.memory = sorted((m.step, m.value) for m in client.get_metric_history(rec.run_id, KEYS["peak_mb"]))
    with tempfile.TemporaryDirectory() as tmp:
        events = _download(client, rec.run_id, "freeze_events.csv", tmp)
        if events is not None:
            rec.events = [{"unit": int(r["unit"]), "name": r["name"], "step": int(r["step"]),
                           "epoch": float(r["epoch"]), "action": r["action"]}
                          for r in csv.DictReader(io.StringIO(events.read_text()))]
        summary = _download(client, rec.run_id, "summary.json", tmp)
        if summary is not None:
            data = json.loads(summary.read_text())
            rec.unit_names = list(data.get("unit_names") or [])
            num_units = num_units or int(data.get("num_units", 0))
    if not rec.unit_names:  # runs logged before summary.json carried the names: index, or the event's name
        named = {e["unit"]: e["name"] for e in rec.events}
        n = max([num_units, *(u + 1 for u in named)])
        rec.unit_names = [named.get(i, f"unit {i}") for i in range(n)]


def _download(client: Any, run_id: str, path: str, dst: str) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, dst))
    except Exception:  # a run without this artifact (failed before the end, other tools' runs)
        return None


# --- the table ------------------------------------------------------------------------------------------

def policy_order(policies: Iterable[str], order: Sequence[str] | None = None) -> list[str]:
    """``full`` first, then ``order``'s policies in its order, then the rest alphabetically."""
    pol = set(policies)
    first = [p for p in [BASELINE, *(order or [])] if p in pol]
    first = list(dict.fromkeys(first))
    return first + sorted(pol - set(first))


def build_report(runs: Sequence[RunRecord], order: Sequence[str] | None = None, title: str = "freezebench report",
                 source: dict[str, Any] | None = None) -> Report:
    """Group ``runs`` by (model, dataset, policy) and compute the table (pure: no MLflow)."""
    if not runs:
        raise FreezebenchError("no finished training runs to compare (check --experiment and --filter)")
    groups: dict[tuple[str, str], dict[str, list[RunRecord]]] = {}
    for r in runs:
        groups.setdefault((r.model, r.dataset), {}).setdefault(r.policy, []).append(r)
    rows = []
    for (model, dataset) in sorted(groups):
        by_policy = groups[(model, dataset)]
        base = by_policy.get(BASELINE)
        base_time = Stat.of([r.value("time_s") for r in base]).mean if base else None
        base_flops = Stat.of([r.value("tflops") for r in base]).mean if base else None
        for policy in policy_order(by_policy, order):
            rs = sorted(by_policy[policy], key=lambda r: r.seed)
            col = {c: [r.value(c) for r in rs] for c in KEYS}
            time_s, tflops = Stat.of(col["time_s"]), Stat.of(col["tflops"])
            ref_flops = base_flops if base_flops else Stat.of(col["tflops_full"]).mean
            rows.append(Row(
                model=model, dataset=dataset, policy=policy, seeds=[r.seed for r in rs],
                run_ids=[r.run_id for r in rs], acc=Stat.of(col["acc"]), time_s=time_s, tflops=tflops,
                peak_mb=Stat.of(col["peak_mb"]), policy_s=Stat.of(col["policy_s"]),
                overhead_frac=Stat.of([p / t for p, t in zip(col["policy_s"], col["time_s"]) if t > 0]),
                frozen_units=Stat.of(col["frozen_units"]),
                time_saving=1 - time_s.mean / base_time if base_time else None,
                flops_saving=1 - tflops.mean / ref_flops if ref_flops else None,
            ))
    return Report(rows=rows, runs=list(runs), title=title, source=dict(source or {}))


def _decimals(x: float, sig: int = 4) -> int:
    if not x or math.isnan(x) or math.isinf(x):
        return 2
    return max(0, min(8, sig - 1 - math.floor(math.log10(abs(x)))))


def fmt_stat(s: Stat, scale: float = 1.0, decimals: int | None = None) -> str:
    """``mean ± std`` with both at the mean's precision (4 significant digits unless ``decimals``)."""
    if s.n == 0:
        return "–"
    m = s.mean * scale
    if decimals is None and m and abs(m) < 1e-3:  # tiny runs: TFLOPs of the order of 1e-5
        return f"{m:.4g}" if s.std is None else f"{m:.4g} ± {s.std * scale:.2g}"
    d = _decimals(m) if decimals is None else decimals
    return f"{m:.{d}f}" if s.std is None else f"{m:.{d}f} ± {s.std * scale:.{d}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


HEADER = ["model", "dataset", "policy", "seeds", "accuracy (%)", "time (s)", "TFLOPs", "time saving",
          "FLOPs saving", "peak memory (MB)", "policy overhead (s)", "overhead (% of time)", "frozen units"]


def table_cells(report: Report) -> list[list[str]]:
    """The table as strings (the paper's Table 2 columns, plus memory and overhead)."""
    out = []
    for r in report.rows:
        out.append([r.model, r.dataset, r.policy, str(len(r.seeds)), fmt_stat(r.acc, 100, 2), fmt_stat(r.time_s),
                    fmt_stat(r.tflops), _pct(r.time_saving), _pct(r.flops_saving), fmt_stat(r.peak_mb, decimals=0),
                    fmt_stat(r.policy_s), fmt_stat(r.overhead_frac, 100, 2), fmt_stat(r.frozen_units, decimals=1)])
    return out


CSV_COLUMNS = ["model", "dataset", "policy", "n", "seeds", "acc_mean", "acc_std", "time_s_mean", "time_s_std",
               "tflops_mean", "tflops_std", "time_saving", "flops_saving", "peak_mb_mean", "peak_mb_std",
               "policy_s_mean", "policy_s_std", "overhead_frac_mean", "overhead_frac_std", "frozen_units_mean",
               "run_ids"]


def _csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    nz = lambda x: "" if x is None else repr(float(x))  # noqa: E731 - full precision, empty for none
    for r in report.rows:
        w.writerow([r.model, r.dataset, r.policy, len(r.seeds), " ".join(map(str, r.seeds)),
                    nz(r.acc.mean), nz(r.acc.std), nz(r.time_s.mean), nz(r.time_s.std), nz(r.tflops.mean),
                    nz(r.tflops.std), nz(r.time_saving), nz(r.flops_saving), nz(r.peak_mb.mean), nz(r.peak_mb.std),
                    nz(r.policy_s.mean), nz(r.policy_s.std), nz(r.overhead_frac.mean), nz(r.overhead_frac.std),
                    nz(r.frozen_units.mean), " ".join(r.run_ids)])
    return buf.getvalue()


def render(report: Report, fmt: str = "table") -> str:
    """The table as aligned text (``table``), Markdown (``md``), ``csv`` (full precision) or ``html``."""
    if fmt not in FORMATS:
        raise FreezebenchError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return _csv(report)
    cells = table_cells(report)
    if fmt == "md":
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(HEADER))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines) + "\n"
    if fmt == "html":
        head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in cells)
        return f'<table class="freezebench-report">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n'
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    line = lambda row: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *(line(c) for c in cells)]) + "\n"


# --- figures ----------------------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) that no other point beats: none has lower or equal cost and
    higher or equal accuracy with one of them strictly better. Sorted by cost."""
    idx = []
    for i, (c, a) in enumerate(points):
        if any((c2 <= c and a2 >= a and (c2 < c or a2 > a)) for j, (c2, a2) in enumerate(points) if j != i):
            continue
        idx.append(i)
    return sorted(idx, key=lambda i: (points[i][0], -points[i][1]))


def _grid(n: int, w: float, h: float) -> tuple[Any, list[Any]]:
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _colors(policies: Sequence[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {p: cmap(i % 10) for i, p in enumerate(policies)}


def plot_accuracy_vs_tflops(report: Report) -> Any:
    """Mean accuracy against mean TFLOPs per policy (error bars: std over seeds), the Pareto front dashed."""
    groups = report.groups()
    fig, axes = _grid(len(groups), 6.0, 4.2)
    colors = _colors(policy_order({r.policy for r in report.rows}))
    for ax, (model, dataset) in zip(axes, groups):
        rows = [r for r in report.rows if (r.model, r.dataset) == (model, dataset)]
        pts = [(r.tflops.mean, 100 * r.acc.mean) for r in rows]
        for r, (x, y) in zip(rows, pts):
            ax.errorbar(x, y, xerr=r.tflops.std or 0, yerr=100 * (r.acc.std or 0), fmt="o", color=colors[r.policy],
                        capsize=3, label=r.policy)
            ax.annotate(r.policy, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="#c0392b", lw=1.5,
                label="Pareto front", zorder=0)
        ax.set_xlabel("training TFLOPs")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{model} / {dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy vs training compute")
    fig.tight_layout()
    return fig


def plot_freeze_timelines(report: Report) -> Any:
    """Freeze timelines side by side (SmartFRZ Figure 5b): one panel per policy, its lowest seed."""
    import matplotlib.pyplot as plt

    from .plots import draw_freeze_timeline

    groups = report.groups()
    panels = [[r for r in report.rows if (r.model, r.dataset) == g] for g in groups]
    ncols = max(len(p) for p in panels)
    L = max((len(r.unit_names) for r in report.runs), default=1)
    fig, axes = plt.subplots(len(groups), ncols, figsize=(1.2 + 2.6 * ncols, len(groups) * max(2.5, 0.16 * L + 1.4)),
                             squeeze=False)
    for gi, ((model, dataset), rows) in enumerate(zip(groups, panels)):
        for j in range(ncols):
            ax = axes[gi][j]
            if j >= len(rows):
                ax.set_visible(False)
                continue
            run = report.runs_of(model, dataset, rows[j].policy)[0]
            draw_freeze_timeline(ax, run.unit_names, run.events, run.epochs or 1.0,
                                 title=f"{rows[j].policy}\n{model}/{dataset} s{run.seed}", legend=j == ncols - 1,
                                 labels=j == 0)
    fig.suptitle("freeze timelines")
    fig.tight_layout()
    return fig


def plot_memory(report: Report) -> Any:
    """Peak memory per epoch (SmartFRZ Figure 5a), mean over seeds per policy."""
    groups = report.groups()
    fig, axes = _grid(len(groups), 6.0, 3.8)
    colors = _colors(policy_order({r.policy for r in report.rows}))
    for ax, (model, dataset) in zip(axes, groups):
        for row in (r for r in report.rows if (r.model, r.dataset) == (model, dataset)):
            series: dict[int, list[float]] = {}
            for run in report.runs_of(model, dataset, row.policy):
                for step, v in run.memory:
                    series.setdefault(step, []).append(v)
            if series:
                xs = sorted(series)
                ax.plot(xs, [statistics.fmean(series[x]) for x in xs], "o-", color=colors[row.policy],
                        label=row.policy, ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("peak memory (MB)")
        ax.set_title(f"{model} / {dataset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("memory over training")
    fig.tight_layout()
    return fig


def freeze_epochs(runs: Sequence[RunRecord], num_units: int) -> list[float]:
    """Mean epoch at which each unit was first frozen, over the runs that froze it (NaN: never frozen)."""
    out = []
    for u in range(num_units):
        eps = [min(e["epoch"] for e in r.events if e["unit"] == u and e["action"] == "freeze")
               for r in runs if any(e["unit"] == u and e["action"] == "freeze" for e in r.events)]
        out.append(statistics.fmean(eps) if eps else math.nan)
    return out


def plot_freeze_epochs(report: Report) -> Any:
    """Heat map: policy x unit, the epoch at which the unit froze (blank: never frozen)."""
    import matplotlib.pyplot as plt
    import numpy as np

    groups = report.groups()
    L = max((len(r.unit_names) for r in report.runs), default=1)
    heights = [1.6 + 0.35 * sum(1 for r in report.rows if (r.model, r.dataset) == g) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 0.3 * L + 3), sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (model, dataset) in zip(axes[:, 0], groups):
        rows = [r for r in report.rows if (r.model, r.dataset) == (model, dataset)]
        runs0 = report.runs_of(model, dataset, rows[0].policy)
        names = max((r.unit_names for rw in rows for r in report.runs_of(model, dataset, rw.policy)), key=len)
        data = np.array([freeze_epochs(report.runs_of(model, dataset, r.policy), len(names)) for r in rows])
        epochs = max((r.epochs for r in runs0), default=1.0) or 1.0
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", vmin=0, vmax=epochs)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r.policy for r in rows], fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 30 else 7)
        ax.set_facecolor("white")
        if data.size <= 400:
            for (i, j), v in np.ndenumerate(data):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="white" if v < epochs / 2 else "black")
        ax.set_title(f"{model} / {dataset}: epoch each unit froze (blank: never)")
        fig.colorbar(im, ax=ax, label="epoch", fraction=0.03)
    fig.tight_layout()
    return fig


FIGURES = {
    "accuracy_vs_tflops.png": plot_accuracy_vs_tflops,
    "freeze_timelines.png": plot_freeze_timelines,
    "memory.png": plot_memory,
    "freeze_epochs.png": plot_freeze_epochs,
}


# --- writing and logging -----------------------------------------------------------------------------------

def write_report(report: Report, folder: str | Path) -> dict[str, Path]:
    """Write the table in every format, ``report.json``, the figures and an ``index.html`` into ``folder``."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for fmt, name in (("table", "table.txt"), ("md", "table.md"), ("csv", "table.csv"), ("html", "table.html")):
        files[name] = folder / name
        files[name].write_text(render(report, fmt))
    data = {"title": report.title, "source": report.source, "rows": [asdict(r) for r in report.rows],
            "runs": [{k: v for k, v in asdict(r).items() if k not in ("memory", "events", "unit_names")}
                     for r in report.runs]}
    files["report.json"] = folder / "report.json"
    files["report.json"].write_text(json.dumps(data, indent=2, default=_json_default))
    for name, plot in FIGURES.items():
        fig = plot(report)
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        files[name] = folder / name
    src = html.escape(", ".join(f"{k}: {v}" for k, v in report.source.items() if v))
    imgs = "".join(f'<h2>{html.escape(n[:-4].replace("_", " "))}</h2><img src="{n}" style="max-width:100%">\n'
                   for n in FIGURES)
    files["index.html"] = folder / "index.html"
    files["index.html"].write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(report.title)}</h1><p>{src}</p>{render(report, 'html')}{imgs}</body></html>\n")
    return files


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def log_report(report: Report, folder: str | Path, experiment: str, uri: str | None = None, name: str = "report",
               tags: dict[str, str] | None = None) -> str:
    """Log the report folder as an MLflow run ``report-<name>`` (tag ``kind=report``); return its id."""
    client, uri = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    note = (f"**{report.title}**: {len(report.runs)} runs, {len(report.rows)} (model, dataset, policy) groups, "
            f"mean ± std over seeds; savings against `{BASELINE}`.\n\n" + render(report, "md"))
    all_tags = {"kind": "report", "mlflow.note.content": note, **(tags or {})}
    run = client.create_run(exp_id, run_name=f"report-{name}", tags=all_tags)
    try:
        from mlflow.entities import Param

        params = {k: str(v) for k, v in report.source.items() if v} | {"runs": str(len(report.runs))}
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        client.log_artifacts(run.info.run_id, str(folder))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def compare(experiment: str = "freezebench", filter: str | None = None, uri: str | None = None,
            out: str | Path | None = None, name: str | None = None, log: bool = True, order: Sequence[str] | None = None,
            title: str | None = None, tags: dict[str, str] | None = None, progress: bool = False,
            vary: Sequence[str] = ()) -> tuple[Report, Path, str | None]:
    """Read the runs, build the report, write the folder and (``log``) log the ``report`` run."""
    from ..trainer.tracking import resolve_uri

    name = name or experiment
    runs = load_runs(experiment, filter, uri, details=True, progress=progress, vary=vary)
    if not runs:
        raise FreezebenchError(f"no finished training runs in experiment {experiment!r}"
                               + (f" matching {filter!r}" if filter else ""))
    report = build_report(runs, order=order, title=title or f"freezebench report: {name}",
                          source={"experiment": experiment, "filter": filter, "tracking_uri": resolve_uri(uri)})
    folder = Path(out) if out else Path("outputs") / f"report-{_safe(name)}"
    write_report(report, folder)
    run_id = log_report(report, folder, experiment, uri, name=name, tags=tags) if log else None
    return report, folder, run_id


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --- command line ---------------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    """``freezebench compare`` (entry point in group ``freezebench.commands``)."""
    p = subparsers.add_parser("compare", help="compare policies from MLflow runs: paper-style table and figures")
    p.add_argument("--experiment", "-e", default="freezebench", help="MLflow experiment (default: freezebench)")
    p.add_argument("--filter", "-f", default=None,
                   help="MLflow search filter, e.g. \"tags.suite = 'table2_digits'\" or \"tags.model = 'resnet20'\"")
    p.add_argument("--format", default="table", choices=FORMATS, help="how to print the table (all are written)")
    p.add_argument("--out", "-o", default=None, help="report folder (default: outputs/report-<name>)")
    p.add_argument("--name", default=None, help="report name: run report-<name> (default: the experiment)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                   "sqlite:///mlflow.db)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY",
                   help="a config key that splits a policy's rows (e.g. policy.t0); repeatable")
    p.add_argument("--no-log", action="store_true", help="write the folder only, log no report run")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    report, folder, run_id = compare(args.experiment, args.filter, args.tracking_uri, args.out, args.name,
                                     log=not args.no_log, progress=True, vary=args.vary)
    print(render(report, args.format), end="")
    print(f"\nreport ({len(report.runs)} runs) written to {folder}/ (index.html, table.*, figures)")
    if run_id:
        print(f"logged as MLflow run {run_id} (report-{args.name or args.experiment})")
    return 0
