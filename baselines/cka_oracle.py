"""``cka_oracle``: freeze a unit once its CKA to a well-trained reference model has stabilised.

    # 1. a reference: train the same model to convergence (its final weights land in outputs/<run>/final.pt)
    freezebench train policy=full trainer.epochs=10
    # 2. the oracle, guided by that reference
    freezebench train policy=cka_oracle policy.reference=outputs/<run_id>/final.pt

Method card
-----------
Paper: Sheng Li, Geng Yuan, Yue Dai, Youtao Zhang, Yanzhi Wang and Xulong Tang, "SmartFRZ: An Efficient
Training Framework using Attention-Based Layer Freezing", ICLR 2023, Section 3.4 and Table 1
("layer representational similarity-guided freezing"): the labelling rule SmartFRZ's predictor is trained
to imitate. It needs the trained model in advance, so it is an *upper bound* to compare practical policies
against, not a practical method. Similarity: linear CKA, Kornblith, Norouzi, Lee and Hinton, "Similarity of
Neural Network Representations Revisited", ICML 2019 (SmartFRZ eq. 5).

Rule: at each check (``checks_per_epoch`` evenly spaced optimiser steps per epoch; the paper checks and
freezes once per epoch, at its end) compute, for every active unit, the linear CKA between its output and
the reference's corresponding unit's output on the trainer's fixed probe batch, and append it to the unit's
history. Freeze unit ``l`` when

    len(history) >= window  and  var(last `window` values) < var_threshold  and  history[-1] > cutoff

(``var``: population variance, ``ddof = 0``, as ``numpy.var``). Non-sequential by default (the paper's
Figure 4 shows later layers stabilising before earlier ones, the argument for non-sequential freezing);
``sequential: true`` freezes only the longest prefix of the active units that meets the rule. Never
unfreezes. The pure core is :func:`oracle_decision`.

Defaults and their source: ``var_threshold = 1e-4``, ``cutoff = 0.3`` and ``window = 20`` checks are the
third-party defaults (the paper gives none). ``window = 20`` never fills on our runs: at one check per
epoch (the paper's cadence) a 10-epoch fine-tuning run has 10 checks, and the earliest possible freeze
is at check ``window``. We use ``window = 3``: the earliest freeze is at the end of epoch 3 of 10, a unit
must hold its CKA within about +-0.01 (std < 0.01) over three epochs, and the window still smooths a
single lucky check. With ``checks_per_epoch = c`` scale the window by ``c`` to keep the same span in
epochs. ``checks_per_epoch = 1`` as the paper ("the freezing is conducted at the end of each epoch").

The reference (``reference``) is a checkpoint written by an earlier freezebench run
(``outputs/<run_id>/final.pt``, see :meth:`freezebench.trainer.Trainer.checkpoint_payload`), or an MLflow
run that logged it (``runs:/<run_id>``, read from the run's ``checkpoints/final.pt`` artifact). The model
is rebuilt from the checkpoint's own ``model_name``, ``num_classes``, ``in_channels`` and ``image_size``
and partitioned like the trained model; its units must match the trained model's one for one (module
names and parameter shapes), else a :class:`~freezebench.errors.ConfigError` says how they differ.

Measured (digits, resnet20 at layer granularity, 10 epochs, seed 0, CPU; the reference is the ``full``
run of the same seed, so until its first freeze the oracle's run retraces the reference's trajectory, as
in the paper's "train the same network again"): full training val/acc 0.9944 at 0.2167 TFLOPs; the
oracle with the defaults 0.9889 (2 of 360 validation images fewer) at 37.0% less compute, all 19
freezable units frozen by the end of epoch 5 (units 0-3 and 5 after epoch 3). The paper's Table 1: 48%
less compute for ResNet-50 at equal accuracy.

What we changed and why:

* **Probe batch.** CKA is computed on the trainer's fixed, seeded probe batch of
  ``trainer.probe_batch_size`` inputs (default 64; the paper does not say how many images it used). The
  *biased* linear CKA estimator used by the paper is inflated at small n (independent inputs score about
  0.2 at n = 32), which matters for ``cutoff = 0.3``: keep the probe at 64 or more, and the probe size
  is a recorded config value of every run.
* **Cached reference.** The reference and the probe batch are both fixed, so the reference's side of CKA
  is computed once, at the first check, and kept as one n x n Gram matrix per unit (``X X^T``: linear CKA
  in its Gram form, equal to the feature form to rounding); the reference model is then released. The
  training model's side is computed at every check from the activations the trainer delivers.
* **Bounded history.** Only the last ``window`` CKA values of each active unit are kept (all the rule
  reads); a frozen unit's history is dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from freezebench.errors import ConfigError, FreezebenchError
from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig, Signal, Signals, epoch_check_offsets
from freezebench.analysis.similarity import cka_from_grams, gram_linear
from freezebench.ranges import Range

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model_state", "model_name", "num_classes", "in_channels", "image_size")


@dataclass
class CKAOracleConfig(PolicyConfig):
    name: str = "cka_oracle"
    reference: str | None = None  # required: final.pt of an earlier run (outputs/<run_id>/final.pt) or runs:/<run_id>
    checks_per_epoch: int = 1  # CKA checks (each followed by a freezing decision) per epoch, evenly spaced; paper: 1
    window: int = 3  # checks whose CKA variance must be small (third-party default 20 never fills in 10 checks)
    var_threshold: float = 1e-4  # freeze when the variance of the last `window` CKA values is below this
    cutoff: float = 0.3  # ... and the current CKA to the reference is above this (biased CKA, in [0, 1])
    sequential: bool = False  # true: freeze only the longest front prefix of active units that meets the rule


# --------------------------------------------------------------------------------------------------------
# pure core
# --------------------------------------------------------------------------------------------------------


def check_steps(steps_per_epoch: int, epochs: int, checks_per_epoch: int) -> list[int]:
    """The optimiser steps (1-based counts of completed steps) after which a check runs.

    ``checks_per_epoch`` evenly spaced checks per epoch, the last at the epoch's end (check ``j`` of
    epoch ``e`` after step ``e * S + ceil(j * S / c)``); more checks than steps per epoch means one check
    after every step (:func:`freezebench.policy.epoch_check_offsets`).
    """
    offsets = epoch_check_offsets(steps_per_epoch, checks_per_epoch)
    return [e * steps_per_epoch + o for e in range(epochs) for o in offsets]


def window_variance(values: Sequence[float]) -> float:
    """Population variance (``ddof = 0``) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / n


def cka_ready(history: Sequence[float], window: int, var_threshold: float, cutoff: float) -> bool:
    """Whether a unit with this CKA history (oldest first) meets the oracle's freezing rule."""
    if len(history) < window:
        return False
    last = list(history[-window:])
    # written so that a NaN CKA never freezes
    return bool(window_variance(last) < var_threshold and last[-1] > cutoff)


def oracle_decision(histories: Mapping[int, Sequence[float]] | Sequence[Sequence[float]], window: int,
                    var_threshold: float, cutoff: float, sequential: bool = False) -> list[int]:
    """The units to freeze now under the CKA-oracle rule (pure function).

    ``histories`` maps each *active* unit (in forward order by key; a plain list is indexed by position)
    to its CKA history, oldest first. Returns the keys of the units that meet :func:`cka_ready`; with
    ``sequential`` only the longest run of them from the front of the active units.
    """
    items = sorted(histories.items()) if isinstance(histories, Mapping) else list(enumerate(histories))
    out = []
    for unit, hist in items:
        if cka_ready(hist, window, var_threshold, cutoff):
            out.append(unit)
        elif sequential:
            break
    return out


# --------------------------------------------------------------------------------------------------------
# the reference model
# --------------------------------------------------------------------------------------------------------


def resolve_reference(ref: str) -> str:
    """A local file path for ``policy.reference`` (downloads ``runs:/<id>[/<artifact path>]`` from MLflow)."""
    if ref.startswith("runs:/"):
        uri = ref if ref.rstrip("/").count("/") > 1 else ref.rstrip("/") + "/checkpoints/final.pt"
        try:
            import mlflow

            return mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except Exception as e:
            raise ConfigError(
                f"policy.reference={ref!r}: cannot download {uri} from MLflow ({type(e).__name__}: {e}); "
                f"pass the local checkpoint path outputs/<run_id>/final.pt instead"
            ) from e
    return ref


def read_reference(path: str) -> dict[str, Any]:
    """Load and check a freezebench checkpoint (the payload of ``Trainer.checkpoint_payload``)."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"policy.reference={path!r} does not exist (or is not a file); pass the final.pt of an earlier "
            f"run of the same model, e.g. outputs/<run_id>/final.pt"
        )
    from freezebench.fileio import read_torch

    payload = read_torch(path, what="policy.reference checkpoint", error=ConfigError,  # CRC32-checked
                         fix="the file is corrupt or truncated: pass the final.pt of another run")
    missing = [k for k in REQUIRED_KEYS if not isinstance(payload, Mapping) or k not in payload]
    if missing:
        raise ConfigError(
            f"policy.reference={path!r} is not a freezebench checkpoint (missing {', '.join(missing)}); "
            f"the CKA oracle needs the final.pt written by an earlier `freezebench train` run"
        )
    return dict(payload)


def _describe(names: Sequence[str], k: int = 4) -> str:
    shown = ", ".join(names[:k])
    return f"{len(names)} units ({shown}{', ...' if len(names) > k else ''})"


def build_reference(path: str, units: Sequence[Any], device: str | torch.device) -> tuple[torch.nn.Module, list]:
    """Rebuild the reference model from its checkpoint on ``device`` and partition it like ``units``.

    Tries the layer and the block granularity and keeps the one whose units have the same module names
    as ``units``; then checks parameter shapes unit by unit. Raises :class:`ConfigError` on any mismatch.
    """
    from freezebench.zoo.models import build_model
    from freezebench.units import example_batch, partition

    payload = read_reference(path)
    name = payload["model_name"]
    try:
        model = build_model(str(name), num_classes=payload["num_classes"], in_channels=payload["in_channels"],
                            image_size=payload["image_size"], checkpoint=path)
    except FreezebenchError as e:
        raise ConfigError(f"policy.reference={path!r}: {e}") from e
    model = model.to(device).eval().requires_grad_(False)
    example = example_batch(payload["in_channels"], payload["image_size"]).to(device)
    want = [(u.name, list(u.module_names)) for u in units]
    names = [u.name for u in units]
    ref_units = None
    tried = {}
    for gran in ("layer", "block"):
        part = partition(model, example, gran)
        tried[gran] = [u.name for u in part.units]
        if [(u.name, list(u.module_names)) for u in part.units] == want:
            ref_units = part.units
            break
    if ref_units is None:
        raise ConfigError(
            f"policy.reference={path!r} does not match the model being trained: the reference is model "
            f"{name!r} with {_describe(tried['layer'])} (layer granularity) or {_describe(tried['block'])} "
            f"(block), the trained model has {_describe(names)}; pass a checkpoint of the same model"
        )
    for u, r in zip(units, ref_units):
        shapes = [tuple(p.shape) for p in u.parameters]
        ref_shapes = [tuple(p.shape) for p in r.parameters]
        if shapes != ref_shapes:
            raise ConfigError(
                f"policy.reference={path!r} does not match the model being trained: unit {u.index} "
                f"({u.name}) has parameter shapes {shapes} in the trained model but {ref_shapes} in the "
                f"reference (model {name!r}, {payload['num_classes']} classes, {payload['in_channels']} "
                f"input channels, image size {payload['image_size']}); train the reference on the same data"
            )
    return model, ref_units


# --------------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------------


class CKAOracle(FreezePolicy):
    __doc__ = __doc__
    name = "cka_oracle"
    needs = frozenset({Signal.ACTIVATIONS})
    granularity = "layer"
    Config = CKAOracleConfig

    ranges = {"checks_per_epoch": Range(1), "window": Range(2, note="checks (the variance of one value is 0)"),
              "var_threshold": Range(0, lo_open=True), "cutoff": Range(0, 1, hi_open=True)}

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if not cfg.reference:
            raise ConfigError(
                "policy.reference is required: the checkpoint of a well-trained run of the same model, e.g. "
                "policy.reference=outputs/<run_id>/final.pt (train one first with policy=full)"
            )
        if not str(cfg.reference).startswith("runs:/") and not os.path.isfile(cfg.reference):
            raise ConfigError(
                f"policy.reference={cfg.reference!r} does not exist (or is not a file); pass the final.pt of "
                f"an earlier run of the same model, e.g. outputs/<run_id>/final.pt, or runs:/<run_id>"
            )

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.validate_config(self.cfg)
        path = resolve_reference(str(self.cfg.reference))
        self.reference, self.reference_units = build_reference(path, units, plan.device)
        self.checks = frozenset(check_steps(plan.steps_per_epoch, plan.epochs, self.cfg.checks_per_epoch))
        self.histories: dict[int, list[float]] = {}
        self._ref_grams: dict[int, torch.Tensor] | None = None  # unit -> n x n Gram of the reference output

    def observe_at(self, step: int) -> bool:
        return step in self.checks

    def decide_at(self, step: int) -> bool:
        return step in self.checks

    def _reference_grams(self, probe: torch.Tensor) -> dict[int, torch.Tensor]:
        """The reference side of CKA, once: the reference and the probe batch are both fixed."""
        if self._ref_grams is None or next(iter(self._ref_grams.values())).shape[0] != probe.shape[0]:
            if self.reference is None:  # released after the first computation; a new probe size needs it
                raise FreezebenchError("the CKA oracle's probe batch changed size after its reference was released")
            from freezebench.units import capture_outputs

            outs = capture_outputs(self.reference, self.reference_units, self.freezable, probe)
            self._ref_grams = {i: gram_linear(y) for i, y in outs.items()}
            log.info("cka_oracle: reference Grams cached for %d units on %d probe inputs", len(outs), probe.shape[0])
            del outs
            # every unit's Gram is cached: release the model (its units hold references to its modules)
            self.reference = self.reference_units = None
        return self._ref_grams

    def observe(self, step: int, signals: Signals) -> None:
        assert signals.activations is not None and signals.probe_inputs is not None
        grams = self._reference_grams(signals.probe_inputs)
        active = self.active_units()
        self.histories = {i: h for i, h in self.histories.items() if i in active}
        for i in active:
            x = signals.activations.get(i)
            if x is None:
                continue
            value = cka_from_grams(gram_linear(x), grams[i])
            hist = self.histories.setdefault(i, [])
            hist.append(value)
            del hist[: -self.cfg.window]

    def decide(self, step: int) -> Decision | None:
        c = self.cfg
        hist = {i: h for i, h in self.histories.items() if i not in self.frozen}
        todo = oracle_decision(hist, c.window, c.var_threshold, c.cutoff, c.sequential)
        if not todo:
            return None
        parts = [f"{i}: CKA {hist[i][-1]:.4f}, var {window_variance(hist[i][-c.window:]):.2e}" for i in todo]
        return Decision(freeze=todo, reason=f"CKA to reference stable over {c.window} checks ({'; '.join(parts)})")

    def epoch_metrics(self) -> dict[str, float]:
        """Mean of the latest similarity over the units still being tracked (logged as ``policy/cka_mean``)."""
        latest = [h[-1] for i, h in self.histories.items() if h and i not in self.frozen]
        return {"cka_mean": sum(latest) / len(latest)} if latest else {}

    def state_dict(self) -> dict[str, Any]:
        return {"histories": {i: list(h) for i, h in sorted(self.histories.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.histories = {int(i): [float(v) for v in h] for i, h in state.get("histories", {}).items()}
