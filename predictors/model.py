"""SmartFRZ's attention-based freeze predictor (paper eq. 1-4 and Appendix C).

For a window ``x_1..x_W`` of one unit's tailored snapshots (oldest first, ``x_W = x_t`` the latest):

* ``K_j = MLP_k(x_j)``, ``V_j = MLP_v(x_j)`` for every j in the window; ``Q_t = MLP_q(x_t)`` for the latest
  snapshot only (eq. 1 defines ``Q_j`` for every j, but eq. 2 uses only ``Q_t``, so computing the others
  would be wasted work);
* ``a_j = Q_t . K_j``, ``alpha = softmax(a)`` over the window (eq. 2), **not scaled by sqrt(d)**: the paper's
  eq. 2 is a plain dot product, and we follow it (``scale`` lets a later experiment change that);
* ``C_t = sum_j alpha_j V_j`` (eq. 3); logits ``MLP_z(C_t)`` (2 classes); ``softmax`` gives the confidence
  scores; class 1 ("freeze") wins -> freeze (eq. 4; a tie means "do not freeze").

Sizes (Appendix C): ``MLP_k/q/v``: ``tailor_size -> 256 -> 256 -> 64``; ``MLP_z``: ``64 -> 32 -> 32 -> 2``.
"Three-layer MLP" = three ``nn.Linear`` layers with biases. The activation is not given by the paper: we use
ReLU between layers and none after the last layer (logits/keys stay signed). One attention layer, one head.
Parameters at tailor 1024: 3 x 344,640 + 3,202 = 1,037,122 (4,148,488 bytes in fp32: the paper's "about
4 MB").

Input normalisation is not specified by the paper: :func:`normalize` offers ``first_delta``,
``diff``, ``standardize``, ``delta`` and ``none``; the predictor applies its ``norm`` mode inside
``forward``, so a trained predictor carries its mode. The shipped family's mode was chosen by validation
on held-out runs (``predictors/train.py``; figures in the policy's method card). ``delta`` (differences to
the latest snapshot) is kept only to read old files: it makes the latest row all zeros, so the query
``MLP_q(0)`` is a constant and the attention no longer depends on the current weights (section 3.2).

FLOPs (:func:`predictor_flops`): matmul FLOPs only (2 per multiply-add; biases, ReLU, softmax and the
normalisation excluded), the convention of ``torch.utils.flop_counter``. At window 30, tailor 1024:
41,989,760 FLOPs = 0.042 GFLOPs per unit per inference. The paper reports 0.12 GFLOPs; computing ``Q_j`` for
all j (``query_all=True``) gives 0.062 GFLOPs, so the paper's figure presumably counts differently
(e.g. more than 2 FLOPs per multiply-add); it does not say.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORM_MODES", "QUERY_MODES", "normalize", "normalize_", "mlp", "SmartFRZPredictor", "predictor_params", "predictor_flops"]

NORM_MODES = ("first_delta", "diff", "standardize", "delta", "none")
#: the modes whose query depends on the current snapshot (``delta`` does not; see the module docstring)
QUERY_MODES = ("first_delta", "diff", "standardize", "none")


def normalize(windows: torch.Tensor, mode: str = "standardize", eps: float = 1e-8) -> torch.Tensor:
    """Normalise windows ``(..., W, T)`` (oldest first) per window; ``s`` is the (population) std of the
    whole window's raw values (all W x T), so every mode but ``none`` is invariant to ``x -> a x + b``
    for ``a > 0`` and keeps a unit's movement *relative to the spread of its weights*.

    * ``first_delta``: ``(x_j - x_1) / max(s, eps)``: each snapshot's displacement since the window's
      first one; the latest row is the displacement over the whole window (the query sees how far the
      unit moved).
    * ``diff``: ``(x_j - x_{j-1}) / max(s, eps)``, the first row zero: consecutive steps; the latest row
      is the latest step (the query sees the current velocity).
    * ``standardize``: ``(x - m) / max(s, eps)``, ``m`` the window's mean; a constant window maps to zeros.
    * ``delta``: ``(x_j - x_t) / max(s, eps)`` (old files only: the latest row is all zeros).
    * ``none``: the raw weights.
    """
    if mode == "none":
        return windows
    if mode not in NORM_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; choose one of {', '.join(NORM_MODES)}")
    std, mean = torch.std_mean(windows, dim=(-2, -1), keepdim=True, correction=0)
    scale = std.clamp_min(eps)
    if mode == "standardize":
        return (windows - mean) / scale
    if mode == "first_delta":
        return (windows - windows[..., :1, :]) / scale
    if mode == "diff":
        d = torch.diff(windows, dim=-2, prepend=windows[..., :1, :])
        return d / scale
    return (windows - windows[..., -1:, :]) / scale


def normalize_(windows: torch.Tensor, mode: str = "standardize", eps: float = 1e-8) -> torch.Tensor:
    """:func:`normalize` in place (returns ``windows``, overwritten): the same elementwise operations on the
    same values, so the same bits, without the temporaries (the policy's windows are a fresh gather).
    ``diff`` and ``none`` are returned out of place / unchanged, as :func:`normalize` does."""
    if mode in ("none", "diff") or mode not in NORM_MODES:
        return normalize(windows, mode, eps)
    std, mean = torch.std_mean(windows, dim=(-2, -1), keepdim=True, correction=0)
    scale = std.clamp_min(eps)
    if mode == "standardize":
        ref = mean
    elif mode == "first_delta":
        ref = windows[..., :1, :].clone()
    else:  # delta
        ref = windows[..., -1:, :].clone()
    return windows.sub_(ref).div_(scale)


def _mlp_inplace(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` for an :func:`mlp` without autograd, each ReLU in place on its Linear's fresh output
    (the same kernels as ``seq(x)``, so the same bits, one temporary fewer per layer)."""
    for layer in seq:
        if isinstance(layer, nn.ReLU):
            x = torch.relu_(x)
        else:
            x = layer(x)
    return x


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class SmartFRZPredictor(nn.Module):
    """The predictor; ``forward(windows (B, W, tailor_size)) -> logits (B, 2)``, batched over units."""

    def __init__(
        self,
        tailor_size: int = 1024,  # input size = layer tailoring size (Appendix C: 1024)
        hidden: int = 256,  # hidden width of MLP_k/q/v (Appendix C)
        key_dim: int = 64,  # output of MLP_k/q/v: key/query/value size (Appendix C)
        z_hidden: int = 32,  # hidden width of MLP_z (Appendix C)
        norm: str = "first_delta",  # input normalisation, one of NORM_MODES (ours; chosen by validation)
        scale: float = 1.0,  # attention score multiplier; 1.0 = the paper's eq. 2 (no 1/sqrt(d))
    ):
        super().__init__()
        if norm not in NORM_MODES:
            raise ValueError(f"unknown normalisation mode {norm!r}; choose one of {', '.join(NORM_MODES)}")
        self.tailor_size, self.norm, self.scale = tailor_size, norm, float(scale)
        self.mlp_k = mlp([tailor_size, hidden, hidden, key_dim])
        self.mlp_q = mlp([tailor_size, hidden, hidden, key_dim])
        self.mlp_v = mlp([tailor_size, hidden, hidden, key_dim])
        self.mlp_z = mlp([key_dim, z_hidden, z_hidden, 2])

    def forward(self, windows: torch.Tensor, return_attention: bool = False):
        """Logits ``(B, 2)`` for windows ``(B, W, tailor_size)``; with ``return_attention`` also ``alpha (B, W)``."""
        self._check(windows)
        return self._attend(normalize(windows, self.norm), (lambda m, t: m(t)), return_attention)

    def _check(self, windows: torch.Tensor) -> None:
        if windows.dim() != 3 or windows.shape[-1] != self.tailor_size:
            raise ValueError(f"windows must have shape (B, W, {self.tailor_size}), got {tuple(windows.shape)}")

    def _attend(self, x: torch.Tensor, run, return_attention: bool = False):
        """Eq. 1-4 on normalised windows ``x``; ``run(mlp, input)`` applies one of the MLPs."""
        k = run(self.mlp_k, x)  # (B, W, d)
        v = run(self.mlp_v, x)  # (B, W, d)
        q = run(self.mlp_q, x[:, -1])  # (B, d): query from the latest snapshot only
        a = torch.bmm(k, q.unsqueeze(-1)).squeeze(-1)  # (B, W): a_j = Q_t . K_j
        if self.scale != 1.0:
            a = a * self.scale
        alpha = torch.softmax(a, dim=-1)
        c = torch.bmm(alpha.unsqueeze(1), v).squeeze(1)  # (B, d): C_t = sum_j alpha_j V_j
        logits = run(self.mlp_z, c)
        return (logits, alpha) if return_attention else logits

    def probabilities(self, windows: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Confidence scores ``(B, 2)``: softmax of the logits; column 1 = freeze. Without autograd
        (``inference_mode``), ReLUs in place; ``inplace=True`` also normalises ``windows`` in place
        (overwriting them: the policy passes a fresh gather). The same bits as ``softmax(self(windows))``
        (a test pins that on the shipped predictor)."""
        self._check(windows)
        with torch.inference_mode():
            x = normalize_(windows, self.norm) if inplace else normalize(windows, self.norm)
            return torch.softmax(self._attend(x, _mlp_inplace), dim=-1)

    @torch.no_grad()
    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: True where the freeze class wins (strictly; ties do not freeze)."""
        logits = self(windows)
        return logits[:, 1] > logits[:, 0]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def predictor_params(tailor_size: int = 1024, hidden: int = 256, key_dim: int = 64, z_hidden: int = 32) -> int:
    """Parameter count (weights and biases) computed from the sizes."""

    def lin(a: int, b: int) -> int:
        return a * b + b

    enc = lin(tailor_size, hidden) + lin(hidden, hidden) + lin(hidden, key_dim)
    z = lin(key_dim, z_hidden) + lin(z_hidden, z_hidden) + lin(z_hidden, 2)
    return 3 * enc + z


def predictor_flops(
    window: int = 30,
    tailor_size: int = 1024,
    hidden: int = 256,
    key_dim: int = 64,
    z_hidden: int = 32,
    query_all: bool = False,  # True: count Q_j for every j, as eq. 1 literally defines it
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one inference on one window; see the module docstring."""
    enc = 2 * (tailor_size * hidden + hidden * hidden + hidden * key_dim)  # one MLP_k/q/v pass, one snapshot
    kv = 2 * window * enc
    q = (window if query_all else 1) * enc
    attn = 2 * window * key_dim * 2  # scores a_j and context sum
    z = 2 * (key_dim * z_hidden + z_hidden * z_hidden + z_hidden * 2)
    return kv + q + attn + z
