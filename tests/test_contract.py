"""Contract tests, parametrised over every registered policy (the registry is the test matrix).

A policy registered without an entry in SETTINGS fails here visibly. Each entry gives the overrides that
make the policy freeze something within a few steps on the tiny model, and whether it must freeze.
"""

from __future__ import annotations

import csv
import io

import mlflow
import pytest
import torch

from freezebench.config import load_config
from freezebench.errors import TrainingInterrupted
from freezebench.registry import POLICIES
from freezebench.trainer import Trainer
from helpers import StopAt, assert_freeze_invariants, assert_state_equal

SETTINGS: dict[str, dict] = {
    "full": {"overrides": [], "freezes": False},
    "static": {"overrides": ["policy.at_step=3", "policy.fraction=1.0"], "freezes": True},
    "freezeout_linear": {"overrides": [], "freezes": True},
    "freezeout_cubic": {"overrides": [], "freezes": True},
    "pipetransformer": {"overrides": [], "freezes": True},
    "autofreeze": {"overrides": [], "freezes": True},
    "svcca": {"overrides": ["policy.threshold=0.5", "policy.patience=1", "policy.checks_per_epoch=4"],
              "freezes": True},
    # {reference}: the checkpoint of a `full` run of the same tiny model (fixture below)
    "cka_oracle": {"overrides": ["policy.reference={reference}", "policy.checks_per_epoch=4",
                                 "policy.window_epochs=0.25", "policy.var_threshold=1.0", "policy.cutoff=-1.0"], "freezes": True},
    # {weights}: a predictor file that always predicts "freeze" (fixture below)
    "smartfrz": {"overrides": ["policy.weights={weights}", "policy.window=2", "policy.record_every=1"],
                 "freezes": True},
    # inline reference (reproducible); every check is within tolerance once two plasticity values exist
    "egeria": {"overrides": ["policy.asynchronous=false", "policy.checks_per_epoch=4", "policy.window=2",
                             "policy.patience=1", "policy.tolerance=1.0"], "freezes": True},
    # runs sparse and sieved (its config_defaults); a high target makes freezing start early enough
    "spfde": {"overrides": ["policy.target_flops_reduction=0.3", "policy.interval_epochs=0.25"], "freezes": True},
}


#: the fast tier runs one policy per mechanism; the slow tier (the README's full run, as CI) runs all of them
FAST_TIER = {
    "full",  # no decision
    "static",  # one decision before the first step
    "freezeout_linear",  # per-unit learning-rate factors on a schedule (freezeout_cubic, pipetransformer: slow)
    "autofreeze",  # gradient signals
    "svcca",  # probe-batch activations
    "cka_oracle",  # a reference model
    "egeria",  # a background reference, unfreezing
    "spfde",  # trainer features switched on by the policy (sparsity, sieve)
    "smartfrz",  # weight snapshots and a predictor
}
TIERED = [name if name in FAST_TIER else pytest.param(name, marks=pytest.mark.slow) for name in POLICIES.names()]


def test_every_registered_policy_has_contract_settings():
    missing = sorted(set(POLICIES.names()) - set(SETTINGS))
    assert not missing, f"add contract settings for {missing} in tests/test_contract.py"


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """Final weights of a `full` run of the tiny contract model (the CKA oracle's reference)."""
    from conftest import TINY

    out = tmp_path_factory.mktemp("reference")
    cfg = load_config([*TINY, "model.granularity=layer", "tracking.enabled=false", f"trainer.output_dir={out}"])
    trainer = Trainer(cfg)
    trainer.fit()
    return str(trainer.save_checkpoint(out / "ref.pt"))


def _norm_state(unit):
    return [b.clone() for m in unit.norm_modules for b in m.buffers()]


@pytest.mark.parametrize("name", TIERED)
def test_policy_contract(name, mlflow_uri, tiny_overrides, reference_checkpoint, always_freeze_predictor):
    setting = SETTINGS[name]
    overrides = [o.replace("{reference}", reference_checkpoint).replace("{weights}", always_freeze_predictor)
                 for o in setting["overrides"]]
    cfg = load_config([f"policy={name}", *tiny_overrides, "model.granularity=layer", *overrides])
    trainer = Trainer(cfg)
    initial = {id(p): p.detach().clone() for p in trainer.model.parameters()}
    at_freeze: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    freeze = trainer.freezer.freeze

    def spy(indices, step, epoch, reason=""):
        events = freeze(indices, step, epoch, reason)
        for ev in events:
            u = trainer.units[ev.unit]
            at_freeze[ev.unit] = ([p.detach().clone() for p in u.parameters], _norm_state(u))
        return events

    trainer.freezer.freeze = spy
    result = trainer.fit()
    frozen = trainer.freezer.frozen
    assert bool(frozen) == setting["freezes"]
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())

    assert_freeze_invariants(trainer, initial)
    for i in frozen:  # weights and BatchNorm running statistics did not move after the freeze
        params, norms = at_freeze[i]
        unit = trainer.units[i]
        assert all(torch.equal(a, b) for a, b in zip(params, unit.parameters))
        assert all(torch.equal(a, b) for a, b in zip(norms, _norm_state(unit)))

    # the events read back from MLflow match the decisions
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    text = open(client.download_artifacts(result.run_id, "freeze_events.csv")).read()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(int(r["unit"]), int(r["step"]), r["action"]) for r in rows] == [
        (e.unit, e.step, e.action) for e in trainer.freezer.events
    ]
    hist = client.get_metric_history(result.run_id, "freeze/frozen_units")
    assert hist[-1].value == len(frozen)

    # policy state round-trips
    state = trainer.policy.state_dict()
    clone = type(trainer.policy)(trainer.policy.cfg)
    clone.setup(trainer.units, trainer.plan)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)


TIMING = ("time/", "mem/")  # wall-clock figures differ between runs; everything else must not


def _untimed(h: dict) -> dict:
    """A history row without wall-clock figures (``time/*``, ``mem/*`` and seconds a policy reports, ``*_s``)."""
    return {k: v for k, v in h.items() if not (k.startswith(TIMING) or k.endswith("_s"))}


@pytest.mark.parametrize("name", TIERED)
def test_policy_resumes_exactly(name, tiny_overrides, tmp_path, reference_checkpoint, always_freeze_predictor):
    """Stopped mid-epoch (SIGTERM's path: checkpoint at the step boundary) and resumed from last.pt, a run ends
    with the weights, metrics, freeze events and policy state of an uninterrupted run, bit for bit."""
    setting = SETTINGS[name]
    overrides = [o.replace("{reference}", reference_checkpoint).replace("{weights}", always_freeze_predictor)
                 for o in setting["overrides"]]
    base = [f"policy={name}", *tiny_overrides, "model.granularity=layer", *overrides, "tracking.enabled=false",
            f"trainer.output_dir={tmp_path}", "trainer.save_checkpoint=false"]
    ref = Trainer(load_config([*base, "tracking.run_name=ref", "trainer.checkpoint_every=0"]))
    expected = ref.fit()

    cut = Trainer(load_config([*base, "tracking.run_name=cut"]), hooks=[StopAt(6)])  # mid epoch 2
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    resumed = Trainer(load_config([*base, "tracking.run_name=cut", "resume=auto"]))
    assert resumed.step == 6 and resumed.freezer.frozen == cut.freezer.frozen
    assert_state_equal(resumed.policy.state_dict(), cut.policy.state_dict())
    result = resumed.fit()

    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in ref.model.state_dict().items())
    assert [_untimed(h) for h in result.history] == [_untimed(h) for h in expected.history]
    assert result.events == expected.events
    assert_state_equal(resumed.policy.state_dict(), ref.policy.state_dict())
