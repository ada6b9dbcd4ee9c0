"""Paper suites: every shipped suite parses into valid sweeps; a tiny suite runs, resumes and reports."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from freezebench.cli import main
from freezebench.config import load_config
from freezebench.analysis.report import render
from freezebench.sweeps.runner import _validate_points
from freezebench.sweeps.space import SweepError
from freezebench.sweeps.suite import available_suites, load_suite, run_suite, stages



def test_the_paper_tables_are_shipped_with_scaled_variants():
    names = set(available_suites())
    for table in ("table1", "table2", "table3", "table8", "table9"):
        assert {table, f"{table}_digits"} <= names
    t2 = load_suite("table2")
    assert t2.policies == ["full", "freezeout_linear", "autofreeze", "smartfrz"]
    assert len(t2.space.grid()) == 3 * 2 * 4 and t2.space.seeds == (0, 1, 2)
    assert "trainer.epochs=10" in t2.space.overrides and "12,360" in t2.paper
    assert t2.paper_tflops == {"resnet50": 12360, "vgg11_bn": 22950, "mobilenet_v2": 960, "deit_tiny": 32400}
    assert "data.image_size=224" in t2.space.overrides
    t2d = load_suite("table2_digits")  # fine-tuning: a source on digits 0-4, 6 policies x 3 seeds on 5-9
    assert "trainer.epochs=10" in t2d.space.overrides and len(t2d.space.grid()) * len(t2d.space.seeds) == 18
    assert t2d.policies == ["full", "static", "freezeout_linear", "autofreeze", "smartfrz", "cka_oracle"]
    assert {"data.classes=[5,6,7,8,9]", "model.reinit_head=true"} <= set(t2d.space.overrides)
    assert t2d.source["overrides"] == ["data.classes=[0,1,2,3,4]"] and t2d.reference["seed"] == 100
    assert load_suite("table8").report["vary"] == ["policy.t0"]


@pytest.mark.parametrize("name", available_suites())
def test_every_suite_stage_is_a_valid_sweep(name):
    suite = load_suite(name)
    st = stages(suite, [], None)
    for study, space in st:
        _validate_points(space)  # every grid point makes a valid config
        assert f"tracking.tags.suite={suite.name}" in space.overrides or study.endswith("-reference")
    if suite.reference:
        assert [s for s, _ in st][0] == f"{suite.name}-reference"
        ref_space = st[0][1]
        assert ref_space.seeds == (suite.reference["seed"],)
        assert [list(p.grid_values()) for p in ref_space.params if p.key == "policy"] == [["full"]]
        # the referenced policy's points are valid once the reference is given
        cfg = load_config([*ref_space.overrides, *suite.reference["policy_overrides"], "policy=cka_oracle",
                           "policy.reference=runs:/0"])
        assert cfg.policy.name == "cka_oracle"


def test_bad_suites_are_one_line_errors(tmp_path):
    with pytest.raises(SweepError, match="unknown suite 'tabel2'.*Did you mean 'table2'"):
        load_suite("tabel2")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "params": {"policy": ["full"]}, "reprot": {}}))
    with pytest.raises(SweepError, match="unknown key 'reprot'.*Did you mean 'report'"):
        load_suite(str(bad))
    bad.write_text(yaml.safe_dump({"name": "bad", "params": {"policy": ["full"]}, "reference": {"key": "x"}}))
    with pytest.raises(SweepError, match="reference needs policy"):
        load_suite(str(bad))
    assert main(["suite", "tabel2"]) == 2


def _tiny_suite(tmp_path, uri, tiny, **extra) -> str:
    data = {"name": f"tiny-{tmp_path.name}"[:60], "description": "tiny suite",
            "overrides": [*tiny, f"tracking.uri={uri}", "tracking.experiment=suite-test", "trainer.save_checkpoint=false"],
            "params": {"policy": ["full", "static"]}, "seeds": [0, 1], "report": {"policies": ["full", "static"]}}
    data.update(extra)
    path = tmp_path / "tiny_suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
def test_a_suite_runs_resumes_and_reports(mlflow_uri, tmp_path, tiny_overrides):
    path = _tiny_suite(tmp_path, mlflow_uri, tiny_overrides)
    name = load_suite(path).name
    storage = f"sqlite:///{tmp_path}/optuna.db"
    report, folder, run_id = run_suite(path, storage=storage, out=str(tmp_path / "rep"), echo=None, plots=False)
    assert [(r.policy, r.seeds) for r in report.rows] == [("full", [0, 1]), ("static", [0, 1])]
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("suite-test").experiment_id], f"tags.suite = '{name}'")
    trained = [r for r in runs if r.data.tags.get("kind") == "sweep-trial"]
    assert sorted(r.info.run_name for r in trained) == [f"{p}-tiny-synthetic-s{s}" for p in ("full", "static") for s in (0, 1)]
    assert all(r.data.tags.get("mlflow.parentRunId") for r in trained)  # children of the sweep's parent run
    assert {r.info.run_id for r in trained} == {i for row in report.rows for i in row.run_ids}
    rep_run = client.get_run(run_id)
    assert rep_run.info.run_name == f"report-{name}" and rep_run.data.tags["suite"] == name
    assert (folder / "table.md").read_text() == render(report, "md")
    # resuming: the study is complete, nothing trains again, the report is the same runs
    report2, _, _ = run_suite(path, storage=storage, out=str(tmp_path / "rep2"), echo=None, plots=False)
    assert [r.run_ids for r in report2.rows] == [r.run_ids for r in report.rows]


@pytest.mark.slow
def test_a_suite_with_a_reference_trains_it_first(mlflow_uri, tmp_path, tiny_overrides):
    path = _tiny_suite(tmp_path, mlflow_uri, tiny_overrides, params={"policy": ["full", "cka_oracle"]}, seeds=[0],
                       reference={"policy": "cka_oracle", "seed": 5, "overrides": ["trainer.save_checkpoint=true"]})
    name = load_suite(path).name
    report, _, _ = run_suite(path, storage=f"sqlite:///{tmp_path}/optuna.db", out=str(tmp_path / "rep"), echo=None,
                             plots=False)
    assert [(r.policy, r.seeds) for r in report.rows] == [("full", [0]), ("cka_oracle", [0])]
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("suite-test").experiment_id
    (ref,) = client.search_runs([exp], f"tags.suite = '{name}/reference'")
    assert ref.data.tags["policy"] == "full" and ref.data.tags["seed"] == "5"
    oracle = client.get_run(next(r for r in report.rows if r.policy == "cka_oracle").run_ids[0])
    assert oracle.data.params["policy.reference"] == f"runs:/{ref.info.run_id}"


@pytest.mark.slow
def test_a_suite_with_a_source_model_trains_it_once_and_fine_tunes_from_it(mlflow_uri, tmp_path, tiny_overrides):
    path = _tiny_suite(tmp_path, mlflow_uri, tiny_overrides, seeds=[0],
                       source={"seed": 5, "overrides": ["data.classes=[0,1]"]})
    data = yaml.safe_load(open(path))
    data["overrides"] += ["data.classes=[2,3]", "model.reinit_head=true"]
    open(path, "w").write(yaml.safe_dump(data))
    name = load_suite(path).name
    storage = f"sqlite:///{tmp_path}/optuna.db"
    report, _, _ = run_suite(path, storage=storage, out=str(tmp_path / "rep"), echo=None, plots=False)
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("suite-test").experiment_id
    sources = client.search_runs([exp], f"tags.suite = '{name}/source'")
    assert len(sources) == 1 and sources[0].data.params["data.classes"] == "[0, 1]"
    ckpt = f"outputs/suite-{name}/source-{sources[0].info.run_id}/final.pt"
    trained = client.search_runs([exp], f"tags.suite = '{name}' and tags.kind = 'sweep-trial'")
    assert len(trained) == 2 and {r.data.params["model.checkpoint"] for r in trained} == {ckpt}
    assert {r.data.params["data.classes"] for r in trained} == {"[2, 3]"}
    assert [(r.policy, r.seeds) for r in report.rows] == [("full", [0]), ("static", [0])]
    # again: nothing new is trained, the source included
    run_suite(path, storage=storage, out=str(tmp_path / "rep"), echo=None, plots=False)
    assert len(client.search_runs([exp], f"tags.suite = '{name}/source'")) == 1
