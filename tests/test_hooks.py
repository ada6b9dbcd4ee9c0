"""Trainer hooks (freezebench.trainer.hooks): events, generic resume of hook state, the grad-norm hook."""

from __future__ import annotations

import pytest
import torch

from freezebench.config import load_config
from freezebench.errors import CheckpointError, ConfigError, TrainingInterrupted
from freezebench.features.grad_norm import METRIC, GradNormHook
from freezebench.trainer import Trainer
from freezebench.trainer import checkpoint as ckpt
from freezebench.trainer.hooks import Hook
from helpers import StopAt, assert_state_equal

TIMING = ("time/", "mem/")


def _untimed(h: dict) -> dict:
    return {k: v for k, v in h.items() if not k.startswith(TIMING)}


def _base(tiny_overrides, tmp_path, *extra):
    return [*tiny_overrides, "tracking.enabled=false", f"trainer.output_dir={tmp_path}", "tracking.run_name=run",
            "trainer.save_checkpoint=false", *extra]


class Recorder(Hook):
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_fit_start(self, trainer):
        self.events.append(("start", trainer.step))

    def after_step(self, trainer, step, losses, idx):
        self.events.append(("step", step, tuple(losses.shape), tuple(idx.shape)))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("epoch", epoch, metrics["recorder/steps"]))

    def on_fit_end(self, trainer, result, error):
        self.events.append(("end", result is not None, type(error).__name__ if error else None))

    def epoch_metrics(self):
        return {"recorder/steps": float(sum(1 for e in self.events if e[0] == "step"))}


def test_hook_events_in_order_and_metrics_merged(tiny_overrides, tmp_path):
    rec = Recorder()
    t = Trainer(load_config(_base(tiny_overrides, tmp_path)), hooks=[rec])
    result = t.fit()
    steps = [("step", s, (16,), (16,)) for s in range(1, 13)]
    expect = [("start", 0), *steps[:4], ("epoch", 0, 4.0), *steps[4:8], ("epoch", 1, 8.0), *steps[8:],
              ("epoch", 2, 12.0), ("end", True, None)]
    assert rec.events == expect
    assert [h["recorder/steps"] for h in result.history] == [4.0, 8.0, 12.0]
    assert [h.name for h in t.hooks] == ["tracking", "stop_signal", "policy", "recorder"]


def test_hook_sees_the_error_and_the_run_fails(tiny_overrides, tmp_path):
    class Boom(Hook):
        name = "boom"

        def after_step(self, trainer, step, losses, idx):
            if step == 3:
                raise RuntimeError("boom at 3")

    rec = Recorder()
    t = Trainer(load_config(_base(tiny_overrides, tmp_path, "trainer.checkpoint_every=0")), hooks=[rec, Boom()])
    with pytest.raises(RuntimeError, match="boom at 3"):
        t.fit()
    assert rec.events[-1] == ("end", False, "RuntimeError")


def test_duplicate_hook_names_are_refused(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="two trainer hooks are named 'policy'"):
        Trainer(load_config(_base(tiny_overrides, tmp_path)), hooks=[type("P", (Hook,), {"name": "policy"})()])


@pytest.mark.slow
def test_grad_norm_metric_is_the_mean_step_gradient_norm(tiny_overrides, tmp_path):
    class Reference(Hook):  # the same figure, computed another way: one flat float64 vector per step
        name = "reference"

        def __init__(self):
            self.per_step: list[float] = []

        def after_step(self, trainer, step, losses, idx):
            g = torch.cat([p.grad.flatten().double() for p in trainer.model.parameters() if p.grad is not None])
            self.per_step.append(float(g.norm()))

    ref = Reference()
    t = Trainer(load_config(_base(tiny_overrides, tmp_path, "trainer.grad_norm_metric=true", "policy=static",
                                  "policy.at_step=6")), hooks=[ref])
    assert any(isinstance(h, GradNormHook) for h in t.hooks)
    result = t.fit()
    assert len(ref.per_step) == 12
    for e, h in enumerate(result.history):
        mean = sum(ref.per_step[4 * e: 4 * e + 4]) / 4
        # per-parameter norms are float32 in the hook (torch._foreach_norm), float64 in the reference
        assert h[METRIC] == pytest.approx(mean, rel=1e-6)
    assert result.history[0][METRIC] > 0
    off = Trainer(load_config(_base(tiny_overrides, tmp_path, "tracking.run_name=off"))).fit()
    assert METRIC not in off.history[-1]
    # the metric observes: the training is the same with it on or off
    plain = Trainer(load_config(_base(tiny_overrides, tmp_path, "tracking.run_name=x", "policy=static",
                                      "policy.at_step=6"))).fit()
    assert [_untimed({k: v for k, v in h.items() if k != METRIC}) for h in result.history] == \
        [_untimed(h) for h in plain.history]


@pytest.mark.slow
def test_hook_state_resumes_generically_mid_epoch(tiny_overrides, tmp_path):
    """The grad-norm hook's partial epoch sum is stored under its name and restored: a run stopped mid-epoch
    logs the same per-epoch means as an uninterrupted one (CPU, deterministic: exactly)."""
    over = _base(tiny_overrides, tmp_path, "trainer.grad_norm_metric=true")
    expected = Trainer(load_config([*over, "tracking.run_name=ref", "trainer.checkpoint_every=0"])).fit()
    cut = Trainer(load_config(over), hooks=[StopAt(6)])
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    payload = ckpt.read(tmp_path / "run" / "last.pt")
    assert set(payload["hooks"]) == {"grad_norm"} and payload["hooks"]["grad_norm"]["steps"] == 2
    resumed = Trainer(load_config([*over, "resume=auto"]))
    assert_state_equal(resumed.hooks[-1].state_dict(), cut.hooks[-2].state_dict())
    result = resumed.fit()
    assert [_untimed(h) for h in result.history] == [_untimed(h) for h in expected.history]
    # a checkpoint whose stateful hooks differ from this run's is refused with one line
    cut2 = Trainer(load_config([*over, "tracking.run_name=cut2"]), hooks=[StopAt(6)])
    with pytest.raises(TrainingInterrupted):
        cut2.fit()
    path = tmp_path / "cut2" / "last.pt"
    payload = ckpt.read(path)
    del payload["hooks"]["grad_norm"]
    ckpt.write(payload, path)
    with pytest.raises(CheckpointError, match="grad_norm is off in the checkpoint but on in this run's config"):
        Trainer(load_config([*over, "tracking.run_name=cut2", f"resume={path}"]))


def test_version_1_checkpoints_still_load(tiny_overrides, tmp_path):
    """A checkpoint in the layout before hooks (feature states at the top, no trainer.grad_norm_metric key in
    its config) resumes as before."""
    over = _base(tiny_overrides, tmp_path, "sparsity.enabled=true", "sparsity.sparsity=0.5")
    cut = Trainer(load_config(over), hooks=[StopAt(6)])
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    path = tmp_path / "run" / "last.pt"
    payload = ckpt.read(path)
    hooks = payload.pop("hooks")
    payload.update({"version": 1, "sparsity": hooks["sparsity"], "sieve": None})
    del payload["config"]["trainer.grad_norm_metric"]
    torch.save(payload, path)
    again = ckpt.read(path)
    assert again["version"] == ckpt.VERSION and "sparsity" not in again and "sieve" not in again
    assert_state_equal(again["hooks"], hooks)
    resumed = Trainer(load_config([*over, "resume=auto"]))
    assert resumed.step == 6
    assert_state_equal(resumed.sparsity.state_dict(), cut.sparsity.state_dict())
    # a key the old checkpoint lacks counts as its default: a run that sets it otherwise is another config
    with pytest.raises(CheckpointError, match="trainer.grad_norm_metric: checkpoint False, this run True"):
        Trainer(load_config([*over, "trainer.grad_norm_metric=true", f"resume={path}"]))
