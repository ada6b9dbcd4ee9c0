"""End-to-end behaviour of the trainer: learning, accounting, tracking, failures."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from freezebench.config import load_config
from freezebench.errors import NonFiniteLossError
from freezebench.trainer import Trainer, lr_factor


def test_digits_full_training_learns_and_is_tracked(mlflow_uri):
    cfg = load_config(["model.name=tiny", "trainer.epochs=4", "trainer.progress=false", "optim.lr=0.1",
                       "tracking.system_metrics=false", "trainer.device=cpu"])
    result = Trainer(cfg).fit()
    m = result.metrics
    assert m["val/acc"] > 0.7
    assert len(result.history) == 4
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "full-tiny-digits-s0"
    for key in ["train/loss", "train/acc", "val/loss", "val/acc", "time/epoch_s", "time/policy_s",
                "cost/tflops", "cost/tflops_full", "freeze/frozen_units", "freeze/frozen_param_frac",
                "mem/peak_mb"]:
        assert key in run.data.metrics, key
    assert run.data.tags["policy"] == "full" and run.data.tags["model"] == "tiny"
    assert run.data.tags["dataset"] == "digits" and run.data.tags["seed"] == "0"
    assert run.data.params["trainer.epochs"] == "4" and run.data.params["policy.name"] == "full"
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "freeze_events.csv", "freeze_events.json", "freeze_timeline.png",
            "summary.json", "units.txt", "checkpoints"} <= arts
    # full training: spent == full cost, per-epoch cost adds up
    assert m["cost/tflops"] == pytest.approx(m["cost/tflops_full"])
    assert m["cost/tflops"] == pytest.approx(sum(h["cost/tflops_epoch"] for h in result.history))


def test_static_freezing_saves_exactly_what_the_cost_model_says(mlflow_uri, tiny_overrides):
    cfg = load_config([*tiny_overrides, "policy=static", "policy.at_step=4", "policy.units=1",
                       "tracking.enabled=false"])
    tr = Trainer(cfg)
    res = tr.fit()
    spe, bs = tr.plan.steps_per_epoch, cfg.data.batch_size
    full = tr.cost.full_step_flops * bs
    frozen = tr.cost.step_flops({0}) * bs
    assert res.events[0].step == 4 and res.events[0].unit == 0 and res.events[0].epoch == 1.0
    expected = (spe * full + 2 * spe * frozen) / 1e12
    assert res.metrics["cost/tflops"] == pytest.approx(expected)
    assert res.metrics["cost/tflops_full"] == pytest.approx(3 * spe * full / 1e12)
    assert res.metrics["freeze/frozen_param_frac"] == pytest.approx(tr.units[0].num_params / tr.freezer.total_params)


def test_runs_are_deterministic(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([*tiny_overrides, "policy=static", "policy.at_step=2", "tracking.enabled=false"])
    a, b = Trainer(cfg), Trainer(cfg)
    ra, rb = a.fit(), b.fit()
    assert ra.metrics["train/loss"] == rb.metrics["train/loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_non_finite_loss_fails_the_run(mlflow_uri, tiny_overrides):
    cfg = load_config([*tiny_overrides, "optim.lr=1e30", "trainer.check_finite_every=1", "trainer.epochs=2"])
    tr = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        tr.fit()
    run = mlflow.tracking.MlflowClient().get_run(tr.tracker.run_id)
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["error"]


def test_attaches_to_the_run_mlflow_run_created(mlflow_uri, tiny_overrides, monkeypatch):
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("attach") or client.get_experiment(client.create_experiment("attach"))
    run = client.create_run(exp.experiment_id)
    client.log_param(run.info.run_id, "policy", "static")  # as MLproject does
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    res = Trainer(load_config([*tiny_overrides, "policy=static"])).fit()
    assert res.run_id == run.info.run_id
    got = client.get_run(run.info.run_id)
    assert got.data.params["policy"] == "static" and got.data.params["policy.name"] == "static"
    assert got.info.status == "FINISHED"


def test_cosine_schedule_with_warmup():
    cfg = load_config(["schedule.warmup_epochs=1"]).schedule
    assert lr_factor(cfg, 0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 55, 10, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    step = load_config(["schedule.name=step", "schedule.milestones=[2,4]", "schedule.gamma=0.5"]).schedule
    assert [lr_factor(step, s, 10, 60) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]


def test_per_unit_lr_override_replaces_the_schedule(tiny_overrides, tmp_path, monkeypatch):
    from freezebench.policy import Decision

    monkeypatch.chdir(tmp_path)
    tr = Trainer(load_config([*tiny_overrides, "tracking.enabled=false"]))
    tr._set_lr(0)
    tr.apply(Decision(lr_scale={0: 0.25}), step=0)
    lrs = {g["unit"]: g["lr"] for g in tr.optimizer.param_groups}
    assert lrs[0] == pytest.approx(0.25 * tr.cfg.optim.lr)
    assert lrs[1] == pytest.approx(tr.cfg.optim.lr)  # cosine at step 0
    tr.apply(Decision(lr_scale={0: None}), step=0)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(tr.cfg.optim.lr)


def test_activation_signal_shapes(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tr = Trainer(load_config([*tiny_overrides, "tracking.enabled=false"]))
    acts = tr.unit_activations([0, 1, 2])
    assert acts[0].shape == (16, 8 * 8 * 8) and acts[2].shape == (16, 4)
    assert tr.model.training  # back in training mode


def test_bf16_autocast_on_cpu(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = Trainer(load_config([*tiny_overrides, "trainer.precision=bf16", "tracking.enabled=false"])).fit()
    assert math.isfinite(res.metrics["train/loss"])


def test_fp16_needs_cuda(tiny_overrides):
    from freezebench.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        Trainer(load_config([*tiny_overrides, "trainer.precision=fp16", "tracking.enabled=false"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_with_amp_and_channels_last(precision, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tr = Trainer(load_config([*tiny_overrides, "trainer.device=cuda", f"trainer.precision={precision}",
                              "trainer.channels_last=true", "policy=static", "policy.at_step=2",
                              "tracking.enabled=false"]))
    res = tr.fit()
    assert math.isfinite(res.metrics["train/loss"]) and res.metrics["mem/peak_mb"] > 0
    assert tr.freezer.frozen
