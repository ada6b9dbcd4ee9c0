"""Sweeps in one process: spaces, the grid run exactly once, nested MLflow runs, failures, re-runs, tables."""

from __future__ import annotations

import statistics
import time

import mlflow
import optuna
import pytest
from freezebench.sweeps import SweepError, format_table, load_space, run_sweep, summary_rows
from freezebench.sweeps.runner import HEARTBEAT_KEY, fail_stale, grid_progress
from freezebench.sweeps.space import parse_space
from optuna.trial import TrialState

from freezebench.cli import main
from freezebench.registry import POLICIES


def write(tmp_path, text, name="space.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --- spaces -------------------------------------------------------------------------------------------
def test_shipped_spaces_expand_to_the_papers_values():
    assert [p["policy.window"] for p in load_space("window").grid()] == [20, 30, 40, 50]
    assert [p["policy.tailor_size"] for p in load_space("tailor").grid()] == [512, 1024, 2048, 4096]
    assert [p["policy.t0"] for p in load_space("freezeout_t0").grid()] == [0.3, 0.4, 0.5, 0.6]
    assert [p["policy.evals_per_epoch"] for p in load_space("autofreeze_m").grid()] == [2, 3, 4, 5]
    pol = load_space("policies")
    assert [p["policy"] for p in pol.grid()] == [n for n in POLICIES.names() if n != "cka_oracle"]
    assert pol.directions == ["maximize", "minimize"]
    assert load_space("window").seeds == (0, 1, 2)


def test_grid_is_the_product_last_key_fastest():
    s = parse_space({"params": {"a": [1, 2], "b": {"type": "int", "low": 3, "high": 7, "step": 2}}}, "x")
    assert s.grid() == [{"a": 1, "b": 3}, {"a": 1, "b": 5}, {"a": 1, "b": 7},
                        {"a": 2, "b": 3}, {"a": 2, "b": 5}, {"a": 2, "b": 7}]


@pytest.mark.parametrize("data, message", [
    ({"params": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}}, "has no grid"),
    ({"params": {"a": {"type": "float", "low": 2, "high": 1, "step": 0.1}}}, "low (2.0) is above high"),
    ({"params": {"a": {"type": "float", "low": 0, "high": 1, "log": True}}, "sampler": "tpe", "n_trials": 3},
     "needs low > 0"),
    ({"params": {"a": [1]}, "sampler": "tpe"}, "needs n_trials"),
    ({"params": {"a": [1]}, "sampler": "tpe", "n_trials": 3, "seeds": [0, 1]}, "one seed"),
    ({"params": {"a": [1]}, "sampler": "random"}, "sampler must be grid or tpe"),
    ({"params": {"a": [1]}, "objective": "acc"}, "objective must be one of"),
    ({"params": {"a": [1]}, "n_trial": 3}, "unknown key 'n_trial'"),
    ({"params": {"a": {"type": "int", "low": 1, "hgh": 3}}}, "unknown key 'hgh'"),
    ({"params": {"a": []}}, "empty list"),
    ({"params": {"a": [1, 1]}}, "values repeat"),
    ({"params": {"policy": {"registry": "policies", "exclude": ["nope"]}}}, "not in the policies registry"),
    ({"params": {}}, "'params' must map"),
])
def test_bad_spaces_are_clear_errors(data, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space(data, "bad")


def test_overrides_name_swept_keys_in_braces():
    s = parse_space({"overrides": ["policy=smartfrz", "policy.weights=w/{policy.window}-{policy.window}.pt",
                                   "a=${oc.env:X}", "b={other}"], "params": {"policy.window": [20, 40]}}, "x")
    assert s.trial_overrides(s.grid()[1]) == ["policy=smartfrz", "policy.weights=w/40-40.pt", "a=${oc.env:X}",
                                              "b={other}", "policy.window=40"]


def test_unknown_space_suggests_the_nearest():
    with pytest.raises(SweepError, match="unknown space 'windw'. Did you mean 'window'"):
        load_space("windw")


# --- running ------------------------------------------------------------------------------------------
POLICY_GRID = """
name: pol
overrides: [trainer.epochs=1]
params:
  policy: [static, freezeout_linear]
seeds: [0, 1]
"""


@pytest.mark.slow
def test_grid_sweep_runs_each_point_once_nested_under_one_parent(tmp_path, mlflow_uri, tiny_overrides, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    res = run_sweep(write(tmp_path, POLICY_GRID), tiny_overrides, storage=storage, study="pol", plots=False,
                    echo=None)
    trials = res.study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["grid_index"] for t in trials) == [0, 1, 2, 3]
    assert [(t.params["policy"], t.user_attrs["seed"]) for t in trials] == [
        ("static", 0), ("static", 1), ("freezeout_linear", 0), ("freezeout_linear", 1)]
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "sweep"
    accs = {}
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == res.parent_run_id
        assert run.info.experiment_id == parent.info.experiment_id
        assert run.data.tags["trial"] == str(t.number) and run.data.tags["policy"] == t.params["policy"]
        assert run.data.params["trainer.seed"] == str(t.user_attrs["seed"])
        assert run.data.metrics["val/acc"] == t.values[0] == t.user_attrs["val/acc"]
        accs.setdefault(t.params["policy"], []).append(run.data.metrics["val/acc"])
    # the table: mean and sample std over the seeds, read back from MLflow
    assert [r["params"]["policy"] for r in res.rows] == ["static", "freezeout_linear"]
    for r in res.rows:
        a = accs[r["params"]["policy"]]
        assert r["n"] == 2 and r["failed"] == 0
        assert r["acc_mean"] == pytest.approx(statistics.fmean(a)) and r["acc_std"] == pytest.approx(statistics.stdev(a))
    table = client.download_artifacts(res.parent_run_id, "sweep/table.txt", str(tmp_path))
    with open(table) as f:
        assert f.read().strip() == res.table
    assert f"{100 * res.rows[0]['acc_mean']:.2f} ± {100 * res.rows[0]['acc_std']:.2f}" in res.table

    # a re-run of a finished sweep runs nothing and gives the same table
    again = run_sweep(write(tmp_path, POLICY_GRID), tiny_overrides, storage=storage, study="pol", plots=False,
                      echo=None)
    assert again.ran == [] and again.parent_run_id == res.parent_run_id and again.rows == res.rows
    assert len(again.study.get_trials()) == 4
    # the table on demand, from the study alone
    assert main(["sweep", "--report", "--study", "pol", "--storage", storage, "--no-plots"]) == 0
    assert res.table in capsys.readouterr().out


@pytest.mark.slow
def test_a_raising_trial_is_recorded_and_the_sweep_goes_on(tmp_path, mlflow_uri, tiny_overrides):
    space = write(tmp_path, "name: prec\nparams:\n  trainer.precision: [fp16, fp32]\n")
    res = run_sweep(space, tiny_overrides + ["policy=static", "trainer.epochs=1"], storage=f"sqlite:///{tmp_path}/o.db", plots=False,
                    echo=None)
    bad, good = res.study.get_trials()
    assert bad.state == TrialState.FAIL and good.state == TrialState.COMPLETE
    assert bad.user_attrs["fail_reason"].startswith("ConfigError: trainer.precision=fp16 needs CUDA")
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    failed_run = client.get_run(bad.user_attrs["mlflow_run_id"])  # every trial shows under the parent
    assert failed_run.info.status == "FAILED" and failed_run.data.tags["mlflow.parentRunId"] == res.parent_run_id
    assert [(r["n"], r["failed"]) for r in res.rows] == [(0, 1), (1, 0)]
    assert "trial 0 (seed 0): ConfigError: trainer.precision=fp16 needs CUDA" in res.table
    assert grid_progress(res.study).done == 2
    # --retry-failed runs the failed point again (and only it)
    res2 = run_sweep(space, tiny_overrides + ["policy=static", "trainer.epochs=1"], storage=f"sqlite:///{tmp_path}/o.db", plots=False,
                     retry_failed=True, echo=None)
    assert res2.ran == [2] and res2.study.get_trials()[2].user_attrs["retry_of"] == 0


@pytest.mark.slow
def test_tpe_two_objectives(tmp_path, mlflow_uri, tiny_overrides):
    space = write(tmp_path, """
name: lr
overrides: [policy=freezeout_linear, trainer.epochs=1]
params:
  optim.lr: {type: float, low: 0.001, high: 0.1, log: true}
  policy.t0: {type: float, low: 0.3, high: 0.6}
sampler: tpe
n_trials: 3
objective: accuracy+tflops
seeds: [0]
""")
    res = run_sweep(space, tiny_overrides, storage=f"sqlite:///{tmp_path}/o.db", echo=None)
    trials = res.study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [d.name for d in res.study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in trials:
        assert 1e-3 <= t.params["optim.lr"] <= 0.1 and t.values[1] == t.user_attrs["cost/tflops"]
    assert len(res.rows) == 3 and sum(r["pareto"] for r in res.rows) >= 1
    art = {a.path for a in mlflow.tracking.MlflowClient(mlflow_uri).list_artifacts(res.parent_run_id, "sweep/plots")}
    assert "sweep/plots/pareto_front.png" in art and "sweep/plots/slice.png" in art


def test_journal_storage(tmp_path, mlflow_uri, tiny_overrides):
    space = write(tmp_path, "name: j\nparams:\n  policy: [static]\nseeds: [3]\n")
    res = run_sweep(space, tiny_overrides + ["trainer.epochs=1"], storage=f"journal://{tmp_path}/s.log",
                    plots=False, echo=None)
    (t,) = res.study.get_trials()
    assert t.state == TrialState.COMPLETE and t.user_attrs["seed"] == 3


# --- bad input ----------------------------------------------------------------------------------------
def test_existing_study_with_another_space_is_refused(tmp_path, mlflow_uri, tiny_overrides):
    storage = f"sqlite:///{tmp_path}/o.db"
    run_sweep(write(tmp_path, "name: a\nparams:\n  policy: [static]\n"), tiny_overrides + ["trainer.epochs=1"],
              storage=storage, study="s", plots=False, echo=None)
    with pytest.raises(SweepError, match="study 's' .* exists with a different sweep \\(params differ"):
        run_sweep(write(tmp_path, "name: a\nparams:\n  policy: [full]\n"), tiny_overrides + ["trainer.epochs=1"],
                  storage=storage, study="s", echo=None)
    with pytest.raises(SweepError, match="seeds differ"):
        run_sweep(write(tmp_path, "name: a\nparams:\n  policy: [static]\n"), tiny_overrides + ["trainer.epochs=1"],
                  seeds=[0, 1], storage=storage, study="s", echo=None)


def test_bad_points_and_storage_fail_before_any_trial(tmp_path, mlflow_uri, tiny_overrides, capsys):
    with pytest.raises(SweepError, match="point policy.windw=3: unknown config key 'policy.windw'"):
        run_sweep(write(tmp_path, "params:\n  policy.windw: [3]\noverrides: [policy=smartfrz]\n"), tiny_overrides,
                  storage=f"sqlite:///{tmp_path}/o.db", echo=None)
    assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/o.db") == []
    # a study whose set-up fails (here: no MLflow store at that URI) is removed, so a re-run starts afresh
    with pytest.raises(SweepError, match="cannot create the sweep's parent MLflow run at nosuch://x"):
        run_sweep(write(tmp_path, "params:\n  policy: [static]\n"), tiny_overrides + ["tracking.uri=nosuch://x"],
                  storage=f"sqlite:///{tmp_path}/o.db", echo=None)
    assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/o.db") == []
    assert main(["sweep", "window", "--storage", "mongodb://x/y"]) == 2
    assert "is not a database URL or journal file" in capsys.readouterr().err
    assert main(["sweep", "windw"]) == 2
    assert "Did you mean 'window'" in capsys.readouterr().err
    assert main(["sweep", "window", "--seeds", "a,b"]) == 2
    assert "--seeds 'a,b': give comma-separated integers" in capsys.readouterr().err
    assert main(["sweep", "--report", "--study", "none", "--storage", f"sqlite:///{tmp_path}/o.db"]) == 2
    assert "no study 'none'" in capsys.readouterr().err


# --- takeover of a dead worker's trial ----------------------------------------------------------------
def test_stale_trial_is_failed_and_requeued_exactly_once(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/o.db")
    study.enqueue_trial({"a": 1}, user_attrs={"grid_index": 0, "point_index": 0, "seed": 0})
    trial = study.ask()  # RUNNING, as a worker's
    storage = study._storage
    storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_KEY, time.time() - 100)
    assert fail_stale(study, grace_s=200) == []  # not stale yet
    assert fail_stale(study, grace_s=10) == [0]
    assert fail_stale(study, grace_s=10) == []  # already failed: no second copy
    lost, copy = study.get_trials()
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"].startswith("worker lost: no heartbeat")
    assert copy.state == TrialState.WAITING and copy.user_attrs == {"grid_index": 0, "point_index": 0, "seed": 0,
                                                                    "retry_of": 0}
    assert copy.system_attrs["fixed_params"] == {"a": 1}


def test_table_format_marks_missing_std():
    rows = [{"params": {"policy.window": 30}, "n": 1, "failed": 0, "pending": 0, "acc_mean": 0.9, "acc_std": None,
             "tflops_mean": 1.5, "time_mean": 2.0, "fail_reasons": []}]
    assert format_table(rows).splitlines()[2].split() == ["30", "90.00", "1", "1.5", "2.0", "0"]


def test_summary_rows_of_an_empty_study(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/o.db")
    assert summary_rows(study) == []
