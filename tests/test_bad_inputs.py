"""The last bad inputs of issue 14: each is one line, exit status 2, before any training and before any file or
folder is created; plus the divergence warning, the exactness record and the stale ``error`` tag."""

from __future__ import annotations

import mlflow
import pytest
import torch
from helpers import StopAt, one_line

from freezebench.cli import main
from freezebench.config import load_config
from freezebench.errors import CheckpointError
from freezebench.trainer import Trainer
from freezebench.trainer import checkpoint as ckpt


class NotATensor:
    """A pickled class: the safe loader refuses it, and PyTorch's message would advise weights_only=False."""


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the training loop is entered."""
    def boom(self, *args):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "train_epoch", boom)


@pytest.mark.parametrize("override, message", [
    ("data.train_subset=0", "data.train_subset must be >= 1, got 0"),
    ("data.train_subset=-1", "data.train_subset must be >= 1, got -1"),
    ("data.train_subset=5000", "data.train_subset=5000 is more than the 128 training samples of synthetic"),
    ("data.synthetic_samples=3", "data.synthetic_samples=3 is too few for 4 classes"),
    ("optim.lr=nan", "optim.lr must be positive, got nan"),
    ("optim.lr=inf", "optim.lr must be positive, got inf"),
    ("optim.lr=-0.1", "optim.lr must be positive, got -0.1"),
    ("policy.units=1000", "policy.units=1000 is more than the"),
])
def test_bad_values_are_one_line_before_anything_is_written(override, message, tiny_overrides, mlflow_uri, tmp_path,
                                                            capsys, no_training):
    extra = ["policy=static"] if override.startswith("policy.") else []
    line = one_line(capsys, main(["train", *tiny_overrides, *extra, override]))
    assert message in line, line
    assert list(tmp_path.iterdir()) == []  # no outputs/, no mlflow.db, nothing


def test_unwritable_output_dir_is_found_up_front(tiny_overrides, mlflow_uri, tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr("freezebench.trainer.loop.build_data", lambda *a, **k: built.append(1))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line(capsys, main(["train", *tiny_overrides, f"trainer.output_dir={blocker}/out"]))
    assert f"trainer.output_dir='{blocker}/out' cannot be created: '{blocker}' is a file" in line
    assert built == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # only the final weights written (no training checkpoints): still checked before training
    line = one_line(capsys, main(["train", *tiny_overrides, "trainer.checkpoint_every=0",
                                  f"trainer.output_dir={blocker}"]))
    assert "trainer.output_dir=" in line and built == []


def test_sqlite_uri_in_a_missing_folder_is_refused_and_not_created(tiny_overrides, tmp_path, monkeypatch, capsys,
                                                                  no_training):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "no" / "such" / "dir" / "mlflow.db"
    line = one_line(capsys, main(["train", *tiny_overrides, f"tracking.uri=sqlite:///{db}"]))
    assert f"the folder '{db.parent}' of the sqlite file does not exist" in line
    assert not (tmp_path / "no").exists() and list(tmp_path.iterdir()) == []


def test_garbage_pt_files_do_not_quote_pytorchs_weights_only_advice(tiny_overrides, tmp_path, capsys):
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": ckpt.FORMAT, "x": NotATensor()}, pickled)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02garbage" * 50)
    base = [*tiny_overrides, "tracking.enabled=false", f"trainer.output_dir={tmp_path / 'o'}"]
    for bad in (pickled, garbage):
        for key in ("resume", "model.checkpoint"):
            line = one_line(capsys, main(["train", *base, f"{key}={bad}"]))
            assert str(bad) in line and "cannot be read" in line
            assert "weights_only=False" not in line and "likely succeed" not in line, line
    line = one_line(capsys, main(["train", *base, "policy=smartfrz", f"policy.weights={pickled}"]))
    assert "weights_only=False" not in line and "cannot be read" in line


def test_resumed_run_that_finishes_loses_the_stale_error_tag(tiny_overrides, mlflow_uri, tmp_path):
    args = [*tiny_overrides, "tracking.run_name=stale", f"trainer.output_dir={tmp_path / 'o'}"]
    t = Trainer(load_config(args), hooks=[StopAt(6)])
    with pytest.raises(Exception, match="stopped at step 6"):
        t.fit()
    client = mlflow.tracking.MlflowClient()
    run_id = t.tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"].startswith("TrainingInterrupted")
    result = Trainer(load_config([*args, "resume=auto"])).fit()
    run = client.get_run(run_id)
    assert result.run_id == run_id and run.info.status == "FINISHED" and "error" not in run.data.tags


def test_divergence_is_tagged_and_warned(tiny_overrides, mlflow_uri, capsys):
    """AdamW at lr 1000: the loss stays finite, the accuracy ends at chance."""
    result = Trainer(load_config([*tiny_overrides, "optim.name=adamw", "optim.lr=1000",
                                  "trainer.save_checkpoint=false"])).fit()
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["diverged"] == "true"
    import json

    summary = json.load(open(client.download_artifacts(result.run_id, "summary.json")))
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("training diverged")
    assert "training diverged" in capsys.readouterr().err
    healthy = Trainer(load_config([*tiny_overrides, "trainer.save_checkpoint=false"])).fit()
    assert "diverged" not in client.get_run(healthy.run_id).data.tags  # near chance after 12 steps, loss < ln C


def test_divergence_rule():
    from freezebench.trainer.reliability import chance_accuracy, divergence

    assert chance_accuracy(4, 32) == pytest.approx(0.25 + 3 * (0.25 * 0.75 / 32) ** 0.5)
    assert divergence({"val/acc": 0.25, "train/loss": 235.8}, 4, 32).startswith("training diverged")
    assert divergence({"val/acc": 0.25, "train/loss": 1.2}, 4, 32) is None  # not learnt yet, not diverged
    assert divergence({"val/acc": 0.9, "train/loss": 5.0}, 4, 32) is None
    assert divergence({"val/acc": 0.25, "train/loss": float("inf")}, 4, 32) is None  # NonFiniteLossError's job


def test_exactness_mismatch_is_one_line_and_refused_under_deterministic(tiny_overrides, tmp_path, capsys):
    args = [*tiny_overrides, "tracking.enabled=false", "tracking.run_name=ex", f"trainer.output_dir={tmp_path}"]
    torch.set_num_threads(2)  # (1 in an xdist worker: tests/helpers.py THREADS)
    t = Trainer(load_config(args), hooks=[StopAt(6)])
    with pytest.raises(Exception, match="stopped at step 6"):
        t.fit()
    last = tmp_path / "ex" / "last.pt"
    assert ckpt.read(last)["exactness"] == {"threads": 2, "device": "cpu", "torch": torch.__version__}
    torch.set_num_threads(1)
    line = one_line(capsys, main(["train", *args, "resume=auto"]))
    assert "is not bit-exact: threads 2 in the checkpoint, 1 now" in line
    assert "trainer.allow_inexact_resume=true" in line
    assert main(["train", *args, "resume=auto", "trainer.allow_inexact_resume=true"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "not bit-exact" in ln]
    assert len(warned) == 1 and warned[0].startswith("freezebench: warning: ")
    with pytest.raises(CheckpointError, match="not bit-exact"):  # the library refuses too
        ckpt.check_exactness({"exactness": {"threads": 2, "device": "cpu", "torch": torch.__version__}}, last,
                             "cpu", deterministic=True, allow=False)
    assert ckpt.check_exactness({"exactness": {"threads": 1, "device": "cpu", "torch": torch.__version__}}, last,
                                "cpu", deterministic=True, allow=False) is None
