"""``svcca``: freeze the front-most unit once its representation stops changing between checks (SVCCA).

    freezebench train policy=svcca
    freezebench train policy=svcca policy.threshold=0.99 policy.patience=3 policy.checks_per_epoch=1

Method card
-----------
Paper: Maithra Raghu, Justin Gilmer, Jason Yosinski and Jascha Sohl-Dickstein, "SVCCA: Singular Vector
Canonical Correlation Analysis for Deep Learning Dynamics and Interpretability", NeurIPS 2017. Its
"Freeze Training" section observes that networks converge bottom-up and proposes to freeze the lower layers in
turn; the paper publishes only its analysis code, so the *trigger* below is ours (see
``shared/design/ALGORITHMS.md``, "SVCCA freezing"). Similarity: :func:`freezebench.analysis.similarity.svcca`.

Rule: at each check (``checks_per_epoch`` evenly spaced optimiser steps per epoch, the last at the epoch's
end) compute, for every active unit, the SVCCA similarity between its outputs on the fixed probe batch now
and at the previous check (top singular directions holding ``keep_variance`` of the variance, mean
canonical correlation). A unit's history starts at its second check. Walking the active units from the
front, freeze each one whose last ``patience`` similarities are all ``>= threshold``, and stop at the first
that does not (prefix only: several units can freeze at one check). Never unfreezes. Pure core:
:func:`svcca_trigger` and :func:`svcca_prefix`.

Data points (our choice). SVCCA needs several times more data points than neurons, while a conv unit's
flattened output on a 64-image probe batch has 64 points and C x H x W features. As the SVCCA authors'
tutorial on convolutional layers does (google/svcca), each spatial position is a data point and each
channel a neuron: (n, C, H, W) becomes
(n H W, C) (a transformer's (n, S, D) token outputs become (n S, D)). The trainer delivers outputs
flattened to (n, features), so the layout is read off the unit's modules (:func:`unit_layout`: the
last conv / norm / linear layer of the unit gives the channel count and whether channels come first);
a unit with none keeps its flattened features as neurons. Where the points are still fewer than
``points_per_dim`` x neurons (an MLP's hidden layer on a 64-input probe, the last stage of a large CNN),
the neurons are mapped to ``points // points_per_dim`` dimensions by a seeded Gaussian random projection,
drawn once per unit and reused at every check (so successive checks are compared in the same
coordinates; a random projection preserves the geometry of the point cloud approximately,
Johnson-Lindenstrauss). Without this the two kept subspaces of the n-dimensional sample space overlap by
dimension count alone and the similarity is near 1 from the first check.

Defaults, chosen by a small sweep (default data: digits, resnet20 at layer granularity, 10 epochs, seed 0,
SGD lr 0.05 cosine, probe 64, CPU). ``saving`` is ``1 - cost/tflops / cost/tflops_full``; the last column
is the epoch by which all 19 freezable units were frozen (every setting froze all of them: under a cosine
schedule every unit's representation stops moving eventually). Reference points: ``full`` 0.9944 at
0.2167 TFLOPs; the ``cka_oracle`` upper bound 0.9889 at 37.0% saving.

    =========  ========  ================  =======  ======  ===========
    threshold  patience  checks_per_epoch  val/acc  saving  all frozen
    =========  ========  ================  =======  ======  ===========
    0.99       2         4                 0.9833   44.0%   epoch 3.8
    0.98       2         2                 0.9833   38.0%   epoch 5.0
    0.99       2         2                 0.9861   34.9%   epoch 5.5
    **0.995**  **2**     **2**             0.9889   30.1%   epoch 6.0
    0.99       2         1                 0.9917   22.0%   epoch 7.0
    0.998      3         2                 0.9917   19.5%   epoch 7.5
    =========  ========  ================  =======  ======  ===========

Accuracy falls as saving rises, one validation image (of 360) at a time. Rule for the defaults: the
largest saving at an accuracy no lower than the CKA oracle's, giving ``threshold = 0.995``, ``patience = 2``,
``checks_per_epoch = 2``. One seed and one small data set: a difference of one or two images is within
seed noise, so re-tune on the target setting. The settings were pre-screened offline on the SVCCA
trajectories of one unfrozen run (with the threshold >= 0.98 needed for any accuracy: the similarity
between checks is above 0.9 for most units from epoch 2 on). ``keep_variance = 0.99`` is Raghu et al.'s
setting; ``points_per_dim = 4`` reads their "several times more data points than neurons".

Cost: one SVCCA per active unit per check (two SVDs of at most ``max_points`` x neurons, float64): about
10 ms per unit on one CPU thread for resnet20 on digits, 4.1 s of a 52 s run at the defaults (8%, a tiny
model; relative to a real model's steps it is far smaller). The previous check's data points of every
active unit are kept (``max_points`` caps them) and are part of the state dict, so a resumed run compares
against the same points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig, Signal, Signals
from freezebench.analysis.similarity import svcca
from freezebench.ranges import Range

from .cka_oracle import check_steps


@dataclass
class SVCCAConfig(PolicyConfig):
    name: str = "svcca"
    threshold: float = 0.995  # freeze once SVCCA(now, previous check) >= this for `patience` checks, in (0, 1]
    patience: int = 2  # consecutive checks the similarity must stay >= threshold
    checks_per_epoch: int = 2  # similarity checks (each followed by a freezing decision) per epoch, evenly spaced
    keep_variance: float = 0.99  # SVCCA: keep the top singular directions holding this fraction of variance
    points_per_dim: float = 4.0  # data points wanted per neuron; fewer: seeded random projection of the neurons
    max_points: int = 8192  # at most this many data points per unit (a seeded subset of positions, fixed per unit)


# --------------------------------------------------------------------------------------------------------
# pure core
# --------------------------------------------------------------------------------------------------------


def svcca_trigger(history: Sequence[float], threshold: float, patience: int) -> bool:
    """Whether the last ``patience`` similarities (oldest first) are all ``>= threshold`` (NaN never is)."""
    if patience < 1 or len(history) < patience:
        return False
    return all(v >= threshold for v in history[-patience:])


def svcca_prefix(histories: Mapping[int, Sequence[float]] | Sequence[Sequence[float]], threshold: float,
                 patience: int) -> list[int]:
    """The front run of active units (keys in forward order; a list is indexed by position) that trigger."""
    items = sorted(histories.items()) if isinstance(histories, Mapping) else list(enumerate(histories))
    out = []
    for unit, hist in items:
        if not svcca_trigger(hist, threshold, patience):
            break
        out.append(unit)
    return out


_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def _channels(m: nn.Module) -> int | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return math.prod(m.normalized_shape) if m.normalized_shape else None
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim
    return None


def unit_layout(modules: Sequence[nn.Module], output_module: nn.Module | None = None) -> tuple[int, bool] | None:
    """(channels, channels_first) of a unit's output, read off its modules; ``None`` if unknown.

    The output module itself decides when it is a conv, norm or linear layer; otherwise (a block) the last
    such module of the unit in forward order does (a ResNet block ends in a BatchNorm, a transformer block
    in a linear layer).
    """
    for m in ([output_module] if output_module is not None else []) + list(reversed(modules)):
        c = _channels(m)
        if c:
            return c, isinstance(m, _CHANNEL_FIRST)
    return None


def as_points(x: torch.Tensor, layout: tuple[int, bool] | None) -> torch.Tensor:
    """Flattened unit outputs (n, F) -> data points x neurons: (n S, C) when F = C S, else (n, F) as is."""
    n, f = x.shape
    if layout is None:
        return x
    c, first = layout
    if f % c or f == c:
        return x
    s = f // c
    if first:  # (n, C, S) -> (n, S, C)
        return x.reshape(n, c, s).transpose(1, 2).reshape(n * s, c)
    return x.reshape(n * s, c)  # (n, S, C)


def projection_dim(points: int, neurons: int, points_per_dim: float) -> int | None:
    """Dimension to project ``neurons`` to so that there are ``points_per_dim`` points per dimension (None: keep)."""
    if points >= points_per_dim * neurons:
        return None
    return max(1, int(points // points_per_dim))


# --------------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------------


class SVCCAFreezing(FreezePolicy):
    __doc__ = __doc__
    name = "svcca"
    needs = frozenset({Signal.ACTIVATIONS})
    granularity = "layer"
    Config = SVCCAConfig

    ranges = {"threshold": Range(0, 1, lo_open=True), "patience": Range(1, note="check"),
              "checks_per_epoch": Range(1), "keep_variance": Range(0, 1, lo_open=True),
              "points_per_dim": Range(0, lo_open=True), "max_points": Range(2)}

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.validate_config(self.cfg)
        self.checks = frozenset(check_steps(plan.steps_per_epoch, plan.epochs, self.cfg.checks_per_epoch))
        self.layouts = {u.index: unit_layout(u.modules, u.output_module) for u in units}
        self.histories: dict[int, list[float]] = {}
        self.previous: dict[int, torch.Tensor] = {}  # unit -> its data points at the previous check
        self._projections: dict[int, torch.Tensor] = {}  # unit -> its random projection (neurons x dim)
        self._subsets: dict[int, torch.Tensor] = {}  # unit -> the data points kept when there are too many

    def observe_at(self, step: int) -> bool:
        return step in self.checks

    def decide_at(self, step: int) -> bool:
        return step in self.checks

    def _generator(self, unit: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.plan.seed * 100_003 + unit) * 2 + salt)

    def _rows(self, unit: int, points: int, device: torch.device) -> torch.Tensor:
        """The unit's fixed, seeded subset of ``max_points`` of its ``points`` data points (sorted)."""
        r = self._subsets.get(unit)
        if r is None or r.device != device or int(r[-1]) >= points:
            r = torch.randperm(points, generator=self._generator(unit, 0))[: self.cfg.max_points].sort().values
            r = self._subsets[unit] = r.to(device)
        return r

    def _projection(self, unit: int, neurons: int, dim: int, device: torch.device) -> torch.Tensor:
        """The unit's seeded Gaussian projection (neurons x dim), drawn once from (seed, unit)."""
        p = self._projections.get(unit)
        if p is None or p.shape != (neurons, dim) or p.device != device:
            p = torch.randn(neurons, dim, generator=self._generator(unit, 1)) / math.sqrt(dim)
            p = self._projections[unit] = p.to(device)
        return p

    def points(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        """A unit's probe activations (n, F) as SVCCA data points (see the method card)."""
        pts = as_points(x, self.layouts.get(unit))
        if pts.shape[0] > self.cfg.max_points:
            pts = pts[self._rows(unit, pts.shape[0], pts.device)]
        dim = projection_dim(pts.shape[0], pts.shape[1], self.cfg.points_per_dim)
        if dim is not None:
            pts = pts @ self._projection(unit, pts.shape[1], dim, pts.device)
        return pts

    def observe(self, step: int, signals: Signals) -> None:
        assert signals.activations is not None
        active = self.active_units()
        self.histories = {i: h for i, h in self.histories.items() if i in active}
        self.previous = {i: p for i, p in self.previous.items() if i in active}
        for i in active:
            x = signals.activations.get(i)
            if x is None:
                continue
            pts = self.points(i, x)
            prev = self.previous.get(i)
            if prev is not None:
                hist = self.histories.setdefault(i, [])
                hist.append(svcca(prev, pts, keep_variance=self.cfg.keep_variance))
                del hist[: -self.cfg.patience]
            self.previous[i] = pts

    def decide(self, step: int) -> Decision | None:
        c = self.cfg
        hist = {i: self.histories.get(i, []) for i in self.active_units()}
        todo = svcca_prefix(hist, c.threshold, c.patience)
        if not todo:
            return None
        sims = ", ".join(f"{i}: {min(hist[i][-c.patience:]):.4f}" for i in todo)
        return Decision(freeze=todo, reason=f"SVCCA to previous check >= {c.threshold} for {c.patience} checks "
                                            f"(min {sims})")

    def epoch_metrics(self) -> dict[str, float]:
        """Mean of the latest similarity over the units still being tracked (logged as ``policy/svcca_mean``)."""
        latest = [h[-1] for i, h in self.histories.items() if h and i not in self.frozen]
        return {"svcca_mean": sum(latest) / len(latest)} if latest else {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "histories": {i: list(h) for i, h in sorted(self.histories.items())},
            "previous": {i: p.detach().cpu() for i, p in sorted(self.previous.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = torch.device(self.plan.device) if self.plan is not None else torch.device("cpu")
        self.histories = {int(i): [float(v) for v in h] for i, h in state.get("histories", {}).items()}
        self.previous = {int(i): p.to(dev) for i, p in state.get("previous", {}).items()}
