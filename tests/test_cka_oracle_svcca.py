"""The CKA oracle and SVCCA-triggered freezing: exact decision rules, the reference checks, tiny end-to-end runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from freezebench.baselines.cka_oracle import (
    CKAOracle,
    CKAOracleConfig,
    build_reference,
    check_steps,
    cka_ready,
    oracle_decision,
    read_reference,
    resolve_reference,
    window_variance,
)
from freezebench.baselines.svcca import (
    SVCCAConfig,
    SVCCAFreezing,
    as_points,
    projection_dim,
    svcca_prefix,
    svcca_trigger,
    unit_layout,
)
from freezebench.config import load_config
from freezebench.errors import ConfigError
from freezebench.policy import Signals
from freezebench.analysis.similarity import cka_from_grams, gram_linear, linear_cka
from freezebench.trainer import Trainer
from helpers import THREADS, assert_state_equal

FLAT_HIGH = [0.2, 0.5, 0.80, 0.801, 0.799]  # stable and above the cutoff: freeze
RISING = [0.2, 0.4, 0.6, 0.7, 0.8]  # still climbing: keep training
FLAT_LOW = [0.2, 0.25, 0.25, 0.251, 0.249]  # stable but below the cutoff (0.3): keep training


# --------------------------------------------------------------------------------------------------------
# CKA oracle: pure core
# --------------------------------------------------------------------------------------------------------


def test_window_variance_is_population_variance():
    assert window_variance([1.0, 2.0, 3.0]) == pytest.approx(np.var([1.0, 2.0, 3.0]))
    assert window_variance([0.8, 0.801, 0.799]) == pytest.approx(2 / 3 * 1e-6)


def test_oracle_freezes_flat_high_not_rising_not_flat_low():
    hist = {0: RISING, 1: FLAT_HIGH, 2: FLAT_LOW, 3: FLAT_HIGH}
    assert oracle_decision(hist, window=3, var_threshold=1e-4, cutoff=0.3) == [1, 3]
    # the same as a list (keys are positions)
    assert oracle_decision([RISING, FLAT_HIGH, FLAT_LOW], 3, 1e-4, 0.3) == [1]
    # a window that reaches back into the rise is not stable yet
    assert oracle_decision({1: FLAT_HIGH}, window=4, var_threshold=1e-4, cutoff=0.3) == []
    # a window longer than the history never freezes
    assert oracle_decision({1: FLAT_HIGH}, window=6, var_threshold=1.0, cutoff=0.0) == []
    # the rising unit freezes once the variance bound admits its window: var(0.6, 0.7, 0.8) = 0.00667
    assert oracle_decision({0: RISING}, window=3, var_threshold=0.0067, cutoff=0.3) == [0]
    assert oracle_decision({0: RISING}, window=3, var_threshold=0.0066, cutoff=0.3) == []


def test_oracle_bounds_are_strict_and_nan_never_freezes():
    assert not cka_ready([0.3, 0.3, 0.3], 3, 1e-4, cutoff=0.3)  # current CKA must be *above* the cutoff
    assert cka_ready([0.31, 0.31, 0.31], 3, 1e-4, cutoff=0.3)
    assert not cka_ready([0.25, 0.75], 2, var_threshold=0.0625, cutoff=0.3)  # var = 0.0625 exactly: not below
    assert cka_ready([0.25, 0.75], 2, var_threshold=0.0626, cutoff=0.3)
    assert not cka_ready([0.8, 0.8, math.nan], 3, 1.0, 0.3)


def test_oracle_sequential_freezes_only_the_ready_prefix():
    hist = {2: FLAT_HIGH, 4: FLAT_HIGH, 5: RISING, 7: FLAT_HIGH}
    assert oracle_decision(hist, 3, 1e-4, 0.3, sequential=False) == [2, 4, 7]
    assert oracle_decision(hist, 3, 1e-4, 0.3, sequential=True) == [2, 4]
    assert oracle_decision({0: RISING, 1: FLAT_HIGH}, 3, 1e-4, 0.3, sequential=True) == []


def test_check_steps():
    assert check_steps(10, 2, 1) == [10, 20]
    assert check_steps(10, 2, 4) == [3, 5, 8, 10, 13, 15, 18, 20]
    assert check_steps(4, 3, 4) == list(range(1, 13))
    assert check_steps(3, 2, 10) == [1, 2, 3, 4, 5, 6]  # at most one check per step


def test_gram_form_of_the_oracle_equals_linear_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=g)
    y = x @ torch.randn(40, 24, generator=g) + 0.5 * torch.randn(16, 24, generator=g)
    assert cka_from_grams(gram_linear(x), gram_linear(y)) == pytest.approx(linear_cka(x, y), abs=1e-12)


# --------------------------------------------------------------------------------------------------------
# CKA oracle: the reference checkpoint
# --------------------------------------------------------------------------------------------------------


def _config(tiny_overrides, *extra):
    return load_config([*tiny_overrides, "tracking.enabled=false", "model.granularity=layer", *extra])


@pytest.fixture
def tiny_trainer(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def make(*extra, policy=None):
        return Trainer(_config(tiny_overrides, *extra), policy=policy)

    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny model trained with ``full`` (the TINY run), saved as an earlier run's final.pt."""
    from conftest import TINY

    torch.set_num_threads(THREADS)
    trainer = Trainer(_config(TINY))
    trainer.fit()
    return trainer, trainer.save_checkpoint(tmp_path_factory.mktemp("ref") / "final.pt")


def _save(path, model_name, num_classes=4, in_channels=3, image_size=8, **extra):
    from freezebench.zoo.models import build_model

    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    torch.save({"model_state": model.state_dict(), "model_name": model_name, "num_classes": num_classes,
                "in_channels": in_channels, "image_size": image_size, **extra}, path)
    return path


def test_reference_is_required_and_must_be_a_freezebench_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="policy.reference is required"):
        CKAOracle.validate_config(CKAOracleConfig())
    with pytest.raises(ConfigError, match="does not exist"):
        CKAOracle.validate_config(CKAOracleConfig(reference=str(tmp_path / "nope.pt")))
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="policy.reference checkpoint .* cannot be read"):
        read_reference(str(bad))
    raw = tmp_path / "raw.pt"
    torch.save({"weight": torch.zeros(2)}, raw)
    with pytest.raises(ConfigError, match="not a freezebench checkpoint .missing model_state, model_name"):
        read_reference(str(raw))
    # a state dict that does not fit the model it claims to be
    broken = tmp_path / "broken.pt"
    torch.save({"model_state": {"w": torch.zeros(1)}, "model_name": "tiny", "num_classes": 4, "in_channels": 3,
                "image_size": 8}, broken)
    with pytest.raises(ConfigError, match="does not fit model 'tiny'"):
        build_reference(str(broken), [], "cpu")


def test_reference_from_an_mlflow_run(monkeypatch):
    import mlflow.artifacts

    asked = []
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda artifact_uri: asked.append(artifact_uri) or "x")
    assert resolve_reference("runs:/abc123") == "x"
    assert resolve_reference("runs:/abc123/other/ref.pt") == "x"
    assert asked == ["runs:/abc123/checkpoints/final.pt", "runs:/abc123/other/ref.pt"]
    assert resolve_reference("outputs/r/final.pt") == "outputs/r/final.pt"
    CKAOracle.validate_config(CKAOracleConfig(reference="runs:/abc123"))  # checked when downloaded


def test_reference_of_another_model_is_refused(reference, tmp_path):
    trainer, _ = reference
    ref = _save(tmp_path / "mlp.pt", "mlp")
    with pytest.raises(ConfigError, match=r"does not match the model being trained: the reference is model 'mlp' "
                                          r"with 3 units \(fc1, fc2, fc3\).*trained model has 3 units "
                                          r"\(block1.0, block2.0, fc\)"):
        CKAOracle(CKAOracleConfig(reference=str(ref))).setup(trainer.units, trainer.plan)
    # same architecture, another number of classes: the head's shapes differ
    ref = _save(tmp_path / "tiny3.pt", "tiny", num_classes=3)
    with pytest.raises(ConfigError, match=r"unit 2 \(fc\) has parameter shapes \[\(4, 16\), \(4,\)\] in the trained "
                                          r"model but \[\(3, 16\), \(3,\)\] in the reference"):
        CKAOracle(CKAOracleConfig(reference=str(ref))).setup(trainer.units, trainer.plan)


def test_reference_is_partitioned_like_the_trained_model(reference):
    trainer, ref = reference
    model = trainer.model
    from freezebench.units import partition

    blocks = partition(model, trainer.probe()[0][:2], "block")
    oracle = CKAOracle(CKAOracleConfig(reference=str(ref)))
    oracle.setup(blocks.units, trainer.plan)
    assert [u.name for u in oracle.reference_units] == ["block1", "block2", "fc"]
    oracle.setup(trainer.units, trainer.plan)
    assert [u.name for u in oracle.reference_units] == ["block1.0", "block2.0", "fc"]
    # the checkpoint's weights, not the architecture's initialisation
    assert all(torch.equal(a, b) for a, b in zip(oracle.reference_units[0].parameters, trainer.units[0].parameters))


def test_oracle_end_to_end_freezes_against_a_trained_reference(reference, tiny_trainer):
    full, ref = reference
    # against its own weights every unit's CKA is 1 (the cached Grams are the reference's side)
    same = CKAOracle(CKAOracleConfig(reference=str(ref)))
    same.setup(full.units, full.plan)
    same.observe(4, Signals(step=4, epoch=1.0, units=full.units, probe_inputs=full.probe()[0],
                            activations=full.unit_activations([0, 1])))
    assert same.histories == {0: [pytest.approx(1.0)], 1: [pytest.approx(1.0)]}
    assert same.reference is None and same.reference_units is None  # released once the Grams are cached

    # a fresh run (the same start, as the paper's oracle): a huge variance bound freezes every unit as
    # soon as its window of 2 checks fills, at the second check
    cfg = CKAOracleConfig(reference=str(ref), checks_per_epoch=4, window_epochs=0.25, var_threshold=1.0,
                          cutoff=-1.0)
    tr = tiny_trainer(policy=CKAOracle(cfg))
    res = tr.fit()
    assert [(e.unit, e.step) for e in res.events] == [(0, 2), (1, 2)]
    assert "CKA to reference stable over 2 checks" in res.events[0].reason
    assert res.metrics["cost/saving_frac"] > 0.5
    hist = tr.policy.histories
    assert hist == {}  # frozen units' histories are dropped
    # state round-trips (the contract test's check)
    tr.policy.histories = {0: [0.5, 0.25], 1: [0.125]}
    state = tr.policy.state_dict()
    clone = CKAOracle(cfg)
    clone.setup(tr.units, tr.plan)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)


# --------------------------------------------------------------------------------------------------------
# SVCCA: pure core
# --------------------------------------------------------------------------------------------------------


def test_svcca_trigger_on_crafted_sequences():
    assert svcca_trigger([0.5, 0.995, 0.996], threshold=0.99, patience=2)
    assert not svcca_trigger([0.5, 0.995, 0.996], threshold=0.99, patience=3)
    assert not svcca_trigger([0.995, 0.98, 0.999], threshold=0.99, patience=2)  # the streak was broken
    assert svcca_trigger([0.995, 0.98, 0.999], threshold=0.99, patience=1)
    assert svcca_trigger([0.99, 0.99], threshold=0.99, patience=2)  # at the threshold counts
    assert not svcca_trigger([0.995], threshold=0.99, patience=2)  # not enough checks yet
    assert not svcca_trigger([], threshold=0.5, patience=1)
    assert not svcca_trigger([0.999, math.nan], threshold=0.5, patience=2)


def test_svcca_prefix_stops_at_the_first_unit_that_has_not_converged():
    ok, no = [0.999, 0.999], [0.999, 0.9]
    assert svcca_prefix({3: ok, 4: ok, 5: no, 6: ok}, 0.99, 2) == [3, 4]
    assert svcca_prefix({3: no, 4: ok}, 0.99, 2) == []
    assert svcca_prefix([ok, ok, ok], 0.99, 2) == [0, 1, 2]
    assert svcca_prefix({}, 0.99, 2) == []


def test_spatial_positions_become_data_points():
    x4 = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (n, C, H, W)
    pts = as_points(x4.reshape(2, -1), (3, True))
    assert pts.shape == (8, 3)
    assert torch.equal(pts, x4.permute(0, 2, 3, 1).reshape(8, 3))  # row (k, h, w) holds x[k, :, h, w]
    tokens = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4)  # (n, S, D)
    assert torch.equal(as_points(tokens.reshape(2, -1), (4, False)), tokens.reshape(10, 4))
    flat = torch.ones(2, 7)
    assert as_points(flat, (7, False)) is flat and as_points(flat, None) is flat
    assert as_points(flat, (3, True)) is flat  # channels do not divide the features: keep as neurons


def test_unit_layout_reads_channels_off_the_modules():
    conv, bn, lin, ln = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5), nn.LayerNorm(6)
    assert unit_layout([conv, bn], bn) == (8, True)
    assert unit_layout([lin], lin) == (5, False)
    assert unit_layout([lin, ln], nn.Sequential()) == (6, False)  # a block: its last known module
    assert unit_layout([nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), lin], nn.Sequential()) == (5, False)
    assert unit_layout([nn.ReLU()], nn.ReLU()) is None


def test_projection_dim():
    assert projection_dim(4096, 16, 4.0) is None
    assert projection_dim(64, 16, 4.0) is None  # exactly 4 points per neuron
    assert projection_dim(64, 32, 4.0) == 16
    assert projection_dim(3, 16, 4.0) == 1


# --------------------------------------------------------------------------------------------------------
# SVCCA: the policy
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("threshold", 0.0, "threshold must be in"), ("patience", 0, "patience must be >= 1"),
    ("checks_per_epoch", 0, "checks_per_epoch must be >= 1"), ("keep_variance", 1.5, "keep_variance must be in"),
    ("points_per_dim", 0.0, "points_per_dim must be positive"), ("max_points", 1, "max_points must be >= 2"),
])
def test_svcca_config_is_validated(field, value, match):
    SVCCAFreezing.validate_config(SVCCAConfig())
    with pytest.raises(ConfigError, match=match):
        SVCCAFreezing.validate_config(SVCCAConfig(**{field: value}))


@pytest.mark.parametrize("field, value, match", [
    ("checks_per_epoch", 0, "checks_per_epoch must be >= 1"), ("window_epochs", 0.1, "spans no check interval"),
    ("var_threshold", 0.0, "var_threshold must be positive"), ("cutoff", 1.0, "cutoff must be in"),
])
def test_cka_oracle_config_is_validated(reference, field, value, match):
    ref = str(reference[1])
    CKAOracle.validate_config(CKAOracleConfig(reference=ref))
    with pytest.raises(ConfigError, match=match):
        CKAOracle.validate_config(CKAOracleConfig(reference=ref, **{field: value}))


def test_svcca_decide_uses_the_active_prefix(tiny_trainer):
    tr = tiny_trainer(policy=SVCCAFreezing(SVCCAConfig(threshold=0.99, patience=2)))
    pol = tr.policy
    assert pol.layouts[0] == (8, True) and pol.layouts[1] == (16, True)
    pol.histories = {0: [0.5, 0.995], 1: [0.999, 0.999]}
    assert pol.decide(4) is None  # unit 0 has not converged, so unit 1 waits
    pol.histories[0].append(0.999)
    assert list(pol.decide(8).freeze) == [0, 1]
    pol.notify_frozen(frozenset({0}))
    pol.histories = {1: [0.999, 0.98]}
    assert pol.decide(12) is None


def test_svcca_points_project_when_there_are_too_few(tiny_trainer):
    pol = tiny_trainer(policy=SVCCAFreezing(SVCCAConfig(points_per_dim=4.0))).policy
    x = torch.randn(16, 16 * 8 * 8)  # unit 1's output on a 16-input probe: 1024 points x 16 channels
    assert pol.points(1, x).shape == (1024, 16)
    pol.cfg.points_per_dim = 100.0  # now 1024 points are too few for 16 neurons: project to 10 dimensions
    p1 = pol.points(1, x)
    assert p1.shape == (1024, 10) and torch.equal(pol.points(1, x), p1)  # the same projection every check
    # too many points: a fixed, seeded subset of the positions (then too few for 16 neurons: 40 // 4 dimensions)
    pol.cfg.points_per_dim, pol.cfg.max_points = 4.0, 40
    p2 = pol.points(1, x)
    rows = pol._subsets[1]
    assert p2.shape == (40, 10) and torch.equal(pol.points(1, x), p2)
    assert rows.shape == (40,) and bool((rows[1:] > rows[:-1]).all())
    assert torch.equal(p2, as_points(x, (16, True))[rows] @ pol._projections[1])


def test_svcca_end_to_end_freezes_and_round_trips(tiny_trainer):
    cfg = SVCCAConfig(threshold=0.5, patience=1, checks_per_epoch=4)
    tr = tiny_trainer(policy=SVCCAFreezing(cfg))
    res = tr.fit()
    assert tr.freezer.frozen == {0, 1}
    # the first check only records: the earliest freeze is at the second check (step 2)
    assert [(e.unit, e.step) for e in res.events] == [(0, 2), (1, 2)]
    assert "SVCCA to previous check >= 0.5" in res.events[0].reason
    # a policy part-way through: similarity histories and the previous check's points both round-trip
    tr2 = tiny_trainer(policy=SVCCAFreezing(SVCCAConfig(checks_per_epoch=4)))
    for step in (1, 2):
        tr2.policy.observe(step, Signals(step=step, epoch=step / 4, units=tr2.units,
                                         activations=tr2.unit_activations([0, 1])))
    state = tr2.policy.state_dict()
    assert set(state["histories"]) == {0, 1} and state["previous"][1].shape == (16 * 8 * 8, 16)
    assert state["histories"][0] == [pytest.approx(1.0)]  # same weights at both checks
    clone = SVCCAFreezing(tr2.policy.cfg)
    clone.setup(tr2.units, tr2.plan)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)


def test_similarity_policies_report_epoch_metrics(tmp_path, monkeypatch):
    """The per-epoch `policy/<...>_mean` figures come from the histories (general epoch_metrics hook)."""
    from freezebench.baselines.svcca import SVCCAConfig, SVCCAFreezing

    p = SVCCAFreezing(SVCCAConfig())
    p.histories = {0: [0.5, 0.9], 1: [0.7], 2: []}
    p.frozen = frozenset({1})
    assert p.epoch_metrics() == {"svcca_mean": 0.9}
