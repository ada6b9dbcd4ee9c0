"""Representation-similarity measures shared by the freezing policies.

Every measure compares the activations of two units on the *same* n inputs: ``X`` of shape (n, p) and ``Y``
of shape (n, q). Anything with more dimensions is flattened per input (``X.reshape(n, -1)``), so conv
activations (n, c, h, w) can be passed as they are.

Measures
--------
* **Linear CKA** -- Kornblith, Norouzi, Lee and Hinton, "Similarity of Neural Network Representations
  Revisited", ICML 2019 (and SmartFRZ eq. 5). :func:`linear_cka` picks the feature form
  ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` or the equal Gram form (centred HSIC of
  ``K = X X^T`` and ``L = Y Y^T``) by cost; both are public as :func:`linear_cka_feature` and
  :func:`linear_cka_gram`. ``debiased=True`` uses the unbiased HSIC estimator of Song, Smola, Gretton,
  Bedo and Borgwardt, "Feature Selection via Dependence Maximization", JMLR 2012, exactly as in Kornblith
  et al.'s reference code (debiased dot-product similarity in feature space, U-centred Grams in Gram
  space); the two forms agree to rounding.
* **RBF CKA** -- :func:`rbf_cka`, the same paper's RBF-kernel CKA with the reference code's bandwidth.
* **SVCCA** -- Raghu, Gilmer, Yosinski and Sohl-Dickstein, "SVCCA: Singular Vector Canonical Correlation
  Analysis for Deep Learning Dynamics and Interpretability", NeurIPS 2017: :func:`svcca` and
  :func:`svcca_correlations`.
* **SP loss / plasticity** -- Egeria (Wang et al., "Egeria: Efficient DNN Training with Knowledge-Guided
  Layer Freezing", EuroSys 2023), which takes the similarity-preserving loss of Tung and Mori,
  "Similarity-Preserving Knowledge Distillation", ICCV 2019: :func:`sp_loss`.

Reference values (``np.random.seed(1337); X = np.random.randn(100, 10); Y = np.random.randn(100, 10) + X``):
linear CKA 0.55761, debiased linear CKA 0.51346, RBF CKA (threshold 0.5) 0.65483.

Conventions
-----------
* **Precision and device.** Inputs may be any real dtype on any device. Work is done in float64 on the
  input's device (MPS has no float64, so MPS inputs are computed on the CPU). The scalar functions
  (:func:`linear_cka`, :func:`rbf_cka`, :func:`svcca`, :func:`sp_loss`, ...) return a Python ``float`` and
  run without autograd. The ``*_batched`` functions return float64 tensors on the input's device, do not
  synchronise with the device and keep autograd (differentiable away from the degenerate cases below);
  :func:`svcca_correlations` returns a tensor too (it synchronises to choose the ranks).
* **Zero variance.** A representation that does not vary across the n inputs (every input gives the same
  activation, up to rounding: ``||X - mean(X)||_F <= 1e-10 ||X||_F``) carries no information about the
  inputs; its similarity to anything, itself included, is defined as **0.0** (not NaN). The same holds
  for a Gram matrix that centring sends to zero (RBF of identical points) and for any CKA whose
  normalising term is not positive. Square roots are taken of positive values only.
* **Range.** Biased CKA and SVCCA lie in [0, 1] (up to rounding). Debiased CKA is an unbiased estimate,
  so it is not clamped: it is near 0 for independent data and can be slightly negative.
* **Non-finite activations** are not hidden: a NaN or infinity in the input gives NaN.
* **Sample size.** The biased CKA estimator is inflated when n is small relative to the feature count p:
  independent standard-normal inputs at n = 64 give 0.135 (p = 10), 0.498 (p = 64), 0.941 (p = 1024) and
  0.996 (p = 16384); at n = 256, 0.800 with p = 1024. The debiased estimator stays at 0.00 +- 0.03 at n = 64
  for all these p (measured, 10 draws each; see :mod:`freezebench.analysis.oracle`, which uses it for that
  reason). The probe size and the estimator must be recorded config values. SVCCA needs several times more inputs than
  kept directions (see :func:`svcca`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from freezebench.errors import FreezebenchError

__all__ = [
    "SimilarityError",
    "center_gram",
    "cka_from_grams",
    "gram_linear",
    "gram_rbf",
    "linear_cka",
    "linear_cka_batched",
    "linear_cka_feature",
    "linear_cka_gram",
    "rbf_cka",
    "sp_loss",
    "sp_loss_batched",
    "svcca",
    "svcca_correlations",
]

# A centred representation whose Frobenius norm is below this fraction of the raw one is constant up to the
# rounding error of the mean (float64 centring leaves ~1e-16 relative residue; float32 inputs cannot carry
# genuine relative variation below ~1e-7).
_ZERO_VARIANCE_RTOL = 1e-10

# Squared distances below this fraction of |a|^2 + |b|^2 are rounding residue of equal inputs (relative
# distance 1e-6, below float32 resolution of the activations' scale) and are set to 0.
_DUPLICATE_RTOL = 1e-12

Form = Literal["auto", "feature", "gram"]


class SimilarityError(FreezebenchError, ValueError):
    """The activations or parameters given to a similarity measure cannot be used."""


# --------------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------------


def _work_device(t: Tensor) -> torch.device:
    # MPS has no float64: compute there on the CPU instead.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _as_float64(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise SimilarityError(f"activations must be torch tensors, got {type(t).__name__}")
    if t.is_complex():
        raise SimilarityError("activations must be real, got a complex tensor")
    return t.to(device=_work_device(t), dtype=torch.float64)


def _flatten(X: Tensor, name: str) -> Tensor:
    """(n, ...) -> float64 (n, d)."""
    if X.dim() < 1:
        raise SimilarityError(f"{name} must have a leading dimension of inputs (n, ...), got a scalar")
    if X.numel() == 0:
        raise SimilarityError(f"{name} is empty (shape {tuple(X.shape)}); pass activations of n >= 1 inputs")
    return _as_float64(X).reshape(X.shape[0], -1)


def _flatten_batched(X: Tensor, name: str) -> Tensor:
    """(B, n, ...) -> float64 (B, n, d)."""
    if X.dim() < 2 or X.numel() == 0:
        raise SimilarityError(f"{name} must be a non-empty (B, n, ...) tensor, got shape {tuple(X.shape)}")
    return _as_float64(X).reshape(X.shape[0], X.shape[1], -1)


def _check_pair(x: Tensor, y: Tensor, *, min_n: int = 2, what: str = "this measure") -> int:
    """Validate two (..., n, d) activations of the same inputs; returns n."""
    if x.shape[:-1] != y.shape[:-1]:
        raise SimilarityError(
            f"X and Y must hold activations of the same inputs: leading shapes {tuple(x.shape[:-1])} and "
            f"{tuple(y.shape[:-1])} differ (pass the same probe batch to both units)"
        )
    if x.device != y.device:
        raise SimilarityError(f"X and Y are on different devices ({x.device} and {y.device}); move one")
    n = x.shape[-2]
    if n < min_n:
        raise SimilarityError(f"{what} needs at least {min_n} inputs, got n = {n}; use a larger probe batch")
    if x.shape[-1] == 0 or y.shape[-1] == 0:
        raise SimilarityError("X and Y must have at least one feature per input")
    return n


def _centre(x: Tensor) -> Tensor:
    """Column-centre (..., n, d) over the n inputs (two passes: the second removes the rounding residue)."""
    x = x - x.mean(dim=-2, keepdim=True)
    return x - x.mean(dim=-2, keepdim=True)


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """Frobenius inner product over the last two dimensions (a batched dot product: no n x n temporary)."""
    return (a.flatten(-2).unsqueeze(-2) @ b.flatten(-2).unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _fro2(a: Tensor) -> Tensor:
    """Squared Frobenius norm over the last two dimensions."""
    return _inner(a, a)


def _varies(centred: Tensor, raw: Tensor) -> Tensor:
    """True where a centred representation (or Gram matrix) is not constant up to rounding (batched)."""
    c = _fro2(centred)
    r = _fro2(raw)
    # written as "not below" so that NaN (non-finite activations) counts as varying and propagates
    return ~((c <= 0) | (c <= (_ZERO_VARIANCE_RTOL**2) * r))


def _cka_ratio(hsic_xy: Tensor, hsic_xx: Tensor, hsic_yy: Tensor, valid: Tensor) -> Tensor:
    """hsic_xy / sqrt(hsic_xx hsic_yy), defined as 0 where invalid or a normaliser is not positive."""
    ok = valid & ~(hsic_xx <= 0) & ~(hsic_yy <= 0)  # NaN stays NaN
    den = torch.sqrt(torch.where(ok, hsic_xx * hsic_yy, torch.ones_like(hsic_xx)))
    return torch.where(ok, hsic_xy / den, torch.zeros_like(hsic_xy))


# --------------------------------------------------------------------------------------------------------
# Gram matrices and centring
# --------------------------------------------------------------------------------------------------------


def _center_gram(K: Tensor, unbiased: bool) -> Tensor:
    """Centre (..., n, n) symmetric Gram matrices as Kornblith et al.'s ``center_gram``.

    Biased: ``H K H`` with ``H = I - 11^T/n``. Unbiased: the U-centring for which
    ``<U(K), U(L)>_F`` is (n(n-3) times) the unbiased HSIC estimator of Song et al. 2012.
    """
    n = K.shape[-1]
    if unbiased:
        eye = torch.eye(n, dtype=torch.bool, device=K.device)
        K = K.masked_fill(eye, 0.0)
        means = K.sum(dim=-2) / (n - 2)
        means = means - means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
        K = K - means.unsqueeze(-1) - means.unsqueeze(-2)
        return K.masked_fill(eye, 0.0)
    means = K.mean(dim=-2)
    means = means - means.mean(dim=-1, keepdim=True) / 2
    return K - means.unsqueeze(-1) - means.unsqueeze(-2)


def _cka_grams(K: Tensor, L: Tensor, debiased: bool) -> Tensor:
    """CKA of (..., n, n) Gram matrices; 0 where either centres to zero."""
    Kc = _center_gram(K, debiased)
    Lc = _center_gram(L, debiased)
    valid = _varies(Kc, K) & _varies(Lc, L)
    return _cka_ratio(_inner(Kc, Lc), _fro2(Kc), _fro2(Lc), valid)


def _sq_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of (..., n, d), >= 0 with an exact zero diagonal.

    Computed as ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product), which leaves rounding residue where
    ``a = b``: distances below ``_DUPLICATE_RTOL * (|a|^2 + |b|^2)`` are set to exactly 0, so duplicate
    inputs are recognised as such (they decide the median bandwidth).
    """
    # Only used without autograd (rbf_cka, gram_rbf), so the n x n work is done in place.
    x = _centre(x)  # translation-invariant; centring reduces cancellation in |a|^2 + |b|^2 - 2ab
    d = x @ x.mT
    sq = torch.diagonal(d, dim1=-2, dim2=-1).clone()
    scale = sq.unsqueeze(-1) + sq.unsqueeze(-2)
    d.mul_(-2.0).add_(scale).clamp_min_(0.0)
    d.masked_fill_(d <= scale.mul_(_DUPLICATE_RTOL), 0.0)
    torch.diagonal(d, dim1=-2, dim2=-1).zero_()
    return d


def _median_all(d: Tensor) -> Tensor:
    """numpy.median over the last two dimensions (mean of the two middle values when the count is even)."""
    flat = d.reshape(*d.shape[:-2], -1)
    m = flat.shape[-1]
    lo = torch.kthvalue(flat, (m - 1) // 2 + 1, dim=-1).values
    hi = torch.kthvalue(flat, m // 2 + 1, dim=-1).values
    return (lo + hi) / 2


def _median_positive(d: Tensor) -> Tensor:
    """numpy-style median of the strictly positive entries over the last two dimensions (0 if none)."""
    flat = d.reshape(*d.shape[:-2], -1)
    count = (flat > 0).sum(dim=-1, keepdim=True)
    vals = torch.where(flat > 0, flat, torch.full_like(flat, float("inf"))).sort(dim=-1).values
    lo = vals.gather(-1, ((count - 1) // 2).clamp_min(0))
    hi = vals.gather(-1, (count // 2).clamp_max(flat.shape[-1] - 1))
    med = torch.where(count % 2 == 1, lo, (lo + hi) / 2)
    return torch.where(count > 0, med, torch.zeros_like(med)).squeeze(-1)


def _gram_rbf(x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """RBF Gram matrices of (..., n, d) and a mask of where the bandwidth is defined.

    ``sigma^2 = threshold^2 * median(squared distances)``, the median taken over all n^2 entries (the
    zero diagonal included) exactly as in Kornblith et al.'s ``gram_rbf``. Where more than half of the
    distances are zero (many duplicate inputs) that median is 0 and the median of the positive distances
    is used instead; where every distance is zero the inputs are identical and the mask is False.
    """
    d = _sq_distances(x)
    med = _median_all(d)
    if not bool((med > 0).all()):  # rare: computed only when needed (a full sort)
        med = torch.where(med > 0, med, _median_positive(d))
    ok = med > 0
    scale = 2.0 * threshold**2 * torch.where(ok, med, torch.ones_like(med))
    return d.div_(-scale[..., None, None]).exp_(), ok


def gram_linear(X: Tensor) -> Tensor:
    """Linear-kernel Gram matrix ``X X^T`` (float64, (n, n)) of activations (n, ...)."""
    x = _flatten(X, "X")
    return x @ x.T


@torch.no_grad()
def gram_rbf(X: Tensor, threshold: float = 0.5) -> Tensor:
    """RBF-kernel Gram matrix (float64, (n, n)) of activations (n, ...), bandwidth as :func:`rbf_cka`.

    Identical inputs (all distances zero) give the all-ones matrix.
    """
    _check_threshold(threshold)
    K, _ = _gram_rbf(_flatten(X, "X"), threshold)
    return K


def center_gram(K: Tensor, unbiased: bool = False) -> Tensor:
    """Centre a symmetric (n, n) Gram matrix: ``H K H``, or the U-centring of the unbiased HSIC."""
    K = _as_float64(K)
    _check_gram(K, "K", unbiased)
    return _center_gram(K, unbiased)


def _check_gram(K: Tensor, name: str, debiased: bool) -> None:
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise SimilarityError(f"{name} must be a square (n, n) Gram matrix, got shape {tuple(K.shape)}")
    min_n = 4 if debiased else 2
    if K.shape[0] < min_n:
        raise SimilarityError(
            f"{'debiased ' if debiased else ''}CKA needs n >= {min_n} inputs, got n = {K.shape[0]}"
        )
    if not torch.allclose(K, K.T, rtol=1e-6, atol=1e-8 * float(K.abs().max().clamp_min(1.0))):
        raise SimilarityError(f"{name} must be symmetric (a Gram matrix of the same inputs)")


def _check_threshold(threshold: float) -> None:
    if not (threshold > 0):
        raise SimilarityError(
            f"threshold must be > 0 (RBF bandwidth as a fraction of the median distance), got {threshold}"
        )


# --------------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------------


def _debiased_dot(xty: Tensor, rows_x: Tensor, rows_y: Tensor, sq_x: Tensor, sq_y: Tensor, n: int) -> Tensor:
    """Kornblith et al.'s ``_debiased_dot_product_similarity_helper``: unbiased HSIC in feature space."""
    return xty - n / (n - 2.0) * (rows_x * rows_y).sum(-1) + sq_x * sq_y / ((n - 1.0) * (n - 2.0))


def _linear_cka_feature(x: Tensor, y: Tensor, debiased: bool) -> Tensor:
    """Feature-space linear CKA of (B, n, p) and (B, n, q) float64 activations -> (B,)."""
    n = x.shape[-2]
    xc, yc = _centre(x), _centre(y)
    valid = _varies(xc, x) & _varies(yc, y)
    xty = _fro2(xc.mT @ yc)
    xtx = _fro2(xc.mT @ xc)
    yty = _fro2(yc.mT @ yc)
    if debiased:
        rows_x = xc.square().sum(-1)  # squared norm of each input's centred activation, (B, n)
        rows_y = yc.square().sum(-1)
        sq_x, sq_y = rows_x.sum(-1), rows_y.sum(-1)
        xty = _debiased_dot(xty, rows_x, rows_y, sq_x, sq_y, n)
        xtx = _debiased_dot(xtx, rows_x, rows_x, sq_x, sq_x, n)
        yty = _debiased_dot(yty, rows_y, rows_y, sq_y, sq_y, n)
    return _cka_ratio(xty, xtx, yty, valid)


def _linear_cka_gram(x: Tensor, y: Tensor, debiased: bool) -> Tensor:
    """Gram-space linear CKA of (B, n, p) and (B, n, q) float64 activations -> (B,)."""
    xc, yc = _centre(x), _centre(y)
    valid = _varies(xc, x) & _varies(yc, y)
    # xc is column-centred, so xc xc^T is already doubly centred: only the unbiased estimator recentres
    Kc = _center_gram(xc @ xc.mT, True) if debiased else xc @ xc.mT
    Lc = _center_gram(yc @ yc.mT, True) if debiased else yc @ yc.mT
    return _cka_ratio(_inner(Kc, Lc), _fro2(Kc), _fro2(Lc), valid)


def _use_gram(n: int, p: int, q: int) -> bool:
    """The cheaper form: Gram costs n^2 (p + q) multiply-adds, features n (p^2 + pq + q^2)."""
    return n * (p + q) < p * p + p * q + q * q


def _linear_cka(x: Tensor, y: Tensor, debiased: bool, form: Form) -> Tensor:
    n = _check_pair(x, y, min_n=4 if debiased else 2, what=f"{'debiased ' if debiased else ''}linear CKA")
    if form == "auto":
        form = "gram" if _use_gram(n, x.shape[-1], y.shape[-1]) else "feature"
    if form == "gram":
        return _linear_cka_gram(x, y, debiased)
    if form == "feature":
        return _linear_cka_feature(x, y, debiased)
    raise SimilarityError(f"form must be 'auto', 'feature' or 'gram', got {form!r}")


@torch.no_grad()
def linear_cka(X: Tensor, Y: Tensor, debiased: bool = False, form: Form = "auto") -> float:
    """Linear CKA (Kornblith et al. 2019) between activations X (n, ...) and Y (n, ...) of the same inputs.

    ``form="auto"`` computes the Gram form when ``n (p + q) < p^2 + pq + q^2`` (roughly n < p + q: the
    Gram form then takes fewer multiply-adds, and its n x n memory is the smaller one) and the feature
    form otherwise; both give the same value to rounding. ``debiased=True`` uses the unbiased HSIC
    estimator (needs n >= 4); its value is not clamped and can be slightly negative.

    Returns a float in [0, 1]; 0.0 when X or Y does not vary across the inputs.
    """
    x, y = _flatten(X, "X"), _flatten(Y, "Y")
    return float(_linear_cka(x[None], y[None], debiased, form)[0])


@torch.no_grad()
def linear_cka_feature(X: Tensor, Y: Tensor, debiased: bool = False) -> float:
    """Linear CKA in feature space: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.

    See :func:`linear_cka`. Costs n (p^2 + pq + q^2) multiply-adds and (p + q)^2 memory: the choice when
    n is large.
    """
    return linear_cka(X, Y, debiased, form="feature")


@torch.no_grad()
def linear_cka_gram(X: Tensor, Y: Tensor, debiased: bool = False) -> float:
    """Linear CKA in Gram space: centred HSIC of ``X X^T`` and ``Y Y^T`` (see :func:`linear_cka`).

    Costs n^2 (p + q) multiply-adds and n^2 memory: the choice when n << p (flattened conv activations).
    """
    return linear_cka(X, Y, debiased, form="gram")


def linear_cka_batched(X: Tensor, Y: Tensor, debiased: bool = False, form: Form = "auto") -> Tensor:
    """Linear CKA of B pairs at once: X (B, n, ...) and Y (B, n, ...) -> float64 tensor (B,).

    Stays on the input's device without synchronising and keeps autograd; otherwise as :func:`linear_cka`
    (the form is chosen once for the whole batch).
    """
    return _linear_cka(_flatten_batched(X, "X"), _flatten_batched(Y, "Y"), debiased, form)


@torch.no_grad()
def cka_from_grams(K: Tensor, L: Tensor, debiased: bool = False) -> float:
    """CKA of two symmetric (n, n) Gram matrices of the same inputs (any kernel).

    ``<c(K), c(L)>_F / (||c(K)||_F ||c(L)||_F)`` with ``c`` the centring of :func:`center_gram`
    (U-centring when ``debiased``). 0.0 when either matrix centres to zero (a constant kernel).
    """
    K, L = _as_float64(K), _as_float64(L)
    _check_gram(K, "K", debiased)
    _check_gram(L, "L", debiased)
    if K.shape != L.shape:
        raise SimilarityError(
            f"K and L must be Gram matrices of the same inputs: shapes {tuple(K.shape)} and {tuple(L.shape)}"
        )
    if K.device != L.device:
        raise SimilarityError(f"K and L are on different devices ({K.device} and {L.device}); move one")
    return float(_cka_grams(K, L, debiased))


@torch.no_grad()
def rbf_cka(X: Tensor, Y: Tensor, threshold: float = 0.5, debiased: bool = False) -> float:
    """CKA with an RBF kernel (Kornblith et al. 2019) between activations X (n, ...) and Y (n, ...).

    ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` with ``sigma^2 = threshold^2 * median(D)``, D the n x n
    squared distances, the median over all n^2 entries (zero diagonal included) as in the reference code
    (this reproduces its published values: the median of the nonzero distances alone gives 0.65401
    instead of 0.65483 on the reference data). Where that median is 0 because most inputs are
    duplicates, the median of the positive distances is used. Centred HSIC (unbiased when ``debiased``;
    n >= 4).

    Returns a float; 0.0 when X or Y does not vary across the inputs.
    """
    _check_threshold(threshold)
    x, y = _flatten(X, "X"), _flatten(Y, "Y")
    _check_pair(x, y, min_n=4 if debiased else 2, what=f"{'debiased ' if debiased else ''}RBF CKA")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return float("nan")
    K, ok_x = _gram_rbf(x, threshold)
    L, ok_y = _gram_rbf(y, threshold)
    if not (bool(ok_x) and bool(ok_y)):
        return 0.0
    return float(_cka_grams(K, L, debiased))


# --------------------------------------------------------------------------------------------------------
# SVCCA
# --------------------------------------------------------------------------------------------------------


def _svcca_basis(x: Tensor, keep_variance: float, k: int | None) -> Tensor:
    """Orthonormal basis (n, r) of the top singular directions of the centred (n, d) activations.

    ``U_r = Xc V_r S_r^{-1}`` is the whitened reduced data itself, so no inverse matrix square root is
    needed. Directions with singular values at rounding level (duplicate or constant columns, n < d)
    are dropped first; r = 0 for a constant representation.
    """
    xc = _centre(x)
    if not bool(_varies(xc, x)):
        return xc.new_zeros(x.shape[0], 0)
    U, S, _ = torch.linalg.svd(xc, full_matrices=False)
    tol = S[0] * max(xc.shape) * torch.finfo(torch.float64).eps
    rank = int((S > tol).sum())
    if k is not None:
        r = min(k, rank)
    else:
        var = S[:rank].square()
        frac = torch.cumsum(var, 0) / var.sum()
        # smallest r whose leading directions hold keep_variance of the variance (rounding-tolerant)
        r = min(int((frac < keep_variance - 1e-12).sum()) + 1, rank)
    return U[:, :r]


def svcca_correlations(X: Tensor, Y: Tensor, keep_variance: float = 0.99, k: int | None = None) -> Tensor:
    """The canonical correlations of SVCCA (see :func:`svcca`), a float64 tensor sorted descending.

    There are min(r_x, r_y) of them (r = directions kept per side); empty when either side is constant.
    """
    if k is None:
        if not (0.0 < keep_variance <= 1.0):
            raise SimilarityError(f"keep_variance must be in (0, 1], got {keep_variance}")
    elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SimilarityError(f"k must be a positive int (directions kept per side) or None, got {k!r}")
    x, y = _flatten(X, "X"), _flatten(Y, "Y")
    _check_pair(x, y, min_n=2, what="SVCCA")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return x.new_full((1,), float("nan"))
    ux = _svcca_basis(x, keep_variance, k)
    uy = _svcca_basis(y, keep_variance, k)
    if ux.shape[1] == 0 or uy.shape[1] == 0:
        return x.new_zeros(0)
    # Canonical correlations between the two reduced sets = cosines of the principal angles between their
    # column spaces = singular values of Ux^T Uy (Bjorck and Golub 1973).
    return torch.linalg.svdvals(ux.T @ uy).clamp(0.0, 1.0)


@torch.no_grad()
def svcca(X: Tensor, Y: Tensor, keep_variance: float = 0.99, k: int | None = None) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation of the SVD-reduced activations.

    Each of X (n, ...) and Y (n, ...) is centred over the inputs and reduced to its top singular directions
    holding ``keep_variance`` of the variance (or exactly ``k``, capped at the numerical rank); the
    canonical correlations between the two reduced sets are the singular values of ``Qx^T Qy`` for
    orthonormal bases Qx, Qy of the reduced data (numerically stable: no covariance inverse, so no NaN on
    duplicate or constant columns or n < p, the known failure of the reference code). Returns their mean,
    in [0, 1]; 0.0 when X or Y is constant.

    Use several times more inputs n than kept directions: with r_x + r_y close to n - 1 the two subspaces
    of the n-dimensional sample space overlap by dimension count alone and the score tends to 1 whatever
    the representations.
    """
    rho = svcca_correlations(X, Y, keep_variance, k)
    return float(rho.mean()) if rho.numel() else 0.0


# --------------------------------------------------------------------------------------------------------
# SP loss (Egeria plasticity)
# --------------------------------------------------------------------------------------------------------


def _normalised_gram(t: Tensor) -> Tensor:
    g = t @ t.mT
    norms = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    # a zero activation gives a zero row, which stays zero
    return g / norms.clamp_min(torch.finfo(torch.float64).tiny)


def _sp_loss(a: Tensor, b: Tensor) -> Tensor:
    """SP loss of (..., n, d) and (..., n, d') float64 activations -> (...)."""
    n = a.shape[-2]
    return _fro2(_normalised_gram(a) - _normalised_gram(b)) / (n * n)


@torch.no_grad()
def sp_gram(A: Tensor) -> Tensor:
    """``row_l2_normalise(A A^T)`` (float64, on A's device): one side of the SP loss, for caching.

    ``sp_loss(A, B) == sp_loss_from_grams(sp_gram(A), sp_gram(B))``; a policy comparing against a fixed
    reference keeps the reference's b x b gram instead of its activations.
    """
    a = _flatten(A, "A")
    if a.shape[0] < 1:
        raise SimilarityError("SP loss needs at least 1 input")
    return _normalised_gram(a)


def sp_loss_from_grams(G: Tensor, H: Tensor) -> float:
    """SP loss from two :func:`sp_gram` matrices of the same b inputs: ``||G - H||_F^2 / b^2``."""
    if G.shape != H.shape or G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise SimilarityError(f"SP grams must be equal square matrices, got {tuple(G.shape)} and {tuple(H.shape)}")
    n = G.shape[0]
    return float(_fro2(G.double() - H.to(G.device, torch.float64)) / (n * n))


@torch.no_grad()
def sp_loss(A: Tensor, B: Tensor) -> float:
    """Similarity-preserving loss (Tung and Mori 2019), Egeria's plasticity of a unit.

    ``G = row_l2_normalise(A A^T)``, ``G' = row_l2_normalise(B B^T)`` for activations A (b, ...) of the
    training model and B (b, ...) of the reference on the same probe batch of b inputs;
    returns ``||G - G'||_F^2 / b^2``. Zero for identical inputs (and for B = c A, c != 0), symmetric,
    at most 4 / b. Not centred: an all-zero activation row gives a zero row of G.
    """
    a, b = _flatten(A, "A"), _flatten(B, "B")
    _check_pair(a, b, min_n=1, what="SP loss")
    return float(_sp_loss(a, b))


def sp_loss_batched(A: Tensor, B: Tensor) -> Tensor:
    """SP loss of K pairs at once: A (K, b, ...) and B (K, b, ...) -> float64 tensor (K,).

    Stays on the input's device without synchronising and keeps autograd; otherwise as :func:`sp_loss`.
    """
    a, b = _flatten_batched(A, "A"), _flatten_batched(B, "B")
    _check_pair(a, b, min_n=1, what="SP loss")
    return _sp_loss(a, b)
