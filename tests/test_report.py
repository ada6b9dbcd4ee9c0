"""The compare report: numbers checked against the runs' own metrics, formats, figures, the report run."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import mlflow
import pytest

from freezebench.cli import main
from freezebench.errors import FreezebenchError
from freezebench.analysis.report import (FIGURES, HEADER, Report, Row, RunRecord, Stat, build_report, compare, fmt_stat,
                                freeze_epochs, load_runs, pareto_front, policy_order, render)

SUITE = "tags.suite = 't'"


def _metrics(uri: str, run_ids: list[str], key: str) -> list[float]:
    client = mlflow.tracking.MlflowClient(uri)
    return [client.get_run(r).data.metrics[key] for r in run_ids]


@pytest.mark.slow
def test_report_numbers_are_the_runs_own_metrics(compare_runs, tmp_path):
    uri, exp, ids = compare_runs["uri"], compare_runs["experiment"], compare_runs["ids"]
    report, folder, run_id = compare(exp, SUITE, uri, out=tmp_path / "rep", name="t")
    assert [(r.model, r.dataset, r.policy) for r in report.rows] == [
        ("tiny", "synthetic", "full"), ("tiny", "synthetic", "freezeout_linear"), ("tiny", "synthetic", "static")]
    assert ids[("other", 7)] not in {r.run_id for r in report.runs}  # the filter kept suite t only
    rows = {r.policy: r for r in report.rows}
    full_ids = [ids[("full", s)] for s in (0, 1)]
    full_time = statistics.fmean(_metrics(uri, full_ids, "time/total_s"))
    full_tflops = statistics.fmean(_metrics(uri, full_ids, "cost/tflops"))
    for policy, row in rows.items():
        run_ids = [ids[(policy, s)] for s in (0, 1)]
        assert row.seeds == [0, 1] and row.run_ids == run_ids
        for stat, key in ((row.acc, "val/acc"), (row.time_s, "time/total_s"), (row.tflops, "cost/tflops"),
                          (row.peak_mb, "mem/peak_mb"), (row.policy_s, "time/policy_total_s"),
                          (row.frozen_units, "freeze/frozen_units")):
            vals = _metrics(uri, run_ids, key)
            assert stat.n == 2
            assert stat.mean == pytest.approx((vals[0] + vals[1]) / 2, rel=1e-12), key
            assert stat.std == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2), rel=1e-9, abs=1e-15), key
        times = _metrics(uri, run_ids, "time/total_s")
        assert row.time_saving == pytest.approx(1 - statistics.fmean(times) / full_time, rel=1e-12)
        tflops = _metrics(uri, run_ids, "cost/tflops")
        assert row.flops_saving == pytest.approx(1 - statistics.fmean(tflops) / full_tflops, rel=1e-12)
        # FLOPs are deterministic: the saving against `full` is each run's own saving against full training
        for v in _metrics(uri, run_ids, "cost/saving_frac"):
            assert row.flops_saving == pytest.approx(v, rel=1e-9, abs=1e-12)
        pol = _metrics(uri, run_ids, "time/policy_total_s")
        assert row.overhead_frac.mean == pytest.approx(statistics.fmean([p / t for p, t in zip(pol, times)]))
    assert rows["full"].time_saving == 0.0 and rows["full"].flops_saving == 0.0
    assert rows["full"].frozen_units.mean == 0 and rows["static"].frozen_units.mean == 1
    assert rows["static"].flops_saving > 0 and rows["freezeout_linear"].flops_saving > 0

    # the folder: every format, the figures, report.json; the CSV carries full precision
    names = {p.name for p in folder.iterdir()}
    assert {"table.txt", "table.md", "table.csv", "table.html", "report.json", "index.html", *FIGURES} <= names
    parsed = list(csv.DictReader(io.StringIO((folder / "table.csv").read_text())))
    for line in parsed:
        row = rows[line["policy"]]
        assert float(line["acc_mean"]) == row.acc.mean and float(line["tflops_std"]) == row.tflops.std
        assert float(line["time_saving"]) == row.time_saving and line["run_ids"].split() == row.run_ids
    data = json.loads((folder / "report.json").read_text())
    assert len(data["rows"]) == 3 and len(data["runs"]) == 6 and data["source"]["filter"] == SUITE

    # the report run: in the same experiment, tagged, its description the Markdown table, the files attached
    client = mlflow.tracking.MlflowClient(uri)
    rr = client.get_run(run_id)
    assert rr.info.run_name == "report-t" and rr.info.status == "FINISHED" and rr.data.tags["kind"] == "report"
    assert render(report, "md") in rr.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"table.md", "table.csv", "accuracy_vs_tflops.png"}
    # ... and a second report over the same experiment does not count the report run as a training run
    assert len(load_runs(exp, SUITE, uri, details=False)) == 6


@pytest.mark.slow
def test_runs_read_well_and_figures_use_their_events(compare_runs):
    uri, exp, ids = compare_runs["uri"], compare_runs["experiment"], compare_runs["ids"]
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(ids[("static", 1)])
    assert run.info.run_name == "static-tiny-synthetic-s1"
    assert {"policy": "static", "model": "tiny", "dataset": "synthetic", "seed": "1", "suite": "t"}.items() \
        <= run.data.tags.items()
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**static** freezing on **tiny** / **synthetic**, seed 1: 3 epochs of 4 steps") and "`t`" in note
    runs = {(r.policy, r.seed): r for r in load_runs(exp, SUITE, uri)}
    static = runs[("static", 0)]
    # static freezing at step 4 of 4 steps per epoch: unit 0 frozen at epoch 1.0, nothing else
    assert static.events == [{"unit": 0, "name": static.unit_names[0], "step": 4, "epoch": 1.0, "action": "freeze"}]
    assert freeze_epochs([runs[("static", 0)], runs[("static", 1)]], len(static.unit_names)) [0] == 1.0
    assert all(math.isnan(v) for v in freeze_epochs([runs[("full", 0)]], len(static.unit_names)))
    assert [s for s, _ in static.memory] == [1, 2, 3] and static.epochs == 3.0
    hist = [m.value for m in client.get_metric_history(static.run_id, "mem/peak_mb")]
    assert sorted(hist) == sorted(v for _, v in static.memory)
    # --vary: a knob always in the labels (Tables 8/9); rows of runs without that param keep their policy name
    varied = build_report(load_runs(exp, SUITE, uri, details=False), vary=["policy.at_step"])
    assert {r.policy for r in varied.rows} == {"full", "freezeout_linear", "static at_step=4"}


@pytest.mark.slow
def test_compare_command(compare_runs, tmp_path, capsys):
    uri, exp = compare_runs["uri"], compare_runs["experiment"]
    rc = main(["compare", "-e", exp, "--filter", "tags.suite = 'other'", "--format", "csv", "--tracking-uri", uri,
               "--no-log", "--out", str(tmp_path / "r")])
    assert rc == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(out.split("\n\n")[0])))
    assert [(r["policy"], r["n"], r["seeds"]) for r in rows] == [("full", "1", "7")]
    assert rows[0]["acc_std"] == ""  # one seed: no standard deviation
    assert main(["compare", "-e", "no-such-exp", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment 'no-such-exp'" in capsys.readouterr().err
    assert main(["compare", "-e", exp, "--filter", "tags.suite = 'nothing'", "--tracking-uri", uri, "--no-log"]) == 2
    assert "no finished training runs" in capsys.readouterr().err
    assert main(["compare", "-e", exp, "--filter", "tags.suite ~~ 1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freezebench: error: bad --filter") and err.count("\n") == 1


def test_pareto_front_reference():
    # (cost, accuracy): b dominates c (cheaper, as accurate); d is the most accurate; e the cheapest
    pts = [(10.0, 0.80), (6.0, 0.78), (7.0, 0.78), (12.0, 0.82), (3.0, 0.60), (11.0, 0.79)]
    assert pareto_front(pts) == [4, 1, 0, 3]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties dominate neither
    assert pareto_front([]) == []


def test_stats_and_formatting():
    s = Stat.of([0.5, 0.7, float("nan")])
    assert (s.mean, s.n) == (pytest.approx(0.6), 2) and s.std == pytest.approx(math.sqrt(0.02))
    assert Stat.of([3.0]).std is None and Stat.of([]).n == 0
    assert fmt_stat(Stat(0.8168, 0.0012, 3), 100, 2) == "81.68 ± 0.12"
    assert fmt_stat(Stat(2500.0, 31.4, 3)) == "2500 ± 31"
    assert fmt_stat(Stat(1.23456, None, 1)) == "1.235"
    assert fmt_stat(Stat(9.563e-05, 0.0, 2)) == "9.563e-05 ± 0"
    assert fmt_stat(Stat(math.nan, None, 0)) == "–"
    assert policy_order(["svcca", "smartfrz", "full", "autofreeze"], ["smartfrz"]) == \
        ["full", "smartfrz", "autofreeze", "svcca"]


def _rec(policy: str, seed: int, acc: float, time_s: float, tflops: float) -> RunRecord:
    return RunRecord(run_id=f"{policy}{seed}", name=f"{policy}-m-d-s{seed}", policy=policy, model="m", dataset="d",
                     seed=seed, metrics={"val/acc": acc, "time/total_s": time_s, "cost/tflops": tflops,
                                         "cost/tflops_full": 12360.0, "mem/peak_mb": 100.0,
                                         "time/policy_total_s": 1.0, "freeze/frozen_units": 0.0})


def test_build_report_reference_values_and_formats():
    # the paper's ResNet-50 CIFAR-100 Table 2 magnitudes, two seeds each
    runs = [_rec("full", 0, 0.8160, 2490.0, 12360.0), _rec("full", 1, 0.8176, 2510.0, 12360.0),
            _rec("smartfrz", 0, 0.8170, 1780.0, 6390.0), _rec("smartfrz", 1, 0.8176, 1794.0, 6406.0)]
    rep = build_report(runs)
    full, smart = rep.rows
    assert smart.time_saving == pytest.approx(1 - 1787.0 / 2500.0)
    assert smart.flops_saving == pytest.approx(1 - 6398.0 / 12360.0)
    assert smart.tflops.std == pytest.approx(math.sqrt(128.0))
    txt = render(rep, "table")
    assert txt.splitlines()[0].split("  ")[0] == "model" and "28.5%" in txt and "48.2%" in txt
    md = render(rep, "md").splitlines()
    assert md[0] == "| " + " | ".join(HEADER) + " |"
    assert md[3].startswith("| m | d | smartfrz | 2 | 81.73 ± 0.04 | 1787 ± 10 | 6398 ± 11 | 28.5% | 48.2% |")
    assert "<td>81.73 ± 0.04</td>" in render(rep, "html")
    # no `full` runs: no time saving, FLOPs saving against the cost model's full-training cost
    only = build_report(runs[2:])
    assert only.rows[0].time_saving is None and only.rows[0].flops_saving == pytest.approx(1 - 6398.0 / 12360.0)
    with pytest.raises(FreezebenchError, match="unknown format"):
        render(rep, "xlsx")
    with pytest.raises(FreezebenchError, match="no finished training runs"):
        build_report([])
    assert isinstance(rep, Report) and isinstance(full, Row)
