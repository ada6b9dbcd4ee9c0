"""compare: like with like. Rows from real tiny runs that differ in optim.lr and trainer.epochs, a re-run of
one config and seed, a run in MLflow's Default experiment (where `mlflow run .` logs), FAILED-only filters."""

from __future__ import annotations

import os
import statistics

import mlflow
import pytest

from freezebench.analysis.report import compare, render, result_config
from freezebench.cli import main
from freezebench.config import load_config

from conftest import TINY

FILTER = "tags.suite = 'like'"


@pytest.fixture(scope="module")
def like_runs(_mlflow_store, tmp_path_factory):
    from freezebench.trainer import Trainer

    work = tmp_path_factory.mktemp("like")
    old = os.getcwd()
    os.chdir(work)
    base = [*TINY, f"tracking.uri={_mlflow_store}", "tracking.experiment=like-test", "trainer.save_checkpoint=false",
            "tracking.tags.suite=like"]
    plan = [("full", 0, []), ("full", 1, []), ("full", 0, []),  # the third: a re-run of the first
            ("full", 0, ["optim.lr=0.1", "tracking.experiment=Default"]),  # where `mlflow run .` logs
            ("static", 0, ["policy.at_step=4"]), ("static", 0, ["policy.at_step=4", "trainer.epochs=2"])]
    ids = []
    try:
        for policy, seed, extra in plan:
            cfg = load_config([*base, f"policy={policy}", f"trainer.seed={seed}", *extra])
            ids.append(Trainer(cfg).fit().run_id)
    finally:
        os.chdir(old)
    return {"uri": _mlflow_store, "ids": ids}


def _metric(uri, run_id, key):
    return mlflow.tracking.MlflowClient(uri).get_run(run_id).data.metrics[key]


@pytest.mark.slow
def test_rows_are_configs_labels_show_what_differs(like_runs, tmp_path):
    uri, ids = like_runs["uri"], like_runs["ids"]
    report, folder, _ = compare(None, FILTER, uri, out=tmp_path / "r", log=False)  # every experiment
    labels = [r.policy for r in report.rows]
    assert labels == ["full optim.lr=0.05 trainer.epochs=3", "full optim.lr=0.1 trainer.epochs=3",
                      "static optim.lr=0.05 trainer.epochs=2", "static optim.lr=0.05 trainer.epochs=3"]
    rows = dict(zip(labels, report.rows))
    base = rows["full optim.lr=0.05 trainer.epochs=3"]
    # the re-run counts once: seeds 0 and 1, the newest run of seed 0, the older one named as left out
    assert base.seeds == [0, 1] and base.run_ids == [ids[2], ids[1]] and base.reruns == [ids[0]]
    accs = [_metric(uri, i, "val/acc") for i in (ids[2], ids[1])]
    assert base.acc.n == 2 and base.acc.mean == pytest.approx(statistics.fmean(accs), rel=1e-12)
    assert render(report, "table").count("re-run") == 2  # in the seeds cell and the note
    # the lr=0.1 run lives in experiment Default and is found without --experiment; never averaged with lr=0.05
    lr = rows["full optim.lr=0.1 trainer.epochs=3"]
    assert lr.run_ids == [ids[3]] and lr.acc.mean == _metric(uri, ids[3], "val/acc") and lr.acc.std is None
    # savings only against the `full` row of the same settings; a 2-epoch static run has none
    st3, st2 = rows["static optim.lr=0.05 trainer.epochs=3"], rows["static optim.lr=0.05 trainer.epochs=2"]
    full_tflops = statistics.fmean(_metric(uri, i, "cost/tflops") for i in (ids[2], ids[1]))
    assert st3.flops_saving == pytest.approx(1 - _metric(uri, ids[4], "cost/tflops") / full_tflops, rel=1e-12)
    assert st2.time_saving is None
    assert st2.flops_saving == pytest.approx(_metric(uri, ids[5], "cost/saving_frac"), rel=1e-9)
    # settings every row shares, listed once; the differing ones are not among them
    assert report.shared["model.name"] == "tiny" and report.shared["data.batch_size"] == "16"
    assert "optim.lr" not in report.shared and "trainer.epochs" not in report.shared
    assert "policy.at_step" not in report.shared  # two policies: their knobs are not shared settings
    md = (folder / "table.md").read_text()
    assert md.count("Settings all rows share") == 1 and "`model.name=tiny`" in md
    # plots follow rows: one point per row on the Pareto figure (labels as legends)
    import json

    data = json.loads((folder / "report.json").read_text())
    assert [r["policy"] for r in data["rows"]] == labels and data["shared"] == report.shared
    assert len(data["runs"]) == 5  # the re-run is not among the runs the figures draw


@pytest.mark.slow
def test_compare_only_failed_or_nothing_is_one_line(like_runs, capsys):
    uri = like_runs["uri"]
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("like-test").experiment_id
    run = client.create_run(exp, tags={"policy": "full", "model": "tiny", "dataset": "synthetic", "suite": "bad"})
    client.set_terminated(run.info.run_id, "FAILED")
    assert main(["compare", "--filter", "tags.suite = 'bad'", "--tracking-uri", uri, "--no-log"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished training runs" in err and "1 FAILED" in err
    assert main(["compare", "--filter", "tags.suite = 'none-such'", "--tracking-uri", uri, "--no-log"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished training runs in any experiment" in err


def test_result_config_drops_the_seed_and_neutral_keys():
    params = {"trainer.seed": "3", "trainer.progress": "False", "tracking.run_name": "x", "trainer.output_dir": "o",
              "units.count": "4", "policy": "full", "optim.lr": "0.1", "trainer.epochs": "3"}
    assert result_config(params) == {"optim.lr": "0.1", "trainer.epochs": "3"}


def test_sweep_child_names_carry_swept_values():
    from freezebench.sweeps.runner import child_run_name

    cfg = load_config(["policy=smartfrz", "policy.window=40", "trainer.seed=0"])
    assert child_run_name(cfg, {"policy.window": 40, "policy": "smartfrz"}) == \
        "smartfrz-resnet20-digits-s0 window=40"
    assert child_run_name(cfg, {"optim.lr": 0.1, "trainer.seed": 0}) == "smartfrz-resnet20-digits-s0 optim.lr=0.1"


def test_labels_ignore_settings_a_policy_sets_itself():
    """SpFDE turns on sparsity and sieving itself (config_defaults): that is no difference to label; a
    sparsity switched on for `full` by hand is."""
    from freezebench.analysis.report import _label_keys

    spfde = {"sparsity.enabled": "True", "data.sieve.enabled": "True", "optim.lr": "0.1"}
    full = {"sparsity.enabled": "False", "data.sieve.enabled": "False", "optim.lr": "0.1"}
    assert _label_keys([("spfde", spfde), ("full", full), ("static", {**full, "optim.lr": "0.2"})], []) == ["optim.lr"]
    assert _label_keys([("full", full), ("full", {**full, "sparsity.enabled": "True"})], []) == ["sparsity.enabled"]
