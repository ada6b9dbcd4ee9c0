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
from freezebench.predictors.policy import SmartFRZ, SmartFRZConfig, sequential_prefix, stage_decision
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
    assert meta["norm"] == "first_delta" and meta["provenance"] == {"runs": ["a", "b"]} and meta["note"] == "x"
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


def test_family_selection_and_errors(tmp_path, monkeypatch):
    """policy.weights=null picks the family member trained at policy.window and policy.tailor_size."""
    import shutil

    import freezebench.predictors.weights as wmod

    monkeypatch.setattr(wmod, "WEIGHTS_DIR", tmp_path / "family")
    (tmp_path / "family").mkdir()
    with pytest.raises(ConfigError, match=r"policy.window=30 and policy.tailor_size=1024 \(shipped: none\)"):
        SmartFRZ.weights_path(SmartFRZConfig())
    for w, t in ((20, 1024), (30, TAILOR), (50, TAILOR)):
        shutil.copy(_save(tmp_path, True, window=w, tailor_size=t), wmod.family_file(w, t))
    monkeypatch.setattr(wmod, "FAMILY", ((20, 1024), (30, TAILOR), (50, TAILOR)))
    assert SmartFRZ.weights_path(SmartFRZConfig(window=20)) == str(tmp_path / "family" / "smartfrz_w20_t1024.pt")
    assert SmartFRZ.weights_path(SmartFRZConfig(window=50, tailor_size=TAILOR)).endswith(f"smartfrz_w50_t{TAILOR}.pt")
    with pytest.raises(ConfigError) as e:
        SmartFRZ.weights_path(SmartFRZConfig(window=40))
    msg = str(e.value)
    assert f"shipped: window=20 tailor_size=1024, window=30 tailor_size={TAILOR}, window=50 tailor_size={TAILOR}" in msg
    assert "policy.weights=" in msg and "policy.any_window=true" in msg
    # any_window: the member at the same tailor size, nearest to window 30
    assert SmartFRZ.weights_path(SmartFRZConfig(window=40, any_window=True, tailor_size=TAILOR)).endswith(
        f"smartfrz_w30_t{TAILOR}.pt")
    with pytest.raises(ConfigError, match="tailor_size=2048"):
        SmartFRZ.weights_path(SmartFRZConfig(window=40, any_window=True, tailor_size=2048))
    # an explicit file wins; a policy set up from the family gets that member's window
    assert SmartFRZ.weights_path(SmartFRZConfig(weights="x.pt", window=40)) == "x.pt"
    pol, _, _ = _make(None, window=50)
    assert int(pol.predictor_meta["window"]) == 50
    assert DEFAULT_WEIGHTS == wmod.family_file(30, 1024, wmod.Path(wmod.__file__).parent / "weights")


# --- cadence and rule ---------------------------------------------------------------------------------------
def test_default_cadence(always):
    """Every record_every steps, but only the last `window` record steps before each stage (older
    snapshots would leave the ring buffer before any stage reads them)."""
    pol, _, _ = _make(always, steps_per_epoch=65)
    assert pol.record_every == 2 and pol.stage_every == 65 and pol.history.window == 3
    assert [s for s in range(0, 131) if pol.observe_at(s)] == [60, 62, 64, 126, 128, 130]
    assert [s for s in range(0, 131) if pol.decide_at(s)] == [65, 130]
    pol, _, _ = _make(always, steps_per_epoch=10)
    assert pol.record_every == 1 and pol.stage_every == 10
    assert [s for s in range(0, 21) if pol.observe_at(s)] == [8, 9, 10, 18, 19, 20]
    pol, _, _ = _make(always, record_every=3, stage_every=4)  # a window spans several stages: every record
    assert [s for s in range(13) if pol.observe_at(s)] == [3, 6, 9, 12]
    assert [s for s in range(13) if pol.decide_at(s)] == [4, 8, 12]
    pol, _, _ = _make(always, record_every=2, stage_every=7)  # stages off the record grid
    assert [s for s in range(15) if pol.observe_at(s)] == [2, 4, 6, 10, 12, 14]


def test_skipped_snapshots_change_no_window():
    """The shipped default predictor at window 30, one snapshot per step, one stage per 45 steps (the
    default job's cadence): the policy, recording only what a stage reads, feeds the predictor the same
    windows and gets the same probabilities (torch.equal) and decisions as a reference that records every
    step with the per-unit gather and scores with the plain forward."""
    model, units = _units()
    plan = Plan(epochs=3, steps_per_epoch=45, batch_size=4, base_lr=0.1, seed=0)

    class Reference(SmartFRZ):
        def observe_at(self, step):
            return step > 0 and step % self.record_every == 0 and bool(self.active_units())

        def observe(self, step, signals):
            rows = [self._row[u] for u in self.active_units()]
            snaps = torch.stack([self.tailor.snapshot(r, self._params[r]) for r in rows])
            self.history.record(rows, snaps)
            self.records += 1

    pols = [SmartFRZ(SmartFRZConfig()), Reference(SmartFRZConfig())]
    fed: list[list] = [[], []]
    for i, pol in enumerate(pols):
        pol.setup(units, plan)
        forward = pol.predictor

        class Spy:
            def __init__(self, out):
                self.out = out

            def probabilities(self, windows, inplace=False):
                seen = windows.clone()
                ref = torch.softmax(forward(seen), dim=-1)  # the plain forward
                p = forward.probabilities(windows, inplace=inplace)
                assert torch.equal(p, ref)
                self.out.append((seen, p))
                return p

        pol.predictor = Spy(fed[i])
    g = torch.Generator().manual_seed(0)
    decisions: list[list] = [[], []]
    for step in range(1, 3 * 45 + 1):
        with torch.no_grad():  # a slowing random walk: late stages have converging units
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05 / step)
        for i, pol in enumerate(pols):
            if pol.observe_at(step):
                pol.observe(step, Signals(step=step, epoch=step / 45, units=units))
            dec = pol.decide(step) if pol.decide_at(step) else None
            decisions[i].append(list(dec.freeze) if dec else [])
        if decisions[0][-1]:
            for u in decisions[0][-1]:
                for p in units[u].parameters:
                    p.requires_grad_(False)
            for pol in pols:
                pol.notify_frozen(pol.frozen | frozenset(decisions[0][-1]))
    assert decisions[0] == decisions[1]
    assert pols[0].records == 3 * 30 and pols[1].records == 3 * 45
    assert len(fed[0]) == len(fed[1]) == 3
    for (w_new, p_new), (w_ref, p_ref) in zip(*fed):
        assert torch.equal(w_new, w_ref) and torch.equal(p_new, p_ref)


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
    pol, model, units = _make(always, record_every=1, stage_every=3)
    _tick(pol, model, units, 1)
    w = pol.history.buffer[:, 0]
    for r, u in enumerate(pol.freezable):
        assert torch.equal(w[r], pol.tailor.snapshot(r, units[u].parameters))


class _Stub:
    """Predicts by position in the batch (= unit index when all units are ready)."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.calls = 0

    def probabilities(self, windows, inplace=False):
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
    pol, model, units = _make(always, record_every=1, stage_every=4)  # records at steps 2, 3, 4
    for s in (1, 2, 3):
        _tick(pol, model, units, s)
    state = pol.state_dict()
    clone = SmartFRZ(pol.cfg)
    clone.setup(units, pol.plan)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)
    assert torch.equal(clone.history.buffer, pol.history.buffer)
    assert [clone.history.count(r) for r in range(3)] == [2, 2, 2]
    # both continue identically
    for p in (pol, clone):
        p.observe(4, Signals(step=4, epoch=4 / 6, units=units))
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
    """The shipped family has no window 25: refused, unless policy.any_window (then the window-30 member)."""
    from freezebench.config import load_config
    from freezebench.errors import ConfigError
    from freezebench.trainer import Trainer

    base = [*tiny_overrides, "policy=smartfrz", "policy.window=25", "tracking.enabled=false"]
    with pytest.raises(ConfigError, match="no shipped SmartFRZ predictor for policy.window=25"):
        Trainer(load_config(base))
    tr = Trainer(load_config([*base, "policy.any_window=true"]))
    assert tr.policy.history.window == 25 and int(tr.policy.predictor_meta["window"]) == 30
    probs = tr.policy.predictor.probabilities(torch.randn(3, 25, 1024))
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(-1), torch.ones(3))


def test_query_depends_on_the_current_snapshot():
    """Paper section 3.2: the attention query is MLP_q of the latest snapshot. With the shipped
    normalisation, changing only the latest snapshot changes the query (and so the attention); with the
    old ``delta`` mode it could not (the latest row was always zeros)."""
    from freezebench.predictors.model import QUERY_MODES, normalize
    from freezebench.predictors.weights import DEFAULT_WEIGHTS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, 1024, generator=g).cumsum(1)
    y = x.clone()
    y[:, -1] += torch.randn(1, 1024, generator=g)
    for mode in QUERY_MODES:
        assert not torch.equal(normalize(x, mode)[:, -1], normalize(y, mode)[:, -1]), mode
    assert torch.count_nonzero(normalize(x, "delta")[:, -1]) == 0
    model, meta = load_predictor(DEFAULT_WEIGHTS)
    assert meta["norm"] in QUERY_MODES
    qx, qy = (model.mlp_q(normalize(t, model.norm)[:, -1]) for t in (x, y))
    assert not torch.allclose(qx, qy)
    # the attention scores a_j = Q_t . K_j of the same keys change with the query (eq. 2)
    k = model.mlp_k(normalize(x, model.norm))
    assert not torch.allclose(k @ qx.unsqueeze(-1), k @ qy.unsqueeze(-1))


def test_stage_decision_is_the_rule_the_policy_calls(always, monkeypatch):
    p = {0: 0.9, 1: 0.2, 3: 0.7}  # unit 2 not judged (window not full): keep
    assert stage_decision([0, 1, 2, 3], p, 0.5) == [0, 3]
    assert stage_decision([0, 1, 2, 3], p, 0.5, sequential=True) == [0]
    assert stage_decision([0, 1, 2, 3], p, 0.9) == []  # strictly above the threshold
    assert stage_decision([2, 3], p, 0.5, sequential=True) == []
    seen = []

    def spy(active, p_freeze, threshold, sequential=False):
        seen.append((list(active), dict(p_freeze), threshold, sequential))
        return stage_decision(active, p_freeze, threshold, sequential)

    monkeypatch.setattr(policy_mod, "stage_decision", spy)
    pol, model, units = _make(always)
    decs = [_tick(pol, model, units, s) for s in range(1, 7)]
    assert seen and seen[0][0] == list(pol.freezable) and seen[0][2] == pol.threshold
    assert decs[-1].freeze == [u for u in seen[0][0] if seen[0][1].get(u, 0.0) > pol.threshold]


def test_domain_selection_text_and_image(tmp_path, monkeypatch):
    """policy.weights=null: a text model (Plan.modality) gets the text predictor, an image model the image
    family, an explicit file wins, a window the text family lacks is a one-line ConfigError naming it."""
    import shutil

    import freezebench.predictors.weights as wmod

    monkeypatch.setattr(wmod, "WEIGHTS_DIR", tmp_path / "family")
    (tmp_path / "family").mkdir()
    shutil.copy(_save(tmp_path, True, window=30, tailor_size=1024), wmod.family_file(30, 1024))
    shutil.copy(_save(tmp_path, True, window=30, tailor_size=1024), wmod.family_file(30, 1024, domain="text"))
    monkeypatch.setattr(wmod, "FAMILY", ((30, 1024),))
    cfg = SmartFRZConfig()
    assert SmartFRZ.weights_path(cfg, "text") == str(tmp_path / "family" / "smartfrz_text_w30_t1024.pt")
    assert SmartFRZ.weights_path(cfg, "image") == str(tmp_path / "family" / "smartfrz_w30_t1024.pt")
    assert SmartFRZ.weights_path(SmartFRZConfig(domain="image"), "text").endswith("smartfrz_w30_t1024.pt")
    assert SmartFRZ.weights_path(SmartFRZConfig(weights="x.pt"), "text") == "x.pt"
    with pytest.raises(ConfigError) as e:
        SmartFRZ.weights_path(SmartFRZConfig(window=20), "text")
    msg = str(e.value)
    assert "\n" not in msg and "shipped text: window=30 tailor_size=1024" in msg and "policy.domain=image" in msg
    with pytest.raises(ConfigError, match="policy.domain must be"):
        SmartFRZ.validate_config(SmartFRZConfig(domain="audio"))


def test_shipped_text_predictor_meta():
    from freezebench.predictors.build import split_ids
    from freezebench.predictors.weights import TEXT_WEIGHTS

    model, meta = load_predictor(TEXT_WEIGHTS, tailor_size=1024, window=30)
    assert meta["window"] == 30 and meta["tailor_size"] == 1024 and meta["storage_dtype"] == "float16"
    assert meta["norm"] == "first_delta" and 0.0 <= meta["threshold"] <= 1.0
    used = {r.rsplit("-s", 1)[0] for r in meta["provenance"]["train_runs"] + meta["provenance"]["val_runs"]}
    assert used == set(split_ids("train", "text")) | set(split_ids("val", "text"))
    assert all(r["dataset"] == "text_demo" for r in meta["provenance"]["runs"])
