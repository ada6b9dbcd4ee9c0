"""Compare freezing policies from their MLflow runs: the SmartFRZ paper's tables and figures, from your runs.

    freezebench compare                                        # every finished run, in every experiment
    freezebench compare --filter "tags.suite = 'table2_digits'" --format md
    freezebench compare --experiment my-exp --out reports/mine --no-log

Training runs (those with ``policy``/``model``/``dataset`` tags and a ``val/acc`` metric) are compared like
with like: a row is the set of runs whose resolved configs (their params) are equal in everything but the
seed and the keys that cannot change a result (:data:`NEUTRAL_KEYS`: tracking, output paths, progress
bars, ...). A row's label is its policy plus every key whose value differs between the rows (``smartfrz
window=40``, ``static trainer.epochs=5``); the settings all rows share are listed once. A run of the same
config and seed twice counts once (the newest; the report says how many re-runs it left out). Without
``--experiment`` every experiment of the store is read, so runs made by ``mlflow run .`` (MLflow's
``Default`` experiment unless ``--experiment-name``) are found too. Each row gives the mean and the sample
standard deviation over its seeds of
the final accuracy, wall time, training TFLOPs, peak memory and policy overhead, and the savings against
the ``full`` row with the same settings (the same config but the policy's own keys), the layout of Table 2 of the SmartFRZ paper (Li et al.,
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
# config keys (MLflow params) that cannot change a run's result: runs differing only in these (and the seed)
# share a row. Params without a dot are `mlflow run`'s own (MLproject parameters, repeated in the config).
NEUTRAL_KEYS = frozenset({
    "trainer.seed", "trainer.output_dir", "trainer.progress", "trainer.save_checkpoint", "trainer.checkpoint_every",
    "trainer.cache_dir", "trainer.check_finite_every", "data.root", "data.download", "data.num_workers",
    "data.eval_batch_size", "resume",
})
NEUTRAL_PREFIXES = ("tracking.", "units.")  # tracking settings; units.*: derived from the model, not set
IDENTITY_KEYS = ("model.name", "data.name", "policy.name")  # columns of their own, never in a label


def result_config(params: dict[str, str]) -> dict[str, str]:
    """The settings of a run that can change its result: its params minus the seed and :data:`NEUTRAL_KEYS`."""
    return {k: v for k, v in params.items()
            if "." in k and k not in NEUTRAL_KEYS and not k.startswith(NEUTRAL_PREFIXES)}


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
    config: dict[str, str] = field(default_factory=dict)  # result_config(params): what a row must share
    start_time: int = 0  # ms since the epoch (MLflow): the newest of a re-run is kept

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
    """Runs of one config differing only in their seeds: a row of the table."""

    model: str
    dataset: str
    policy: str  # the row's label: the policy plus every setting that differs between rows ("static lr=0.1")
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
    policy_name: str = ""  # the policy alone
    settings: dict[str, str] = field(default_factory=dict)  # the keys in the label and this row's values
    reruns: list[str] = field(default_factory=list)  # run ids left out: the same config and seed as a kept run


@dataclass
class Report:
    rows: list[Row]
    runs: list[RunRecord]
    title: str = "freezebench report"
    source: dict[str, Any] = field(default_factory=dict)  # experiment, filter, tracking URI
    shared: dict[str, str] = field(default_factory=dict)  # settings with one value in every row

    def groups(self) -> list[tuple[str, str]]:
        seen: dict[tuple[str, str], None] = {}
        for r in self.rows:
            seen.setdefault((r.model, r.dataset), None)
        return list(seen)

    def runs_of(self, row: Row) -> list[RunRecord]:
        """The runs of ``row``, by seed."""
        ids = set(row.run_ids)
        return sorted((r for r in self.runs if r.run_id in ids), key=lambda r: r.seed)


# --- reading MLflow ---------------------------------------------------------------------------------------

def _client(uri: str | None) -> Any:
    import mlflow

    from ..trainer.tracking import resolve_uri

    uri = resolve_uri(uri)
    return mlflow.tracking.MlflowClient(uri), uri


def load_runs(experiment: str | None = None, filter: str | None = None, uri: str | None = None,
              details: bool = True, progress: bool = False) -> list[RunRecord]:
    """The finished training runs of ``experiment`` (``None``: of every experiment) matching ``filter``.

    ``details`` also reads each run's memory history, freeze events and unit names (for the figures).
    Raises :class:`FreezebenchError` (one line) when nothing matches or no matching run finished.
    """
    import os

    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download otherwise

    client, uri = _client(uri)
    try:
        if experiment is None:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        else:
            exp = client.get_experiment_by_name(experiment)
            exp_ids = [exp.experiment_id] if exp is not None else []
    except MlflowException as e:
        raise FreezebenchError(f"cannot read the MLflow store at {uri}: {str(e).splitlines()[0]}") from None
    if experiment is not None and not exp_ids:
        known = [e.name for e in client.search_experiments()]
        from ..errors import did_you_mean

        raise FreezebenchError(f"no MLflow experiment {experiment!r} at {uri}.{did_you_mean(experiment, known)} "
                               f"Experiments: {', '.join(known) or '(none)'}")
    found, token = [], None
    while exp_ids:
        try:
            page = client.search_runs(exp_ids, filter_string=filter or "", max_results=1000, page_token=token)
        except MlflowException as e:
            raise FreezebenchError(f"bad --filter {filter!r}: {str(e).splitlines()[0]} (MLflow search syntax, "
                                   "e.g. \"tags.suite = 'table2_digits' and params.trainer.epochs = '3'\")") from None
        found.extend(page)
        token = page.token
        if not token:
            break
    runs, statuses = [], {}
    from ..progress import track

    for run in track(found, "reading runs", unit="run", enable=progress):  # on a terminal: done of total, ETA
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get("kind") == "report" or not {"policy", "model", "dataset"} <= set(tags):
            continue
        statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
        if run.info.status != "FINISHED" or KEYS["acc"] not in metrics:
            continue
        rec = RunRecord(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, policy=tags["policy"],
            model=tags["model"], dataset=tags["dataset"], seed=int(tags.get("seed", 0)),
            metrics={k: float(metrics[k]) for k in KEYS.values() if k in metrics},
            epochs=float(run.data.params.get("trainer.epochs", 0) or 0), suite=tags.get("suite"),
            config=result_config(dict(run.data.params)), start_time=int(run.info.start_time or 0),
        )
        if details:
            _read_details(client, rec, int(run.data.params.get("units.count", 0) or 0))
        runs.append(rec)
    if not runs:
        where = f"experiment {experiment!r}" if experiment is not None else f"any experiment at {uri}"
        match = f" matching {filter!r}" if filter else ""
        if statuses:
            counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
            raise FreezebenchError(f"no finished training runs in {where}{match}: the {sum(statuses.values())} "
                                   f"training runs found are {counts}")
        raise FreezebenchError(f"no finished training runs in {where}{match} (check --experiment and --filter)")
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


def _label_keys(groups: Sequence[tuple[str, dict[str, str]]], vary: Sequence[str]) -> list[str]:
    """Keys whose value differs between the groups (policy, config): a setting outside ``policy.*`` that
    differs anywhere, or a ``policy.*`` key that differs between groups of the same policy (another
    policy's knobs are not a difference); ``vary`` keys always."""
    keys: set[str] = set(k for k in vary if any(k in c for _, c in groups))
    every = {k for _, c in groups for k in c} - set(IDENTITY_KEYS)
    for k in every:
        if k.startswith("policy."):
            for pol in {p for p, _ in groups}:
                if len({c.get(k) for p, c in groups if p == pol}) > 1:
                    keys.add(k)
        elif len({c.get(k) for _, c in groups}) > 1 and not _policy_implied(k, groups):
            keys.add(k)
    return sorted(keys)


def _policy_defaults(policy: str) -> dict[str, str]:
    """The trainer settings a policy is defined with (``FreezePolicy.config_defaults``), as logged params."""
    from ..registry import POLICIES

    try:
        defaults = getattr(POLICIES.get(policy), "config_defaults", {}) or {}
    except Exception:  # a policy this installation does not know
        return {}
    return {k: str(v) for k, v in defaults.items()}


def _policy_implied(key: str, groups: Sequence[tuple[str, dict[str, str]]]) -> bool:
    """``key`` differs only because a policy sets it itself (SpFDE turns on sparsity and sieving): every
    group of such a policy has that value, every other group one common value. Then the policy's name says
    it and the key is no difference to label."""
    rest = set()
    for pol, c in groups:
        own = _policy_defaults(pol)
        if key in own:
            if c.get(key) != own[key]:
                return False
        else:
            rest.add(c.get(key))
    return len(rest) <= 1


def _short(key: str) -> str:
    return key[len("policy."):] if key.startswith("policy.") else key


def _dedupe(runs: list[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """One run per seed (the newest); the ids of the others (re-runs of the same config and seed)."""
    by_seed: dict[int, list[RunRecord]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    kept, dropped = [], []
    for seed in sorted(by_seed):
        rs = sorted(by_seed[seed], key=lambda r: (r.start_time, r.run_id))
        kept.append(rs[-1])
        dropped += [r.run_id for r in rs[:-1]]
    return kept, dropped


def build_report(runs: Sequence[RunRecord], order: Sequence[str] | None = None, title: str = "freezebench report",
                 source: dict[str, Any] | None = None, vary: Sequence[str] = ()) -> Report:
    """Group ``runs`` into rows of equal config (all but the seed and neutral keys) and compute the table
    (pure: no MLflow). ``vary``: keys always shown in the labels (where runs have them)."""
    if not runs:
        raise FreezebenchError("no finished training runs to compare (check --experiment and --filter)")
    configs: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        configs.setdefault((r.model, r.dataset, r.policy, tuple(sorted(r.config.items()))), []).append(r)
    keys = _label_keys([(k[2], dict(k[3])) for k in configs], vary)
    cfgs, policies = [dict(k[3]) for k in configs], {k[2] for k in configs}
    shared = {}  # listed once in the report: one value in every row (a policy's knobs only with one policy)
    for key in sorted(set.intersection(*(set(c) for c in cfgs))):
        vals = {c[key] for c in cfgs}
        if len(vals) == 1 and (not key.startswith("policy.") or len(policies) == 1):
            shared[key] = vals.pop()
    groups: dict[tuple[str, str], list[tuple]] = {}
    for k in configs:
        groups.setdefault((k[0], k[1]), []).append(k)
    rows, kept_runs = [], []
    for (model, dataset) in sorted(groups):
        entries = []
        for k in groups[(model, dataset)]:
            cfg = dict(k[3])
            settings = {key: cfg.get(key, "–") for key in keys if not key.startswith("policy.") or key in cfg}
            label = " ".join([k[2], *(f"{_short(key)}={v}" for key, v in settings.items())])
            rs, dropped = _dedupe(configs[k])
            entries.append((k, label, settings, rs, dropped))
        rank = {p: i for i, p in enumerate(policy_order({e[0][2] for e in entries}, order))}
        entries.sort(key=lambda e: (rank[e[0][2]], e[1]))
        # the baseline of a row: the `full` row whose settings outside policy.* are the same
        outside = lambda k: tuple((a, b) for a, b in k[3] if not a.startswith("policy."))  # noqa: E731
        base = {outside(e[0]): e[3] for e in entries if e[0][2] == BASELINE}
        for k, label, settings, rs, dropped in entries:
            b = base.get(outside(k))
            base_time = Stat.of([r.value("time_s") for r in b]).mean if b else None
            base_flops = Stat.of([r.value("tflops") for r in b]).mean if b else None
            col = {c: [r.value(c) for r in rs] for c in KEYS}
            time_s, tflops = Stat.of(col["time_s"]), Stat.of(col["tflops"])
            ref_flops = base_flops if base_flops else Stat.of(col["tflops_full"]).mean
            rows.append(Row(
                model=model, dataset=dataset, policy=label, seeds=[r.seed for r in rs],
                run_ids=[r.run_id for r in rs], acc=Stat.of(col["acc"]), time_s=time_s, tflops=tflops,
                peak_mb=Stat.of(col["peak_mb"]), policy_s=Stat.of(col["policy_s"]),
                overhead_frac=Stat.of([p / t for p, t in zip(col["policy_s"], col["time_s"]) if t > 0]),
                frozen_units=Stat.of(col["frozen_units"]),
                time_saving=1 - time_s.mean / base_time if base_time else None,
                flops_saving=1 - tflops.mean / ref_flops if ref_flops else None,
                policy_name=k[2], settings=settings, reruns=dropped,
            ))
            kept_runs += rs
    return Report(rows=rows, runs=kept_runs, title=title, source=dict(source or {}), shared=shared)


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
        seeds = str(len(r.seeds)) + (f" (+{len(r.reruns)} re-run{'s' if len(r.reruns) > 1 else ''})" if r.reruns else "")
        out.append([r.model, r.dataset, r.policy, seeds, fmt_stat(r.acc, 100, 2), fmt_stat(r.time_s),
                    fmt_stat(r.tflops), _pct(r.time_saving), _pct(r.flops_saving), fmt_stat(r.peak_mb, decimals=0),
                    fmt_stat(r.policy_s), fmt_stat(r.overhead_frac, 100, 2), fmt_stat(r.frozen_units, decimals=1)])
    return out


CSV_COLUMNS = ["model", "dataset", "policy", "n", "seeds", "acc_mean", "acc_std", "time_s_mean", "time_s_std",
               "tflops_mean", "tflops_std", "time_saving", "flops_saving", "peak_mb_mean", "peak_mb_std",
               "policy_s_mean", "policy_s_std", "overhead_frac_mean", "overhead_frac_std", "frozen_units_mean",
               "run_ids", "policy_name", "reruns"]


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
                    nz(r.frozen_units.mean), " ".join(r.run_ids), r.policy_name, " ".join(r.reruns)])
    return buf.getvalue()


def render(report: Report, fmt: str = "table") -> str:
    """The table as aligned text (``table``), Markdown (``md``), ``csv`` (full precision) or ``html``."""
    if fmt not in FORMATS:
        raise FreezebenchError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return _csv(report)
    cells = table_cells(report)
    notes = _notes(report)
    if fmt == "md":
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(HEADER))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        if report.shared:
            lines += ["", "Settings all rows share: " + ", ".join(f"`{k}={v}`" for k, v in report.shared.items())]
        lines += ["", *notes] if notes else []
        return "\n".join(lines) + "\n"
    if fmt == "html":
        head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in cells)
        shared = "".join(f"<li><code>{html.escape(k)}={html.escape(v)}</code></li>" for k, v in report.shared.items())
        extra = (f'<p>Settings all rows share:</p>\n<ul class="freezebench-shared">{shared}</ul>\n' if shared else "")
        extra += "".join(f"<p>{html.escape(n)}</p>\n" for n in notes)
        return (f'<table class="freezebench-report">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n'
                f'</table>\n{extra}')
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    line = lambda row: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *(line(c) for c in cells), *notes]) + "\n"


def _notes(report: Report) -> list[str]:
    """What the reader must know: re-runs left out, rows without a comparable `full` baseline."""
    out = []
    n = sum(len(r.reruns) for r in report.rows)
    if n:
        out.append(f"Note: {n} re-run{'s' if n > 1 else ''} of a config and seed already in a row left out (the "
                   "newest run of each seed counts, once).")
    return out


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
            run = report.runs_of(rows[j])[0]
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
            for run in report.runs_of(row):
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
        names = max((r.unit_names for rw in rows for r in report.runs_of(rw)), key=len)
        data = np.array([freeze_epochs(report.runs_of(r), len(names)) for r in rows])
        epochs = max((r.epochs for rw in rows for r in report.runs_of(rw)), default=1.0) or 1.0
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
    data = {"title": report.title, "source": report.source, "shared": report.shared,
            "rows": [asdict(r) for r in report.rows],
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


def log_report(report: Report, folder: str | Path, experiment: str | None, uri: str | None = None, name: str = "report",
               tags: dict[str, str] | None = None) -> str:
    """Log the report folder as an MLflow run ``report-<name>`` (tag ``kind=report``); return its id."""
    client, uri = _client(uri)
    experiment = experiment or "freezebench"  # a report over every experiment goes to freezebench's
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    note = (f"**{report.title}**: {len(report.runs)} runs, {len(report.rows)} rows (one config each), "
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


def compare(experiment: str | None = None, filter: str | None = None, uri: str | None = None,
            out: str | Path | None = None, name: str | None = None, log: bool = True, order: Sequence[str] | None = None,
            title: str | None = None, tags: dict[str, str] | None = None, progress: bool = False,
            vary: Sequence[str] = ()) -> tuple[Report, Path, str | None]:
    """Read the runs, build the report, write the folder and (``log``) log the ``report`` run."""
    from ..trainer.tracking import resolve_uri

    name = name or experiment or "all"
    runs = load_runs(experiment, filter, uri, details=True, progress=progress)
    report = build_report(runs, order=order, title=title or f"freezebench report: {name}", vary=vary,
                          source={"experiment": experiment or "(all)", "filter": filter,
                                  "tracking_uri": resolve_uri(uri)})
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
    p.add_argument("--experiment", "-e", default=None,
                   help="MLflow experiment (default: every experiment, so `mlflow run .` runs in Default count)")
    p.add_argument("--filter", "-f", default=None,
                   help="MLflow search filter, e.g. \"tags.suite = 'table2_digits'\" or \"tags.model = 'resnet20'\"")
    p.add_argument("--format", default="table", choices=FORMATS, help="how to print the table (all are written)")
    p.add_argument("--out", "-o", default=None, help="report folder (default: outputs/report-<name>)")
    p.add_argument("--name", default=None, help="report name: run report-<name> (default: the experiment, or all)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                   "sqlite:///mlflow.db)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY",
                   help="a config key always shown in the row labels (rows split by every differing key "
                        "anyway); repeatable")
    p.add_argument("--no-log", action="store_true", help="write the folder only, log no report run")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    report, folder, run_id = compare(args.experiment, args.filter, args.tracking_uri, args.out, args.name,
                                     log=not args.no_log, progress=True, vary=args.vary)
    print(render(report, args.format), end="")
    print(f"\nreport ({len(report.runs)} runs) written to {folder}/ (index.html, table.*, figures)")
    if run_id:
        print(f"logged as MLflow run {run_id} (report-{args.name or args.experiment or 'all'})")
    return 0
