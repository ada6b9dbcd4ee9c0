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

Rule (one implementation, :mod:`freezebench.analysis.oracle`, shared with SmartFRZ's data collection so
the predictor imitates exactly this oracle): at each check (``checks_per_epoch`` evenly spaced optimiser
steps per epoch; the paper checks and freezes once per epoch, at its end) compute, for every active unit,
the debiased linear CKA between its output and the reference's corresponding unit's output on the
trainer's fixed probe batch, and append it to the unit's history. Freeze unit ``l`` when

    len(history) >= k  and  var(last k values) < var_threshold  and  history[-1] > cutoff,
    k = round(window_epochs * checks_per_epoch) + 1

(``var``: population variance, ``ddof = 0``, as ``numpy.var``): the window is given in **epochs**, so the
check rate does not change what "stable" means. Non-sequential by default (the paper's Figure 4 shows
later layers stabilising before earlier ones, the argument for non-sequential freezing);
``sequential: true`` freezes only the longest prefix of the active units that meets the rule. Never
unfreezes. The pure core is :func:`oracle_decision`.

Defaults and their source: ``var_threshold = 1e-4`` and ``cutoff = 0.3`` are the third-party defaults
(the paper gives none); so is a window of 20 checks, which never fills on our runs (a 10-epoch run at the
paper's one check per epoch has 10 checks). We use ``window_epochs = 2`` (3 checks at one check per epoch):
the earliest freeze is at the end of epoch 3 of 10, a unit must hold its CKA within about +-0.01
(std < 0.01) over two epochs, and the window still smooths a single lucky check.

The reference (``reference``) is a checkpoint written by an earlier freezebench run
(``outputs/<run_id>/final.pt``, see :meth:`freezebench.trainer.Trainer.checkpoint_payload`), or an MLflow
run that logged it (``runs:/<run_id>``, read from the run's ``checkpoints/final.pt`` artifact). The model
is rebuilt from the checkpoint's own ``model_name``, ``num_classes``, ``in_channels`` and ``image_size``
and partitioned like the trained model; its units must match the trained model's one for one (module
names and parameter shapes), else a :class:`~freezebench.errors.ConfigError` says how they differ.

Measured *before the switch to the debiased estimator* (biased CKA, 3 checks; not re-measured since, so
read it as the old rule's figures) (digits, resnet20 at layer granularity, 10 epochs, seed 0, CPU; the reference is the ``full``
run of the same seed, so until its first freeze the oracle's run retraces the reference's trajectory, as
in the paper's "train the same network again"): full training val/acc 0.9944 at 0.2167 TFLOPs; the
oracle with the defaults 0.9889 (2 of 360 validation images fewer) at 37.0% less compute, all 19
freezable units frozen by the end of epoch 5 (units 0-3 and 5 after epoch 3). The paper's Table 1: 48%
less compute for ResNet-50 at equal accuracy.

What we changed and why:

* **Estimator and probe batch.** CKA is computed on the trainer's fixed, seeded probe batch of
  ``trainer.probe_batch_size`` inputs (default 64; the paper does not say how many images it used) with
  the **debiased** estimator. The biased estimator of the paper's eq. 5 is inflated when the probe has few
  inputs relative to the features: for *independent* standard-normal data at n = 64 it gives 0.50 with 64
  features, 0.94 with 1024 and 0.996 with 16384 (measured; "about 0.2 at n = 32", which this docstring
  used to say, holds only for about 10 features), so with flattened conv activations "CKA > 0.3" was
  nearly always true. The debiased estimator gives 0.00 +- 0.03 at n = 64 for every feature count
  measured, so the cutoff means "related to the reference". Figures in :mod:`freezebench.analysis.oracle`.
* **Cached reference.** The reference and the probe batch are both fixed, so the reference's side of CKA
  is computed once, at the first check, and kept as one n x n Gram matrix per unit (``X X^T``: linear CKA
  in its Gram form, equal to the feature form to rounding); the reference model is then released. The
  training model's side is computed at every check from the activations the trainer delivers.
* **Bounded history.** Only the last ``k`` CKA values of each active unit are kept (all the rule
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
from freezebench.analysis.oracle import (
    CUTOFF,
    VAR_THRESHOLD,
    WINDOW_EPOCHS,
    check_steps,
    cka_ready,
    oracle_cka,
    oracle_decision,
    window_checks,
    window_variance,
)
from freezebench.analysis.similarity import gram_linear
from freezebench.ranges import Range

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model_state", "model_name", "num_classes", "in_channels", "image_size")


@dataclass
class CKAOracleConfig(PolicyConfig):
    name: str = "cka_oracle"
    reference: str | None = None  # required: final.pt of an earlier run (outputs/<run_id>/final.pt) or runs:/<run_id>
    checks_per_epoch: int = 1  # CKA checks (each followed by a freezing decision) per epoch, evenly spaced; paper: 1
    window_epochs: float = WINDOW_EPOCHS  # span, in epochs, over which the CKA variance must be small (2: 3 checks at 1 check/epoch)
    var_threshold: float = VAR_THRESHOLD  # freeze when the variance of the CKA over the window is below this
    cutoff: float = CUTOFF  # ... and the current (debiased) CKA to the reference is above this
    sequential: bool = False  # true: freeze only the longest front prefix of active units that meets the rule


# --------------------------------------------------------------------------------------------------------
# pure core: the shared rule (freezebench.analysis.oracle), re-exported here
# --------------------------------------------------------------------------------------------------------

__all__ = ["CKAOracle", "CKAOracleConfig", "check_steps", "window_checks", "window_variance", "cka_ready",
           "oracle_decision", "build_reference", "read_reference", "resolve_reference"]


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


def build_reference(path: str, units: Sequence[Any], device: str | torch.device,
                    template: torch.nn.Module | None = None) -> tuple[torch.nn.Module, list]:
    """Rebuild the reference model from its checkpoint on ``device`` and partition it like ``units``.

    The architecture is the zoo model the checkpoint names, or, with ``template`` (the trained model, for a
    model passed to the trainer rather than built from the zoo), a deep copy of ``template``; the weights are
    the checkpoint's. Tries the layer and the block granularity and keeps the one whose units have the same
    module names as ``units``; then checks parameter shapes unit by unit. Raises :class:`ConfigError` on any
    mismatch.
    """
    import copy

    from freezebench.zoo.models import build_model, load_checkpoint
    from freezebench.units import example_batch, partition

    payload = read_reference(path)
    name = payload["model_name"]
    try:
        if template is not None:
            model = copy.deepcopy(template)
            load_checkpoint(model, str(name), path)
        elif payload.get("modality") == "text":  # a text model (freezebench.zoo.text), rebuilt the same way
            from freezebench.zoo.text import build_text_model

            model = build_text_model(str(name), num_classes=payload["num_classes"], vocab_size=payload["vocab_size"],
                                     max_length=payload["max_length"], hf_path=payload.get("hf_path"),
                                     checkpoint=path)
        else:
            model = build_model(str(name), num_classes=payload["num_classes"], in_channels=payload["in_channels"],
                                image_size=payload["image_size"], checkpoint=path)
    except FreezebenchError as e:
        raise ConfigError(f"policy.reference={path!r}: {e}") from e
    model = model.to(device).eval().requires_grad_(False)
    if payload.get("modality") == "text":  # two sequences of 8 tokens (the units do not depend on the length)
        example = {"input_ids": torch.ones(2, 8, dtype=torch.long, device=device),
                   "attention_mask": torch.ones(2, 8, dtype=torch.long, device=device)}
    else:
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
    needs = frozenset({Signal.ACTIVATIONS, Signal.MODEL})  # MODEL: a passed model's architecture (reference)
    granularity = "layer"
    Config = CKAOracleConfig

    ranges = {"checks_per_epoch": Range(1), "window_epochs": Range(0, lo_open=True, note="epochs"),
              "var_threshold": Range(0, lo_open=True),
              "cutoff": Range(-1, 1, hi_open=True, note="(debiased CKA can be slightly negative)")}

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
        try:  # the window in epochs must span at least one check interval at this check rate
            window_checks(cfg.window_epochs, cfg.checks_per_epoch)
        except ValueError as e:
            raise ConfigError(f"policy.window_epochs: {e}") from None

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.validate_config(self.cfg)
        path = resolve_reference(str(self.cfg.reference))
        # a model passed to the trainer (not in the zoo): its architecture is copied at the first check,
        # where the policy sees the training model (Signal.MODEL), and the reference weights loaded into it
        self._pending_reference = path if read_reference(path).get("custom_model") else None
        self.reference, self.reference_units = (None, None) if self._pending_reference else \
            build_reference(path, units, plan.device)
        self.checks = frozenset(check_steps(plan.steps_per_epoch, plan.epochs, self.cfg.checks_per_epoch))
        self.window = window_checks(self.cfg.window_epochs, self.cfg.checks_per_epoch)  # in checks
        self.histories: dict[int, list[float]] = {}
        self._ref_grams: dict[int, torch.Tensor] | None = None  # unit -> n x n Gram of the reference output

    def observe_at(self, step: int) -> bool:
        return step in self.checks

    def decide_at(self, step: int) -> bool:
        return step in self.checks

    def _reference_grams(self, probe: torch.Tensor) -> dict[int, torch.Tensor]:
        """The reference side of CKA, once: the reference and the probe batch are both fixed."""
        n = len(next(iter(probe.values()))) if isinstance(probe, dict) else probe.shape[0]  # text: a dict batch
        if self._ref_grams is None or next(iter(self._ref_grams.values())).shape[0] != n:
            if self.reference is None:  # released after the first computation; a new probe size needs it
                raise FreezebenchError("the CKA oracle's probe batch changed size after its reference was released")
            from freezebench.units import capture_outputs

            outs = capture_outputs(self.reference, self.reference_units, self.freezable, probe)
            self._ref_grams = {i: gram_linear(y) for i, y in outs.items()}
            log.info("cka_oracle: reference Grams cached for %d units on %d probe inputs", len(outs), n)
            del outs
            # every unit's Gram is cached: release the model (its units hold references to its modules)
            self.reference = self.reference_units = None
        return self._ref_grams

    def observe(self, step: int, signals: Signals) -> None:
        assert signals.activations is not None and signals.probe_inputs is not None
        if self._pending_reference is not None and self._ref_grams is None:
            self.reference, self.reference_units = build_reference(
                self._pending_reference, self.units, self.plan.device, template=signals.model)
            self._pending_reference = None
        grams = self._reference_grams(signals.probe_inputs)
        active = self.active_units()
        self.histories = {i: h for i, h in self.histories.items() if i in active}
        for i in active:
            x = signals.activations.get(i)
            if x is None:
                continue
            value = oracle_cka(gram_linear(x), grams[i])
            hist = self.histories.setdefault(i, [])
            hist.append(value)
            del hist[: -self.window]

    def decide(self, step: int) -> Decision | None:
        c = self.cfg
        hist = {i: h for i, h in self.histories.items() if i not in self.frozen}
        todo = oracle_decision(hist, self.window, c.var_threshold, c.cutoff, c.sequential)
        if not todo:
            return None
        parts = [f"{i}: CKA {hist[i][-1]:.4f}, var {window_variance(hist[i][-self.window:]):.2e}" for i in todo]
        return Decision(freeze=todo, reason=f"CKA to reference stable over {self.window} checks "
                                            f"({c.window_epochs:g} epochs; {'; '.join(parts)})")

    def epoch_metrics(self) -> dict[str, float]:
        """Mean of the latest similarity over the units still being tracked (logged as ``policy/cka_mean``)."""
        latest = [h[-1] for i, h in self.histories.items() if h and i not in self.frozen]
        return {"cka_mean": sum(latest) / len(latest)} if latest else {}

    def state_dict(self) -> dict[str, Any]:
        return {"histories": {i: list(h) for i, h in sorted(self.histories.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.histories = {int(i): [float(v) for v in h] for i, h in state.get("histories", {}).items()}
