"""SmartFRZ predictor building blocks: layer tailoring, history ring buffer, the attention predictor."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from freezebench.predictors.history import HistoryBuffer
from freezebench.predictors.model import (
    SmartFRZPredictor,
    normalize,
    predictor_flops,
    predictor_params,
)
from freezebench.predictors.tailoring import Tailor


def _units():
    g = torch.Generator().manual_seed(0)
    return [
        [torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, generator=g)],  # 1168 weights
        [torch.randn(64, 40, generator=g), torch.randn(64, generator=g), torch.randn(64, generator=g)],
        [torch.randn(10, generator=g), torch.randn(10, generator=g)],  # 20 weights < tailor_size
    ]


# --- tailoring ------------------------------------------------------------------------------------------
def test_tailor_indices_reproducible_and_seed_dependent():
    units = _units()
    a, b, c = Tailor(units, 256, seed=1), Tailor(units, 256, seed=1), Tailor(units, 256, seed=2)
    for u in range(3):
        assert torch.equal(a.indices[u], b.indices[u])
        assert not torch.equal(a.indices[u], c.indices[u])
    assert not torch.equal(a.indices[0][:100], a.indices[1][:100])  # units differ
    # built from sizes: same indices as from tensors
    sizes = Tailor([[t.numel() for t in u] for u in units], 256, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, sizes.indices))


def test_tailor_snapshot_values_and_stability():
    units = _units()
    tl = Tailor(units, 256, seed=3)
    idx_before = [i.clone() for i in tl.indices]
    for u, params in enumerate(units):
        flat = torch.cat([p.reshape(-1) for p in params])
        snap = tl.snapshot(u, params)
        assert snap.shape == (256,) and snap.dtype == torch.float32
        assert torch.equal(snap, flat[tl.indices[u]])
    # weights change: the same indices are read, so the snapshot follows the weights exactly
    for params in units:
        for p in params:
            p.mul_(2).add_(1)
    for u, params in enumerate(units):
        flat = torch.cat([p.reshape(-1) for p in params])
        assert torch.equal(tl.indices[u], idx_before[u])
        assert torch.equal(tl.snapshot(u, params), flat[idx_before[u]])
    batched = tl.snapshot_all(units)
    assert batched.shape == (3, 256)
    for u in range(3):
        assert torch.equal(batched[u], tl.snapshot(u, units[u]))
    sub = tl.snapshot_all(units, [2, 0])
    assert torch.equal(sub[0], tl.snapshot(2, units[2])) and torch.equal(sub[1], tl.snapshot(0, units[0]))


def test_tailor_large_units_without_replacement_small_with_replacement():
    units = _units()
    tl = Tailor(units, 256, seed=0)
    big = tl.indices[0]
    assert big.unique().numel() == 256 and int(big.max()) < 1168
    small = tl.indices[2]
    assert small.shape == (256,) and int(small.min()) >= 0 and int(small.max()) < 20
    assert small.unique().numel() == 20  # with replacement, every weight at least once
    assert torch.equal(tl.snapshot(2, units[2]), torch.cat([p for p in units[2]])[small])
    with pytest.raises(ValueError):
        Tailor([[torch.empty(0)]], 8)


# --- history --------------------------------------------------------------------------------------------
def test_history_chronological_after_wraparound():
    h = HistoryBuffer(num_units=3, window=4, tailor_size=5)
    assert h.nbytes == 3 * 4 * 5 * 4
    for step in range(7):  # unit 0: 7 records (wraps), unit 1: 3 records, unit 2: none
        ids = [0, 1] if step < 3 else [0]
        h.record(ids, torch.stack([torch.full((5,), 10.0 * u + step) for u in ids]))
    assert h.count(0) == 4 and h.count(1) == 3 and h.count(2) == 0
    assert h.full(0) and not h.full(1) and h.ready_units() == [0]
    w = h.windows([0])
    assert w.shape == (1, 4, 5)
    assert w[0, :, 0].tolist() == [3.0, 4.0, 5.0, 6.0]  # oldest first, latest last
    with pytest.raises(ValueError):
        h.windows([1])
    h.record([1], torch.full((1, 5), 10.0 + 3))
    ws = h.windows([1, 0])
    assert ws[0, :, 0].tolist() == [10.0, 11.0, 12.0, 13.0] and ws[1, :, 0].tolist() == [3.0, 4.0, 5.0, 6.0]


def test_history_drop_and_state_round_trip():
    h = HistoryBuffer(num_units=2, window=3, tailor_size=4)
    for step in range(5):
        h.record([0, 1], torch.randn(2, 4))
    state = h.state_dict()
    h2 = HistoryBuffer(num_units=2, window=3, tailor_size=4)
    h2.load_state_dict(state)
    assert torch.equal(h2.windows([0, 1]), h.windows([0, 1]))
    h.record([0, 1], torch.randn(2, 4))
    h2.load_state_dict(h.state_dict())
    assert torch.equal(h2.windows([0, 1]), h.windows([0, 1]))
    h.drop(1)
    assert h.count(1) == 0 and not h.full(1) and h.ready_units() == [0]
    assert torch.count_nonzero(h.buffer[1]) == 0
    h.record([1], torch.ones(1, 4))
    assert h.count(1) == 1
    with pytest.raises(ValueError):
        h.record([0, 0], torch.randn(2, 4))


# --- predictor ------------------------------------------------------------------------------------------
def test_predictor_parameter_count_and_bytes():
    # by hand: MLP_k/q/v: 1024*256+256 + 256*256+256 + 256*64+64 = 344,640; MLP_z: 64*32+32 + 32*32+32 + 32*2+2 = 3,202
    assert predictor_params() == 3 * 344_640 + 3_202 == 1_037_122
    model = SmartFRZPredictor()
    assert model.num_params == 1_037_122
    assert model.nbytes == 4 * 1_037_122
    assert 2_000_000 <= model.nbytes <= 6_000_000


def test_predictor_shapes_attention_and_batching():
    torch.manual_seed(0)
    model = SmartFRZPredictor(tailor_size=64).eval()
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        logits, alpha = model(x, return_attention=True)
        assert logits.shape == (5, 2) and alpha.shape == (5, 7)
        assert torch.allclose(alpha.sum(-1), torch.ones(5), atol=1e-6) and bool((alpha >= 0).all())
        single = torch.cat([model(x[i : i + 1]) for i in range(5)])
    assert torch.allclose(logits, single, atol=1e-5, rtol=1e-5)
    probs = model.probabilities(x)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.equal(model.predict(x), logits[:, 1] > logits[:, 0])
    with pytest.raises(ValueError):
        model(torch.randn(5, 7, 32))


def test_predictor_flops_match_flop_counter():
    # by hand at window 30, tailor 1024: K,V: 2*30*2*344,064; Q: 2*344,064; attention 2*2*30*64; MLP_z 2*3,136
    assert predictor_flops(30) == 41_287_680 + 688_128 + 7_680 + 6_272 == 41_989_760
    model = SmartFRZPredictor()
    x = torch.randn(1, 30, 1024)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    assert fc.get_total_flops() == predictor_flops(30)
    # linear in the window
    assert predictor_flops(60) - predictor_flops(30) == predictor_flops(90) - predictor_flops(60)


# --- normalisation --------------------------------------------------------------------------------------
def test_normalize_modes():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16) * 0.01 + 0.5
    for mode in ("standardize", "delta", "none"):
        assert normalize(x, mode).shape == x.shape
    assert torch.equal(normalize(x, "none"), x)
    s = normalize(x, "standardize")
    assert torch.allclose(s.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s.std(dim=(1, 2), correction=0), torch.ones(3), atol=1e-4)
    y = 37.0 * x - 4.0  # affine map with a positive scale
    assert torch.allclose(normalize(y, "standardize"), s, atol=1e-4)
    d = normalize(x, "delta")
    assert torch.count_nonzero(d[:, -1]) == 0
    assert torch.allclose(normalize(y, "delta"), d, atol=1e-4)
    assert torch.count_nonzero(normalize(torch.ones(2, 4, 8), "standardize")) == 0  # eps guard: no NaN
    with pytest.raises(ValueError):
        normalize(x, "zscore")


@pytest.mark.parametrize("model_name", ["resnet20", "mobilenet_v2", "deit_tiny", "mlp"])
def test_tailoring_is_nested_for_every_layer(model_name):
    """The size-k tailoring is the first k of the size-4096 one (indices and snapshots), for every layer
    of the zoo model, small layers (BatchNorm, biases: fewer weights than 4096) included."""
    from freezebench.units import example_batch, partition
    from freezebench.zoo.models import build_model

    model = build_model(model_name, num_classes=10, in_channels=1, image_size=8)
    units = partition(model, example_batch(1, 8), "layer").units
    params = [list(u.parameters) for u in units]
    big = Tailor(params, 4096, seed=0)
    snap = big.snapshot_all(params)
    assert any(sum(p.numel() for p in ps) < 4096 for ps in params)  # the with-repetition case is covered
    for k in (512, 1024, 2048):
        small = Tailor(params, k, seed=0)
        for u in range(len(units)):
            assert torch.equal(small.indices[u], big.indices[u][:k]), (model_name, k, u)
        assert torch.equal(small.snapshot_all(params), snap[:, :k])


def test_snapshot_all_equals_per_unit_snapshots():
    torch.manual_seed(0)
    units = [[torch.randn(30, 20), torch.randn(20)], [torch.randn(5)], [torch.randn(3000), torch.randn(7, 7)]]
    tl = Tailor(units, 256, seed=1)
    both = tl.snapshot_all(units, [0, 2])
    assert torch.equal(both[0], tl.snapshot(0, units[0])) and torch.equal(both[1], tl.snapshot(2, units[2]))
    assert torch.equal(tl.snapshot_all(units, [0, 2]), both)  # the cached index gives the same
    assert torch.equal(tl.snapshot_all(units, [2])[0], both[1])
    # the cached plan's staging is reused: a later call sees the new weights, earlier results stay put
    with torch.no_grad():
        units[0][0].add_(1.0)
    again = tl.snapshot_all(units, [0, 2])
    assert torch.equal(again[0], tl.snapshot(0, units[0])) and torch.equal(again[1], both[1])
    assert not torch.equal(again[0], both[0])
    # other dtypes: snapshots in float32 of bf16 weights (copy path), and in the weights' own dtype
    half = [[t.to(torch.bfloat16) for t in u] for u in units]
    assert torch.equal(tl.snapshot_all(half, [0, 2]), torch.stack([tl.snapshot(0, half[0]), tl.snapshot(2, half[2])]))
    assert torch.equal(tl.snapshot_all(half, [2], dtype=torch.bfloat16)[0], tl.snapshot(2, half[2], torch.bfloat16))
    with pytest.raises(ValueError, match="tailored for"):  # checked when a unit set's plan is built
        tl.snapshot_all([units[0], units[1], [torch.randn(3000)]], [1, 2])
    with pytest.raises(ValueError, match="elements, tailored for"):
        tl.snapshot_all([units[0], [torch.randn(4)], units[2]], [0, 1])


def test_history_record_same_slot_and_mixed_slots():
    """record's one-slot store (all units at the same ring position) and its indexed store (after a drop,
    positions differ) give the same history as appending one unit at a time."""
    g = torch.Generator().manual_seed(0)
    a, b = HistoryBuffer(3, 4, 8), HistoryBuffer(3, 4, 8)
    for t in range(6):
        s = torch.randn(3, 8, generator=g)
        ids = [0, 1, 2] if t != 2 else [2, 0]
        a.record(ids, s[: len(ids)])
        for i, u in enumerate(ids):
            b.record([u], s[i : i + 1])
        if t == 3:
            a.drop(1)
            b.drop(1)
    assert torch.equal(a.buffer, b.buffer) and [a.count(u) for u in range(3)] == [b.count(u) for u in range(3)]
    assert torch.equal(a.windows([0, 2]), b.windows([0, 2]))
    with pytest.raises(ValueError, match="distinct"):
        a.record([0, 0], torch.zeros(2, 8))
    with pytest.raises(ValueError, match="shape"):
        a.record([0, 1], torch.zeros(3, 8))


@pytest.mark.parametrize("norm", ["first_delta", "diff", "standardize", "delta", "none"])
def test_probabilities_fast_path_is_bit_identical(norm):
    """The policy's scoring path (inference mode, ReLUs and normalisation in place) gives the same bits
    as ``softmax(forward)`` (the path evaluation and training use), for every normalisation mode."""
    torch.manual_seed(0)
    model = SmartFRZPredictor(tailor_size=64, norm=norm).eval()
    x = torch.randn(5, 7, 64).cumsum(1) * 0.01 + 0.3
    with torch.no_grad():
        ref = torch.softmax(model(x), dim=-1)
    assert torch.equal(model.probabilities(x), ref)
    y = x.clone()
    assert torch.equal(model.probabilities(y, inplace=True), ref)


def test_probabilities_fast_path_on_the_shipped_default():
    """The same on the shipped default predictor at the default job's size: 19 units, window 30, tailor 1024."""
    from freezebench.predictors.weights import DEFAULT_WEIGHTS, load_predictor

    model, _ = load_predictor(DEFAULT_WEIGHTS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 30, 1024, generator=g).mul_(1e-3).cumsum(1).add_(torch.randn(19, 1, 1024, generator=g))
    with torch.no_grad():
        ref = torch.softmax(model(x), dim=-1)
    assert torch.equal(model.probabilities(x.clone(), inplace=True), ref)
