"""The SmartFRZ policy: predictor weight files, recording/stage cadence, freezing rule, state, a tiny run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from freezebench.config import load_config
from freezebench.errors import ConfigError, FreezebenchError
from freezebench.policy import Plan, Signals
from freezebench.predictors import policy as policy_mod
from freezebench.predictors.model import SmartFRZPredictor
from freezebench.predictors.policy import SmartFRZ, SmartFRZConfig, sequential_prefix
from freezebench.predictors.weights import DEFAULT_WEIGHTS, load_predictor, save_predictor
from freezebench.trainer import Trainer
from freezebench.units import partition
from helpers import assert_state_equal

TAILOR = 16


def _predictor(freeze: bool, tailor_size: int = TAILOR) -> SmartFRZPredictor:
    """A small predictor whose last layer always outputs the same class."""
    torch.manual_seed(0)
    m = SmartFRZPredictor(tailor_size=tailor_size, hidden=8, key_dim=4, z_hidden=4)
    last = m.mlp_z[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-10.0, 10.0] if freeze else [10.0, -10.0]))
    return m


def _save(tmp_path, freeze: bool, window: int = 3, tailor_size: int = TAILOR, name: str | None = None) -> str:
    path = tmp_path / (name or f"pred_{'freeze' if freeze else 'keep'}_w{window}_t{tailor_size}.pt")
    save_predictor(path, _predictor(freeze, tailor_size), metadata={"window": window, "provenance": {"test": True}})
    return str(path)


@pytest.fixture
def always(tmp_path):
    return _save(tmp_path, True)


@pytest.fixture
def never(tmp_path):
    return _save(tmp_path, False)


def _units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    return model, partition(model, torch.randn(2, 4)).units


def _make(weights, steps_per_epoch=6, **kw):
    model, units = _units()
    kw.setdefault("window", 3)
    kw.setdefault("tailor_size", TAILOR)
    pol = SmartFRZ(SmartFRZConfig(weights=weights, **kw))
    plan = Plan(epochs=2, steps_per_epoch=steps_per_epoch, batch_size=4, base_lr=0.1, seed=0)
    pol.setup(units, plan)
    return pol, model, units


def _tick(pol, model, units, step):
    """What the trainer does after a step: change the weights, observe and decide when due, apply."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    if pol.observe_at(step):
        pol.observe(step, Signals(step=step, epoch=step / pol.plan.steps_per_epoch, units=units))
    dec = pol.decide(step) if pol.decide_at(step) else None
    if dec:
        for u in dec.freeze:
            for p in units[u].parameters:
                p.requires_grad_(False)
        pol.notify_frozen(pol.frozen | frozenset(dec.freeze))
    return dec


# --- weight files -----------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    m = _predictor(True)
    path = save_predictor(tmp_path / "sub" / "p.pt", m, metadata={"window": 5, "provenance": {"runs": ["a", "b"]},
                                                                   "note": "x"})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"}
    meta = raw["meta"]
    assert meta["format_version"] == 1 and meta["tailor_size"] == TAILOR and meta["window"] == 5
    assert meta["norm"] == "standardize" and meta["provenance"] == {"runs": ["a", "b"]} and meta["note"] == "x"
    assert [p.name for p in path.parent.iterdir()] == ["p.pt"]  # no temporary file left
    loaded, meta2 = load_predictor(path, tailor_size=TAILOR, window=5)
    assert meta2 == meta and not loaded.training
    x = torch.randn(3, 5, TAILOR)
    assert torch.equal(loaded(x), m(x))


def test_save_rejects_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="window"):
        save_predictor(tmp_path / "p.pt", _predictor(True), metadata={})
    with pytest.raises(TypeError):
        save_predictor(tmp_path / "p.pt", _predictor(True), metadata={"window": 3, "provenance": {"t": object()}})
    with pytest.raises(ValueError, match="tailor_size"):
        save_predictor(tmp_path / "p.pt", _predictor(True), metadata={"window": 3, "tailor_size": 99})
    assert not list(tmp_path.iterdir())


def test_load_errors(tmp_path, always):
    with pytest.raises(ConfigError, match="do not exist"):
        load_predictor(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_predictor(bad)
    torch.save({"state_dict": {}}, tmp_path / "nometa.pt")
    with pytest.raises(ConfigError, match="'meta'"):
        load_predictor(tmp_path / "nometa.pt")
    torch.save({"state_dict": {}, "meta": {"format_version": 1, "norm": "none"}}, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="tailor_size, window"):
        load_predictor(tmp_path / "partial.pt")
    raw = torch.load(always, weights_only=True)
    raw["state_dict"].pop("mlp_q.0.weight")
    torch.save(raw, tmp_path / "short.pt")
    with pytest.raises(ConfigError, match="do not match their metadata"):
        load_predictor(tmp_path / "short.pt")


def test_load_mismatch_names_both_values(always):
    with pytest.raises(ConfigError) as e:
        load_predictor(always, tailor_size=1024, window=3)
    msg = str(e.value)
    assert f"tailor_size={TAILOR}" in msg and "tailor_size=1024" in msg and f"policy.tailor_size={TAILOR}" in msg
    with pytest.raises(ConfigError) as e:
        load_predictor(always, tailor_size=TAILOR, window=30)
    msg = str(e.value)
    assert "window=3" in msg and "window=30" in msg and "policy.window=3" in msg


def test_policy_setup_checks_weights(always):
    with pytest.raises(ConfigError, match="window=3"):
        _make(always, window=30)
    with pytest.raises(ConfigError, match="tailor_size"):
        _make(always, tailor_size=1024)
    with pytest.raises(ConfigError, match="record_every"):
        _make(always, record_every=0)


def test_missing_default_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_mod, "DEFAULT_WEIGHTS", tmp_path / "weights" / "smartfrz_default.pt")
    with pytest.raises(FreezebenchError) as e:
        _make(None)
    msg = str(e.value)
    assert "no default SmartFRZ predictor weights are shipped yet" in msg and "policy.weights=" in msg
    assert DEFAULT_WEIGHTS.name == "smartfrz_default.pt" and DEFAULT_WEIGHTS.parent.name == "weights"


# --- cadence and rule ---------------------------------------------------------------------------------------
def test_default_cadence(always):
    pol, _, _ = _make(always, steps_per_epoch=65)
    assert pol.record_every == 2 and pol.stage_every == 65
    assert [s for s in range(0, 131) if pol.observe_at(s)] == list(range(2, 131, 2))
    assert [s for s in range(0, 131) if pol.decide_at(s)] == [65, 130]
    pol, _, _ = _make(always, steps_per_epoch=10)
    assert pol.record_every == 1 and pol.stage_every == 10
    pol, _, _ = _make(always, record_every=3, stage_every=4)
    assert [s for s in range(13) if pol.observe_at(s)] == [3, 6, 9, 12]
    assert [s for s in range(13) if pol.decide_at(s)] == [4, 8, 12]


def test_freezes_only_with_full_window_and_drops_history(always):
    pol, model, units = _make(always, record_every=1, stage_every=1)
    freezable = pol.freezable
    assert freezable == [0, 1, 2] and units[3].is_head
    assert _tick(pol, model, units, 1) is None
    assert _tick(pol, model, units, 2) is None
    assert [pol.history.count(r) for r in range(3)] == [2, 2, 2]
    assert pol.epoch_metrics() == {"evaluated_units": 0.0, "predicted_freeze_frac": 0.0}
    dec = _tick(pol, model, units, 3)
    assert list(dec.freeze) == freezable
    assert pol.epoch_metrics() == {"evaluated_units": 3.0, "predicted_freeze_frac": 1.0}
    assert [pol.history.count(r) for r in range(3)] == [0, 0, 0]
    assert torch.count_nonzero(pol.history.buffer) == 0
    assert not pol.observe_at(4)  # nothing active is left to record
    assert pol.records == 3 and pol.stages == 3


def test_never_freeze_predictor(never):
    pol, model, units = _make(never, record_every=1, stage_every=1)
    for s in range(1, 7):
        assert _tick(pol, model, units, s) is None
    assert pol.epoch_metrics()["predicted_freeze_frac"] == 0.0
    assert all(pol.history.full(r) for r in range(3))


def test_snapshots_follow_the_weights(always):
    pol, model, units = _make(always, record_every=1, stage_every=100)
    _tick(pol, model, units, 1)
    w = pol.history.buffer[:, 0]
    for r, u in enumerate(pol.freezable):
        assert torch.equal(w[r], pol.tailor.snapshot(r, units[u].parameters))


class _Stub:
    """Predicts by position in the batch (= unit index when all units are ready)."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.calls = 0

    def probabilities(self, windows):
        self.calls += 1
        p = torch.tensor([0.9 if f else 0.1 for f in self.pattern[: windows.shape[0]]])
        return torch.stack([1 - p, p], dim=1)


@pytest.mark.parametrize("sequential, pattern, expected", [
    (False, [True, False, True], [0, 2]),
    (True, [True, False, True], [0]),
    (True, [True, True, False], [0, 1]),
    (True, [False, True, True], None),
    (False, [False, False, False], None),
])
def test_sequential_vs_nonsequential(always, sequential, pattern, expected):
    pol, model, units = _make(always, record_every=1, stage_every=3, sequential=sequential)
    stub = _Stub(pattern)
    pol.predictor = stub
    for s in (1, 2):
        assert _tick(pol, model, units, s) is None
    dec = _tick(pol, model, units, 3)
    assert stub.calls == 1  # one batched call per stage
    assert (None if not dec else list(dec.freeze)) == expected
    for u in pol.freezable:
        assert pol.history.count(u) == (0 if u in (expected or []) else 3)


def test_sequential_prefix():
    assert sequential_prefix([1, 2, 5], {1: True, 2: True, 5: True}) == [1, 2, 5]
    assert sequential_prefix([1, 2, 5], {1: True, 5: True}) == [1]
    assert sequential_prefix([], {}) == []


def test_state_round_trip(always):
    pol, model, units = _make(always, record_every=1, stage_every=5)
    for s in (1, 2):
        _tick(pol, model, units, s)
    state = pol.state_dict()
    clone = SmartFRZ(pol.cfg)
    clone.setup(units, pol.plan)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)
    assert torch.equal(clone.history.buffer, pol.history.buffer)
    assert [clone.history.count(r) for r in range(3)] == [2, 2, 2]
    # both continue identically
    _tick(pol, model, units, 3)
    clone.observe(3, Signals(step=3, epoch=0.5, units=units))
    assert torch.equal(clone.history.windows([0, 1, 2]), pol.history.windows([0, 1, 2]))
    other, _, _ = _make(always, record_every=1)
    bad = dict(state, history=dict(state["history"], window=7))
    with pytest.raises(ConfigError, match="window=7"):
        other.load_state_dict(bad)


# --- end to end ---------------------------------------------------------------------------------------------
def test_tiny_run_freezes(tmp_path, tiny_overrides):
    weights = _save(tmp_path, True, window=2)
    cfg = load_config([*tiny_overrides, "tracking.enabled=false", "model.granularity=layer",
                       f"trainer.output_dir={tmp_path / 'out'}"])
    pol = SmartFRZ(SmartFRZConfig(weights=weights, window=2, tailor_size=TAILOR, record_every=1))
    trainer = Trainer(cfg, policy=pol)
    trainer.fit()
    frozen = trainer.freezer.frozen
    assert frozen and set(frozen) == set(pol.freezable)
    # window 2 filled after step 2; the first stage is the end of epoch 1 (step 4)
    assert {e.step for e in trainer.freezer.events} == {trainer.plan.steps_per_epoch}
    assert pol.epoch_metrics()["evaluated_units"] == 0.0  # later stages had nothing left to judge


def test_any_window_reads_other_window_lengths_with_the_shipped_predictor(tiny_overrides):
    """The shipped predictor was trained at window 30; other windows are refused unless policy.any_window."""
    from freezebench.config import load_config
    from freezebench.errors import ConfigError
    from freezebench.trainer import Trainer

    base = [*tiny_overrides, "policy=smartfrz", "policy.window=20", "tracking.enabled=false"]
    with pytest.raises(ConfigError, match="trained with window=30, but window=20"):
        Trainer(load_config(base))
    tr = Trainer(load_config([*base, "policy.any_window=true"]))
    assert tr.policy.history.window == 20 and int(tr.policy.predictor_meta["window"]) == 30
    probs = tr.policy.predictor.probabilities(torch.randn(3, 20, 1024))
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(-1), torch.ones(3))
