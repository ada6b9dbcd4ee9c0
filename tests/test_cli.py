"""The command line on bad input: one clear line, no traceback, non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from freezebench.cli import _split_overrides, main

BASE = ["trainer.progress=false", "tracking.system_metrics=false", "trainer.device=cpu"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["policy=nope"], "unknown policy 'nope'"),
        (["model.name=resnet2000"], "unknown model 'resnet2000'"),
        (["data.name=mnist"], "unknown dataset 'mnist'"),
        (["trainer.epochs=three"], "trainer.epochs"),
        (["optim.lrr=0.1"], "Did you mean 'optim.lr'"),
        (["data.name=cifar10", "data.root=/nonexistent/cifar"], "cifar10 not found under /nonexistent/cifar"),
        (["data.name=imagefolder", "data.root=/nonexistent/imgs"], "imagefolder needs"),
        (["model.checkpoint=/nonexistent/w.pt", "model.name=tiny"], "/nonexistent/w.pt"),
    ],
)
def test_bad_input_is_one_clear_line(args, fragment, capsys, mlflow_uri):
    code = main(["train", *args, *BASE])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert err.startswith("freezebench: error: ")


def test_non_finite_loss_exit_code(capsys, mlflow_uri):
    code = main(["train", "model.name=tiny", "optim.lr=1e30", "trainer.check_finite_every=1",
                 "trainer.epochs=1", *BASE])
    assert code == 2
    assert "non-finite training loss" in capsys.readouterr().err


def test_debug_shows_the_traceback(mlflow_uri):
    with pytest.raises(Exception, match="unknown policy"):
        main(["--debug", "train", "policy=nope"])


def test_list_and_config(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "static" in out and "resnet20" in out and "digits" in out
    assert main(["config", "policy=static", "policy.fraction=0.3"]) == 0
    assert "fraction: 0.3" in capsys.readouterr().out


def test_overrides_string_is_split():
    assert _split_overrides(["a=1 b=2", "c=3", "", "d='x y'"]) == ["a=1", "b=2", "c=3", "d=x y"]


def test_module_entry_point_exit_status(tmp_path):
    """The real process: exit status 2, the message, no traceback."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    p = subprocess.run([sys.executable, "-m", "freezebench", "train", "policy=nope"], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 2
    assert "unknown policy 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_predictor_collect_train_evaluate_commands(tmp_path, capsys, monkeypatch, mlflow_uri):
    tiny = ["model.name=tiny", "data.name=synthetic", "data.synthetic_samples=160", "data.batch_size=16",
            "trainer.epochs=3", "trainer.max_steps_per_epoch=4", "trainer.device=cpu"]
    opts = ["--tailor-size", "64", "--record-every", "1", "--checks-per-epoch", "2", "--window-epochs", "1",
            "--var-threshold", "1.0", "--cutoff", "-1.0"]
    for name, seeds in (("a", "0,1"), ("b", "2,3")):
        assert main(["predictor", "collect", *tiny, "--seeds", seeds, "--out", f"{name}.pt", "--run-id", name,
                     *opts]) == 0
    assert main(["predictor", "train", "a.pt", "--val", "b.pt", "--window", "3", "--tailor-size", "32",
                 "--out", "p.pt", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "validation: accuracy" in out and (tmp_path / "p.pt").is_file()
    from freezebench.predictors.weights import load_predictor

    _, meta = load_predictor(tmp_path / "p.pt", window=3, tailor_size=32)
    assert meta["provenance"]["val_runs"] == ["b-s2", "b-s3"]
    import mlflow

    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("freezebench-predictor")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'predictor-collect'")
    assert {r.data.tags["mlflow.runName"] for r in runs} >= {"collect-a", "collect-b"}
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "dataset")]
    assert main(["predictor", "evaluate", "b.pt", "--weights", "p.pt"]) == 0
    assert "b-s2" in capsys.readouterr().out
    # bad input is one clear line
    assert main(["predictor", "train", "missing.pt", "--val", "b.pt", "--out", "q.pt"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["predictor", "collect", *tiny, "--seeds", "1", "--out", "c.pt"]) == 2
    assert "exactly two seeds" in capsys.readouterr().err
