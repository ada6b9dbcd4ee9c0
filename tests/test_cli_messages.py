"""What the command line says and leaves behind: run endings that point to the UI, numbers that read right,
overrides anywhere, one default policy, progress, nothing left behind (issue 17)."""

from __future__ import annotations

import glob
import io
import os
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from freezebench import messages, progress
from freezebench.cli import DEFAULT_POLICY, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
BASE = ["trainer.progress=false", "tracking.system_metrics=false", "trainer.device=cpu"]


def screen(text: str) -> list[str]:
    """What a terminal shows for ``text``: ``\\r`` returns to the line's start, later characters overwrite."""
    lines, cur, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    lines.append("".join(cur).rstrip())
    return lines


# --- overrides anywhere, public helpers, plug-in commands ----------------------------------------------------

def test_overrides_after_options_join_the_overrides_in_order():
    a = parse_args(["train", "a=1", "--config", "digits_resnet20", "b=2", "--debug", "c=3"])
    assert a.overrides == ["a=1", "b=2", "c=3"] and a.config == "digits_resnet20" and a.debug
    s = parse_args(["sweep", "window", "--study", "X", "trainer.epochs=3", "--seeds", "0,1", "optim.lr=0.1"])
    assert (s.space, s.study, s.seeds, s.overrides) == ("window", "X", "0,1", ["trainer.epochs=3", "optim.lr=0.1"])


@pytest.mark.parametrize("argv", [["train", "--nope"], ["list", "a=1"], ["train", "a=1", "--config", "c", "stray"]])
def test_other_leftovers_are_still_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_split_overrides_is_public_and_the_sweeps_use_it():
    from freezebench.config import split_overrides

    assert split_overrides(["a=1 b=2", "c=3", "", "d='x y'"]) == ["a=1", "b=2", "c=3", "d=x y"]
    for f in ("sweeps/cli.py", "sweeps/suite.py"):
        assert "_split_overrides" not in (ROOT / f).read_text()


def test_predictor_is_a_plugin_command():
    eps = {e.name: e.value for e in entry_points(group="freezebench.commands")}
    assert eps["predictor"] == "freezebench.predictors.cli:register"
    assert "predictor" not in (ROOT / "freezebench" / "cli.py").read_text().split("def parse_args")[0].split(
        "_parser(")[1].split("_plugin_commands(sub")[0]  # the core parser adds no predictor sub-parser
    a = parse_args(["predictor", "evaluate", "d1.pt", "d2.pt", "--weights", "w.pt"])
    assert a.datasets == ["d1.pt", "d2.pt"] and a.weights == "w.pt"
    assert a.handler.__module__ == "freezebench.predictors.cli"


# --- one default policy ----------------------------------------------------------------------------------------

def test_one_default_policy_for_train_and_mlflow_run(capsys):
    import yaml

    from freezebench.config import load_config

    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    assert mlproject["entry_points"]["main"]["parameters"]["policy"]["default"] == DEFAULT_POLICY == "full"
    assert load_config([]).policy.name == DEFAULT_POLICY
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "Default policy: full" in " ".join(capsys.readouterr().out.split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "The default policy is `full`" in readme


# --- numbers that read right --------------------------------------------------------------------------------

def test_unit_counts_and_positions_read_right():
    assert messages.frozen_text(19, 19) == "19 of 19 freezable units (the head trains)"
    assert messages.position_text(1, 2, 3, 4) == "epoch 2/3, after batch 2 of 4"  # stop and resume alike
    line = messages.epoch_line(2, 10, 0.5, 0.9, 3, 19, 1.0, 0.1, elapsed_s=40.0)
    assert "frozen 3 of 19" in line and line.endswith("ETA 2m40s")  # 8 epochs left at 20 s each
    assert "ETA" not in messages.epoch_line(10, 10, 0.5, 0.9, 3, 19, 1.0, 0.1, elapsed_s=40.0)


def test_stop_and_resume_name_the_same_position(tiny_overrides, tmp_path, caplog):
    from freezebench.config import load_config
    from freezebench.trainer import Trainer

    from helpers import StopAt

    over = [*tiny_overrides, "tracking.enabled=false", f"trainer.output_dir={tmp_path}", "tracking.run_name=run"]
    t = Trainer(load_config(over), hooks=[StopAt(6)])
    with pytest.raises(Exception) as e:
        t.fit()
    where = "epoch 2/3, after batch 2 of 4"
    assert f"stopped at step 6 ({where})" in str(e.value)
    with caplog.at_level("WARNING"):
        Trainer(load_config([*over, f"resume={tmp_path / 'run' / 'last.pt'}"]))
    assert f"at step 6 ({where})" in caplog.text


def test_error_line_is_not_printed_over_the_progress_bar(capsys, mlflow_uri):
    code = main(["train", "model.name=tiny", "optim.lr=1e30", "trainer.check_finite_every=1", "trainer.epochs=1",
                 "trainer.progress=true", "tracking.system_metrics=false", "trainer.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "epoch 1/1" in err  # a bar was drawn
    [line] = [ln for ln in screen(err) if "non-finite" in ln]
    assert line.startswith("freezebench: error: non-finite training loss")


def test_freeze_timeline_marks_a_late_freeze_at_its_step():
    from freezebench.analysis.plots import freeze_timeline

    events = [{"unit": 1, "step": 448, "epoch": 448 / 45, "action": "freeze"}]
    fig = freeze_timeline(["a", "b", "head"], events, 10, steps_per_epoch=45)
    [marks] = [c for c in fig.axes[0].collections if len(c.get_offsets())]
    assert marks.get_offsets().tolist() == [[448 / 45, 1.0]]


# --- the end of a run points to the UI ------------------------------------------------------------------------

def test_ui_urls_and_command():
    uri = "sqlite:///mlflow.db"
    assert messages.ui_command(uri) == f"mlflow ui --backend-store-uri sqlite:///{Path('mlflow.db').resolve()}"
    assert messages.runs_page_url(uri, "3") == "http://127.0.0.1:5000/#/experiments/3/runs"
    assert messages.run_url("http://host:5000/", "3", "abc") == "http://host:5000/#/experiments/3/runs/abc"
    assert messages.ui_command("http://host:5000") is None


def test_the_runs_page_route_exists_in_the_installed_mlflow_ui():
    import mlflow

    bundles = glob.glob(os.path.join(os.path.dirname(mlflow.__file__), "server/js/build/static/js/main*.js"))
    if not bundles:
        pytest.skip("this mlflow has no built UI")
    js = Path(bundles[0]).read_text(errors="replace")
    assert '"/experiments/:experimentId/runs"' in js and '"/experiments/:experimentId/runs/:runUuid"' in js


def test_train_ends_with_the_run_the_command_and_the_urls(capsys, mlflow_uri, tiny_overrides):
    import mlflow

    assert main(["train", *tiny_overrides, "policy=static", "tracking.run_name=ending"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    run = mlflow.tracking.MlflowClient(mlflow_uri).search_runs(
        [mlflow.tracking.MlflowClient(mlflow_uri).get_experiment_by_name("freezebench").experiment_id],
        "attributes.run_name = 'ending'")[0]
    rid, eid = run.info.run_id, run.info.experiment_id
    path = mlflow_uri[len("sqlite:///"):]
    assert out[-4:] == [
        f"MLflow run ending ({rid}) in {mlflow_uri}",
        f"open the UI with: mlflow ui --backend-store-uri sqlite:///{Path(path).resolve()}",
        f"  training runs: http://127.0.0.1:5000/#/experiments/{eid}/runs",
        f"  this run:      http://127.0.0.1:5000/#/experiments/{eid}/runs/{rid}",
    ]
    assert "frozen: 1 of 2 freezable units (the head trains)" in out[-6]


# --- nothing left behind ----------------------------------------------------------------------------------------

def test_offline_download_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(tvu, "download_url", offline)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "data.name=cifar10", "data.download=true", "data.root=./data/cifar", "model.name=tiny",
                 "tracking.enabled=false", *BASE])
    assert code == 2 and "could not download cifar10" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_config_error_under_mlflow_run_names_and_tags_the_run(mlflow_uri, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id, run_name="skillful-wren-365")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert main(["train", "policy=nope", "model.name=tiny", "trainer.seed=3", *BASE]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["mlflow.runName"] == "nope-tiny-digits-s3"
    assert tags["error"].startswith("UnknownNameError: unknown policy 'nope'")


def test_untracked_run_draws_no_figure(tiny_overrides, monkeypatch):
    from freezebench.analysis import plots
    from freezebench.config import load_config
    from freezebench.trainer import Trainer

    def boom(*a, **k):
        raise AssertionError("figure drawn for an untracked run")

    monkeypatch.setattr(plots, "freeze_timeline", boom)
    Trainer(load_config([*tiny_overrides, "tracking.enabled=false", "trainer.save_checkpoint=false",
                         "trainer.checkpoint_every=0", "trainer.epochs=1"])).fit()


# --- progress ---------------------------------------------------------------------------------------------------

def test_progress_is_quiet_off_a_terminal(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    buf = io.StringIO()
    assert not progress.enabled(buf)
    with progress.Progress(5, 0, "sweep", unit="trial", file=buf) as p:
        p.advance()
        p.describe("trial 1")
    assert buf.getvalue() == ""
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.enabled(buf)
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.enabled(buf)


def test_progress_shows_done_of_total_and_the_current_item():
    buf = io.StringIO()
    bar = progress.start(5, 1, "sweep window", unit="trial", enable=True, file=buf)
    progress.describe("trial 2 [policy.window=30 seed=0]")
    progress.advance_to(3)
    shown = screen(buf.getvalue())[-1]
    bar.close()
    assert "sweep window" in shown and "3/5" in shown and "trial 2 [policy.window=30 seed=0]" in shown
    progress.advance()  # no task open: a no-op
    assert progress.format_duration(75) == "1m15s" and progress.format_duration(3725) == "1h02m"
    assert progress.eta_seconds(30.0, 3, 5) == 20.0 and progress.eta_seconds(1.0, 0, 5) is None


def test_phase_lines_only_when_asked(monkeypatch, capsys):
    monkeypatch.delenv(progress.PHASES_ENV, raising=False)
    progress.phase("x")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(progress.PHASES_ENV, "1")
    progress.phase("train-start")
    assert re.fullmatch(r"freezebench-phase train-start \d+\.\d{6} \d+\.\d{4}\n", capsys.readouterr().err)


@pytest.mark.slow
def test_mlflow_run_config_error_leaves_a_named_tagged_run(tmp_path):
    """The real `mlflow run .`: a bad policy leaves MLflow's run FAILED, named by freezebench, tagged error."""
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(leaked, None)
    p = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-P", "policy=nope",
                        "-P", "model=tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "unknown policy 'nope'" in p.stderr
    client = mlflow.tracking.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.runName"] == "nope-tiny-digits-s0"
    assert "unknown policy 'nope'" in run.data.tags["error"]
