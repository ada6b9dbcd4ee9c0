"""Tests of freezebench.analysis.similarity: published reference values, exact identities, degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freezebench.errors import FreezebenchError
from freezebench.analysis.similarity import (
    SimilarityError,
    center_gram,
    cka_from_grams,
    gram_linear,
    gram_rbf,
    linear_cka,
    linear_cka_batched,
    linear_cka_feature,
    linear_cka_gram,
    rbf_cka,
    sp_loss,
    sp_loss_batched,
    svcca,
    svcca_correlations,
)

# ----------------------------------------------------------------------------------------------------------
# Fixtures and a numpy port of Kornblith et al.'s reference code (google-research/representation_similarity)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_xy() -> tuple[torch.Tensor, torch.Tensor]:
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    return torch.from_numpy(X), torch.from_numpy(Y)


def _np_center_gram(gram: np.ndarray, unbiased: bool) -> np.ndarray:
    gram = gram.copy()
    n = gram.shape[0]
    if unbiased:
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def _np_cka(gx: np.ndarray, gy: np.ndarray, debiased: bool) -> float:
    gx, gy = _np_center_gram(gx, debiased), _np_center_gram(gy, debiased)
    return float(gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def _random_orthogonal(p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    return q


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


LINEAR_FORMS = [linear_cka, linear_cka_feature, linear_cka_gram]

# ----------------------------------------------------------------------------------------------------------
# Reference values (ALGORITHMS.md, "Shared measures")
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", LINEAR_FORMS)
def test_linear_cka_reference_value(ref_xy, fn):
    X, Y = ref_xy
    assert fn(X, Y) == pytest.approx(0.55761, abs=5e-6)


@pytest.mark.parametrize("fn", LINEAR_FORMS)
def test_debiased_linear_cka_reference_value(ref_xy, fn):
    X, Y = ref_xy
    assert fn(X, Y, debiased=True) == pytest.approx(0.51346, abs=5e-6)


def test_rbf_cka_reference_value(ref_xy):
    X, Y = ref_xy
    assert rbf_cka(X, Y, threshold=0.5) == pytest.approx(0.65483, abs=5e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_and_gram_forms_agree(ref_xy, debiased):
    X, Y = ref_xy
    assert linear_cka_feature(X, Y, debiased) == pytest.approx(linear_cka_gram(X, Y, debiased), abs=1e-10)
    # also on other shapes, including n < p and p != q
    for seed, (n, p, q) in enumerate([(7, 30, 3), (50, 5, 80), (200, 40, 40)]):
        A, B = _randn(n, p, seed=seed), _randn(n, q, seed=100 + seed)
        B[:, : min(p, q)] += A[:, : min(p, q)]
        assert linear_cka_feature(A, B, debiased) == pytest.approx(linear_cka_gram(A, B, debiased), abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_matches_numpy_reference_code(debiased):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 12))
    Y = rng.standard_normal((40, 6)) + X[:, :6] ** 2
    expected = _np_cka(X @ X.T, Y @ Y.T, debiased)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    assert linear_cka(Xt, Yt, debiased) == pytest.approx(expected, abs=1e-12)
    assert cka_from_grams(gram_linear(Xt), gram_linear(Yt), debiased) == pytest.approx(expected, abs=1e-12)


def test_gram_helpers_match_reference(ref_xy):
    X, Y = ref_xy
    K = gram_rbf(X, 0.5)
    assert K.shape == (100, 100) and K.dtype == torch.float64
    assert torch.allclose(torch.diagonal(K), torch.ones(100, dtype=torch.float64))
    assert cka_from_grams(K, gram_rbf(Y, 0.5)) == pytest.approx(0.65483, abs=5e-6)
    Kc = center_gram(gram_linear(X))
    assert torch.allclose(Kc.sum(0), torch.zeros(100, dtype=torch.float64), atol=1e-9)
    Ku = center_gram(gram_linear(X), unbiased=True)
    assert torch.all(torch.diagonal(Ku) == 0)


# ----------------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("fn", LINEAR_FORMS + [rbf_cka])
def test_cka_self_orthogonal_and_scale_invariance(ref_xy, fn, debiased):
    X, Y = ref_xy
    Q = _random_orthogonal(10, seed=3)
    assert fn(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert fn(X, X @ Q, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    base = fn(X, Y, debiased=debiased)
    assert fn(X * 7.5, Y, debiased=debiased) == pytest.approx(base, abs=1e-12)
    assert fn(X, Y * 1e-3, debiased=debiased) == pytest.approx(base, abs=1e-12)
    # invariant to a constant offset (centring)
    assert fn(X + 100.0, Y, debiased=debiased) == pytest.approx(base, abs=1e-9)


def test_svcca_identities(ref_xy):
    X, _ = ref_xy
    Q = _random_orthogonal(10, seed=4)
    assert svcca(X, X) == pytest.approx(1.0, abs=1e-10)
    assert svcca(X, X @ Q) == pytest.approx(1.0, abs=1e-10)
    A = _randn(10, 10, seed=5) + 3 * torch.eye(10, dtype=torch.float64)  # invertible
    assert svcca(X, X @ A, keep_variance=1.0) == pytest.approx(1.0, abs=1e-10)
    assert svcca(X, X @ A, k=10) == pytest.approx(1.0, abs=1e-10)
    # a wider linear map (more neurons, same information)
    W = _randn(10, 25, seed=6)
    assert svcca(X, X @ W, keep_variance=1.0) == pytest.approx(1.0, abs=1e-10)


def test_svcca_reduction_and_correlations(ref_xy):
    X, Y = ref_xy
    rho = svcca_correlations(X, Y, k=4)
    assert rho.shape == (4,)
    assert torch.all(rho[:-1] >= rho[1:]) and torch.all((0 <= rho) & (rho <= 1))
    assert svcca(X, Y, k=4) == pytest.approx(float(rho.mean()), abs=1e-15)
    # keeping all directions of full-rank 10-d data: k = 10 and keep_variance = 1 are the same
    assert svcca(X, Y, keep_variance=1.0) == pytest.approx(svcca(X, Y, k=10), abs=1e-12)
    # keeping 99% of the variance of data whose variance is concentrated in 3 directions keeps 3
    scales = torch.tensor([100.0, 50.0, 30.0] + [1e-3] * 7, dtype=torch.float64)
    Z = _randn(300, 10, seed=8) * scales
    assert svcca_correlations(Z, Z).shape == (3,)
    # k larger than the rank is capped at the rank
    assert svcca_correlations(X[:, :3], Y, k=8).shape == (3,)


def test_independent_data_scores_low():
    X, Y = _randn(4000, 10, seed=10), _randn(4000, 10, seed=11)
    assert linear_cka(X, Y) < 0.05
    assert abs(linear_cka(X, Y, debiased=True)) < 0.01
    assert svcca(X, Y) < 0.1


def test_biased_estimator_inflated_at_small_n():
    # ALGORITHMS.md: independent inputs give about 0.2 at n = 32 (biased), debiased stays near 0
    pairs = [(_randn(32, 10, seed=s), _randn(32, 10, seed=1000 + s)) for s in range(20)]
    vals = [linear_cka(X, Y) for X, Y in pairs]
    deb = [linear_cka(X, Y, debiased=True) for X, Y in pairs]
    assert 0.1 < float(np.mean(vals)) < 0.35
    assert abs(float(np.mean(deb))) < 0.05


# ----------------------------------------------------------------------------------------------------------
# Degenerate and rank-deficient inputs
# ----------------------------------------------------------------------------------------------------------


def _rank_deficient_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    X = _randn(60, 8, seed=20)
    Y = _randn(60, 8, seed=21) + X
    dup = torch.cat([X, X[:, :4], X[:, :4]], dim=1)
    const_cols = torch.cat([X, torch.full((60, 5), 3.0, dtype=torch.float64)], dim=1)
    wide_x, wide_y = _randn(12, 50, seed=22), _randn(12, 70, seed=23)
    zero_cols = torch.cat([torch.zeros(60, 3, dtype=torch.float64), Y], dim=1)
    return [
        ("duplicate columns", dup, Y),
        ("duplicate columns both", dup, torch.cat([Y, Y], dim=1)),
        ("constant columns", const_cols, Y),
        ("zero columns", X, zero_cols),
        ("n < p", wide_x, wide_y),
        ("n < p correlated", wide_x, wide_x[:, :30] + 0.1 * wide_y[:, :30]),
        ("rank one", X[:, :1] * torch.ones(1, 8, dtype=torch.float64), Y),
    ]


@pytest.mark.parametrize("name,X,Y", _rank_deficient_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_rank_deficient_inputs_are_finite_and_in_range(name, X, Y):
    tol = 1e-9
    for value in (
        linear_cka(X, Y),
        linear_cka_feature(X, Y),
        linear_cka_gram(X, Y),
        rbf_cka(X, Y),
        svcca(X, Y),
        svcca(X, Y, keep_variance=1.0),
        svcca(X, Y, k=5),
    ):
        assert math.isfinite(value) and -tol <= value <= 1 + tol, (name, value)
    for value in (linear_cka(X, Y, debiased=True), rbf_cka(X, Y, debiased=True)):
        assert math.isfinite(value) and value <= 1 + tol, (name, value)
    assert linear_cka_feature(X, Y, True) == pytest.approx(linear_cka_gram(X, Y, True), abs=1e-10)


def test_duplicate_columns_do_not_change_svcca():
    X, Y = _randn(200, 6, seed=30), _randn(200, 6, seed=31)
    Y = Y + X
    dup = torch.cat([X, X], dim=1)
    assert svcca(dup, Y, keep_variance=1.0) == pytest.approx(svcca(X, Y, keep_variance=1.0), abs=1e-10)


def test_constant_activation_gives_zero():
    X = _randn(50, 6, seed=40)
    const = torch.full((50, 4), 2.5, dtype=torch.float64)
    zeros = torch.zeros(50, 4, dtype=torch.float32)
    for C in (const, zeros, const.float() * 0.1):  # 0.1 * 2.5 is inexact: rounding residue must not count
        for debiased in (False, True):
            for fn in LINEAR_FORMS + [rbf_cka]:
                assert fn(C, X, debiased=debiased) == 0.0
                assert fn(X, C, debiased=debiased) == 0.0
                assert fn(C, C, debiased=debiased) == 0.0
        assert svcca(C, X) == 0.0 and svcca(C, C) == 0.0
        assert svcca_correlations(C, X).numel() == 0
        assert cka_from_grams(gram_rbf(C), gram_rbf(X)) == 0.0


def test_rbf_mostly_duplicate_inputs():
    # more than half of the squared distances are zero: the bandwidth falls back to the positive median
    X = torch.cat([torch.zeros(40, 3, dtype=torch.float64), _randn(5, 3, seed=41)])
    Y = X @ _random_orthogonal(3, seed=42)
    assert rbf_cka(X, Y) == pytest.approx(1.0, abs=1e-12)
    assert 0.0 <= rbf_cka(X, _randn(45, 3, seed=43)) <= 1.0


# ----------------------------------------------------------------------------------------------------------
# SP loss
# ----------------------------------------------------------------------------------------------------------


def test_sp_loss_properties():
    A = _randn(16, 3, 4, 4, seed=50)
    B = _randn(16, 8, seed=51)
    assert sp_loss(A, A) == 0.0
    assert sp_loss(A, 3.0 * A) == pytest.approx(0.0, abs=1e-15)
    assert sp_loss(A, B) == pytest.approx(sp_loss(B, A), abs=1e-15)
    assert 0.0 < sp_loss(A, B) <= 4.0 / 16
    # the flattened activation gives the same value
    assert sp_loss(A, B) == sp_loss(A.reshape(16, -1), B)


def test_sp_loss_hand_computed():
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # G = I
    B = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # G = [[1, 1], [1, 1]] -> rows / sqrt(2)
    s = 1 / math.sqrt(2)
    expected = ((1 - s) ** 2 * 2 + s**2 * 2) / 4
    assert sp_loss(A, B) == pytest.approx(expected, abs=1e-15)
    # a zero activation row is guarded (a zero row of G, no NaN)
    Z = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert sp_loss(Z, A) == pytest.approx(1 / 4, abs=1e-15)


def test_sp_loss_batched_matches_scalar():
    A, B = _randn(3, 10, 2, 5, seed=52), _randn(3, 10, 7, seed=53)
    batched = sp_loss_batched(A, B)
    assert batched.shape == (3,) and batched.dtype == torch.float64
    for i in range(3):
        assert float(batched[i]) == pytest.approx(sp_loss(A[i], B[i]), abs=1e-15)


# ----------------------------------------------------------------------------------------------------------
# dtype, shape, device, batching
# ----------------------------------------------------------------------------------------------------------


def test_float32_matches_float64(ref_xy):
    X, Y = ref_xy
    X32, Y32 = X.float(), Y.float()
    for fn in (linear_cka, linear_cka_feature, linear_cka_gram, rbf_cka, svcca, sp_loss):
        assert fn(X32, Y32) == pytest.approx(fn(X, Y), abs=1e-6), fn.__name__
    for fn in (linear_cka, rbf_cka):
        assert fn(X32, Y32, debiased=True) == pytest.approx(fn(X, Y, debiased=True), abs=1e-6)
    assert linear_cka(X.half(), Y.half()) == pytest.approx(linear_cka(X, Y), abs=1e-3)
    assert linear_cka(X.bfloat16(), Y.bfloat16()) == pytest.approx(linear_cka(X, Y), abs=1e-2)


def test_four_d_activations_are_flattened_per_input():
    A = _randn(24, 3, 5, 5, seed=60)
    B = _randn(24, 2, 4, 4, seed=61)
    B[:, 0] += A[:, 0, :4, :4]
    a, b = A.reshape(24, -1), B.reshape(24, -1)
    for fn in (linear_cka, linear_cka_feature, linear_cka_gram, rbf_cka, svcca, sp_loss):
        assert fn(A, B) == fn(a, b), fn.__name__
    assert linear_cka(A, B, debiased=True) == linear_cka(a, b, debiased=True)
    assert isinstance(linear_cka(A, B), float) and isinstance(svcca(A, B), float)


def test_linear_cka_batched_matches_scalar():
    X, Y = _randn(4, 30, 2, 6, seed=70), _randn(4, 30, 9, seed=71)
    Y[1] = X[1].reshape(30, -1)[:, :9] * 2.0
    X[2] = 1.0  # constant representation in the batch -> 0
    for debiased in (False, True):
        for form in ("auto", "feature", "gram"):
            out = linear_cka_batched(X, Y, debiased, form)
            assert out.shape == (4,) and out.dtype == torch.float64 and out.device == X.device
            expected = torch.tensor([linear_cka(X[i], Y[i], debiased) for i in range(4)], dtype=torch.float64)
            assert torch.allclose(out, expected, atol=1e-12, rtol=0)
            assert float(out[2]) == 0.0


def test_batched_keeps_autograd():
    X = _randn(2, 20, 5, seed=72).requires_grad_(True)
    Y = _randn(2, 20, 4, seed=73)
    out = linear_cka_batched(X, Y)
    out.sum().backward()
    assert X.grad is not None and torch.isfinite(X.grad).all()


def test_auto_form_choice_is_consistent():
    # n << p picks the Gram form, n >> p the feature form; the value is the same either way
    wide_x, wide_y = _randn(16, 300, seed=74), _randn(16, 200, seed=75)
    tall_x, tall_y = _randn(500, 4, seed=76), _randn(500, 3, seed=77)
    assert linear_cka(wide_x, wide_y) == pytest.approx(linear_cka_feature(wide_x, wide_y), abs=1e-12)
    assert linear_cka(tall_x, tall_y) == pytest.approx(linear_cka_gram(tall_x, tall_y), abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(ref_xy):
    X, Y = ref_xy
    Xc, Yc = X.float().cuda(), Y.float().cuda()
    for fn in (linear_cka, rbf_cka, svcca, sp_loss):
        assert fn(Xc, Yc) == pytest.approx(fn(X.float(), Y.float()), abs=1e-9), fn.__name__
    assert linear_cka_batched(Xc[None], Yc[None]).device.type == "cuda"


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def test_invalid_inputs_raise_actionable_errors():
    X = _randn(10, 4, seed=80)
    with pytest.raises(SimilarityError, match="same inputs"):
        linear_cka(X, X[:9])
    with pytest.raises(SimilarityError, match="n >= 4|at least 4"):
        linear_cka(X[:3], X[:3], debiased=True)
    with pytest.raises(SimilarityError, match="at least 2"):
        linear_cka(X[:1], X[:1])
    with pytest.raises(SimilarityError, match="keep_variance"):
        svcca(X, X, keep_variance=0.0)
    with pytest.raises(SimilarityError, match="k must"):
        svcca(X, X, k=0)
    with pytest.raises(SimilarityError, match="threshold"):
        rbf_cka(X, X, threshold=0.0)
    with pytest.raises(SimilarityError, match="form"):
        linear_cka(X, X, form="dual")  # type: ignore[arg-type]
    with pytest.raises(SimilarityError, match="symmetric"):
        cka_from_grams(X[:, :4].repeat(1, 3)[:, :10][:10], gram_linear(X))
    with pytest.raises(SimilarityError, match="same inputs"):
        sp_loss(X, X[:5])
    with pytest.raises(SimilarityError, match="empty"):
        linear_cka(X[:0], X[:0])
    # errors are user-facing freezebench errors and still ValueErrors
    assert issubclass(SimilarityError, FreezebenchError) and issubclass(SimilarityError, ValueError)


def test_non_finite_input_is_not_hidden():
    X = _randn(10, 4, seed=81)
    X[0, 0] = float("nan")
    Y = _randn(10, 4, seed=82)
    for fn in LINEAR_FORMS + [rbf_cka, svcca, sp_loss]:
        assert math.isnan(fn(X, Y)) and math.isnan(fn(Y, X)), fn.__name__
    assert math.isnan(linear_cka(X, Y, debiased=True))
    assert math.isnan(linear_cka(X.clone().fill_(float("inf")), Y))
    assert torch.isnan(linear_cka_batched(X[None], Y[None])).all()


# ----------------------------------------------------------------------------------------------------------
# Property test
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 40),
    p=st.integers(1, 30),
    q=st.integers(1, 30),
    mix=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_cka_bounded_and_symmetric(n, p, q, mix, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.01, 100.0)
    Y = rng.standard_normal((n, q))
    k = min(p, q)
    Y[:, :k] += mix * X[:, :k]
    X, Y = torch.from_numpy(X), torch.from_numpy(Y)
    for fn in LINEAR_FORMS + [rbf_cka]:
        xy, yx = fn(X, Y), fn(Y, X)
        assert 0.0 <= xy <= 1.0 + 1e-9
        assert xy == pytest.approx(yx, abs=1e-12)
    assert linear_cka_feature(X, Y) == pytest.approx(linear_cka_gram(X, Y), abs=1e-10)
    s = svcca(X, Y)
    assert 0.0 <= s <= 1.0 + 1e-9 and s == pytest.approx(svcca(Y, X), abs=1e-9)
    if n >= 4:
        d = linear_cka(X, Y, debiased=True)
        assert math.isfinite(d) and d <= 1.0 + 1e-9
        assert d == pytest.approx(linear_cka(Y, X, debiased=True), abs=1e-12)
        assert linear_cka_feature(X, Y, True) == pytest.approx(linear_cka_gram(X, Y, True), abs=1e-10)
