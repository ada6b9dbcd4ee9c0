"""The CKA-oracle rule: one implementation, shared by the ``cka_oracle`` policy and SmartFRZ's data collection.

SmartFRZ (Li et al., ICLR 2023, section 3.4 and Table 1) labels its predictor's training data with a
similarity oracle: a unit is "ready to freeze" once the linear CKA (Kornblith et al. 2019, SmartFRZ eq. 5)
between its output and a well-trained reference's corresponding unit, on a fixed probe batch, has stopped
changing. The ``cka_oracle`` baseline (``baselines/cka_oracle.py``) freezes by this rule during training;
``predictors/collect.py`` applies it after the fact to label recorded runs. Both call the functions here,
so the predictor imitates exactly the oracle the Table 1 baseline runs.

Rule, at each check (``checks_per_epoch`` evenly spaced optimiser steps per epoch, :func:`check_steps`):
append the unit's CKA to the reference (:func:`oracle_cka`) to its history; the unit is ready when

    len(history) >= k  and  var(last k values) < var_threshold  and  history[-1] > cutoff,
    k = window_checks(window_epochs, checks_per_epoch) = round(window_epochs * checks_per_epoch) + 1

(``var``: population variance). The window is given **in epochs** (``window_epochs``): the last ``k``
checks span exactly ``window_epochs`` epochs whatever the check rate, so adding checks does not make the
oracle more aggressive. Defaults: ``window_epochs = 2`` (at one check per epoch, 3 checks: the value the
Table 1 baseline always used), ``var_threshold = 1e-4`` and ``cutoff = 0.3`` (third-party defaults).

Estimator (:data:`DEBIASED`): **debiased** linear CKA (the unbiased HSIC of Song et al. 2012, as in
Kornblith et al.'s code). Measured on independent standard-normal data (10 draws each; ``.scratch`` script
in the issue-13 report): at n = 64 inputs the *biased* estimator gives 0.135 (p = 10 features), 0.498
(p = 64), 0.941 (p = 1024) and 0.996 (p = 16384); at n = 256 still 0.800 at p = 1024. Flattened conv
activations have p in the thousands, so a biased "CKA > 0.3" holds for unrelated representations and the
cutoff separates nothing. The debiased estimator gives 0.000 +- 0.024, -0.002 +- 0.026, -0.004 +- 0.019
and -0.009 +- 0.022 at n = 64 for the same p (mean +- std), so 0.3 lies more than ten standard deviations
above independence at the default 64-input probe (``trainer.probe_batch_size``); a larger probe is not
needed for the cutoff to mean something.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from freezebench.policy import epoch_check_offsets

from .similarity import cka_from_grams

__all__ = ["DEBIASED", "WINDOW_EPOCHS", "VAR_THRESHOLD", "CUTOFF", "check_steps", "window_checks",
           "window_variance", "cka_ready", "oracle_decision", "oracle_labels", "oracle_cka"]

DEBIASED = True  # the oracle's CKA estimator: debiased linear CKA (see the module docstring for why)
WINDOW_EPOCHS = 2.0  # span of the variance window, in epochs
VAR_THRESHOLD = 1e-4  # variance of the CKA over the window must be below this
CUTOFF = 0.3  # ... and the current CKA above this


def check_steps(steps_per_epoch: int, epochs: int, checks_per_epoch: int) -> list[int]:
    """The optimiser steps (1-based counts of completed steps) after which a check runs.

    ``checks_per_epoch`` evenly spaced checks per epoch, the last at the epoch's end (check ``j`` of
    epoch ``e`` after step ``e * S + ceil(j * S / c)``); more checks than steps per epoch means one check
    after every step (:func:`freezebench.policy.epoch_check_offsets`).
    """
    offsets = epoch_check_offsets(steps_per_epoch, checks_per_epoch)
    return [e * steps_per_epoch + o for e in range(epochs) for o in offsets]


def window_checks(window_epochs: float, checks_per_epoch: int) -> int:
    """Checks in a window spanning ``window_epochs`` epochs at ``checks_per_epoch`` checks per epoch
    (both ends included): ``round(window_epochs * checks_per_epoch) + 1``; at least 2."""
    if checks_per_epoch < 1:
        raise ValueError(f"checks_per_epoch must be >= 1, got {checks_per_epoch}")
    if not window_epochs > 0:
        raise ValueError(f"window_epochs must be > 0, got {window_epochs}")
    span = round(float(window_epochs) * int(checks_per_epoch))
    if span < 1:
        raise ValueError(f"window_epochs={window_epochs} at {checks_per_epoch} checks per epoch spans no check "
                         f"interval; use window_epochs >= {1 / checks_per_epoch:g}")
    return int(span) + 1


def window_variance(values: Sequence[float]) -> float:
    """Population variance (``ddof = 0``) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / n


def cka_ready(history: Sequence[float], window: int, var_threshold: float, cutoff: float) -> bool:
    """Whether a unit with this CKA history (oldest first) meets the rule, ``window`` counted in checks
    (:func:`window_checks` converts epochs). A NaN CKA never makes a unit ready."""
    if len(history) < window:
        return False
    last = list(history[-window:])
    return bool(window_variance(last) < var_threshold and last[-1] > cutoff)


def oracle_decision(histories: Mapping[int, Sequence[float]] | Sequence[Sequence[float]], window: int,
                    var_threshold: float, cutoff: float, sequential: bool = False) -> list[int]:
    """The units to freeze now (pure function).

    ``histories`` maps each *active* unit (in forward order by key; a plain list is indexed by position)
    to its CKA history, oldest first; ``window`` in checks. Returns the keys of the units that meet
    :func:`cka_ready`; with ``sequential`` only the longest run of them from the front of the active units.
    """
    items = sorted(histories.items()) if isinstance(histories, Mapping) else list(enumerate(histories))
    out = []
    for unit, hist in items:
        if cka_ready(hist, window, var_threshold, cutoff):
            out.append(unit)
        elif sequential:
            break
    return out


def oracle_labels(history: Sequence[float], *, checks_per_epoch: int, window_epochs: float = WINDOW_EPOCHS,
                  var_threshold: float = VAR_THRESHOLD, cutoff: float = CUTOFF) -> list[int]:
    """Label of each check of one unit's CKA history (oldest first): 1 from the first check at which the
    oracle (non-sequential) would freeze the unit, given the history up to that check; 0 before, and 0
    everywhere if never. The oracle never unfreezes, so the labels are monotone."""
    window = window_checks(window_epochs, checks_per_epoch)
    labels, frozen = [], False
    for t in range(len(history)):
        frozen = frozen or cka_ready(history[: t + 1], window, var_threshold, cutoff)
        labels.append(int(frozen))
    return labels


def oracle_cka(gram_unit: torch.Tensor, gram_reference: torch.Tensor) -> float:
    """The oracle's similarity of a unit to its reference from their ``n x n`` linear Grams on the same
    probe inputs: debiased linear CKA (:data:`DEBIASED`)."""
    return cka_from_grams(gram_unit, gram_reference, debiased=DEBIASED)
