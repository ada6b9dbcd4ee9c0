"""``smartfrz``: freeze the layers that an attention-based predictor, reading their weight history, says to.

Method card
-----------
Paper: Sheng Li, Geng Yuan, Yue Dai, Youtao Zhang, Yanzhi Wang, Xulong Tang. "SmartFRZ: An Efficient
Training Framework using Attention-Based Layer Freezing". ICLR 2023, arXiv:2401.16720.

Rule (paper sections 3-4, figure 1):

* every ``record_every`` steps, record a *tailored* snapshot of every active (not yet frozen) freezable
  layer: the same ``tailor_size`` randomly sampled weights of the layer each time (:mod:`.tailoring`),
  kept in a per-layer ring buffer of the last ``window`` snapshots (:mod:`.history`); only the snapshots
  a stage will read are taken (the last ``window`` record steps before each stage; see **Cost**);
* every ``stage_every`` steps a *freezing stage*: the shared predictor (:mod:`.model`, eq. 1-4) reads the
  window of each active layer and predicts "freeze" or "keep training"; the layers predicted "freeze" are
  frozen, in any order (non-sequential: a later layer may freeze before an earlier one, section 3.4);
  a frozen layer is no longer recorded and its history is discarded; never unfreeze.

Defaults and their source: ``window = 30`` and ``tailor_size = 1024`` (paper, section 4 and Tables 4-5);
layer granularity, a convolution frozen together with its BatchNorm (paper, section 4; our layer units
do that). ``record_every``: ``max(1, steps_per_epoch // 30)`` (about 30 snapshots per epoch, as the
third-party code records; the paper does not say). ``stage_every``: one freezing stage per epoch
("periodically" in the paper).

Details that are ours:

* **Readiness.** A layer is only judged once its window is full (``window`` snapshots recorded); until
  then it keeps training. All ready layers are judged at once, in one batched predictor call.
* **Sequential option.** ``sequential = true`` freezes only the longest run of active layers, from the
  front, that are all ready and predicted "freeze" (for comparison with sequential methods); the paper's
  SmartFRZ is non-sequential (the default).
* **Normalisation.** The predictor normalises each window itself (the mode is stored in its weights file);
  the paper does not say how windows are scaled. The old ``delta`` mode (differences to the latest
  snapshot) made the latest row all zeros, so the query ``MLP_q(x_t)`` was a constant and the attention no
  longer depended on the current weights (the mechanism of section 3.2). Candidates that keep it, all
  scaled by the window's std: ``first_delta`` (displacement since the window's first snapshot),
  ``diff`` (consecutive steps) and ``standardize``; chosen on the validation runs at window 30 and tailor
  1024 (ROC AUC on the validation runs r32-adamw-b32 and vgg-sgd-b16, 578 samples, each candidate trained 4 epochs
  of 512 samples, on the full 15-configuration corpus: ``first_delta`` 0.898, ``diff`` 0.645,
  ``standardize`` 0.651; on the earlier 12-configuration one 0.892, 0.697, 0.661), so the family uses
  ``first_delta``; a test checks that its query changes with the latest snapshot.
* **Predictor family.** ``predictors/weights/smartfrz_w<W>_t<T>.pt`` for window W in {20, 30, 40, 50} at
  tailor 1024 and tailor T in {512, 1024, 2048, 4096} at window 30 (paper Tables 4 and 5), all trained from
  one collection at tailor 4096 (``freezebench predictor build``; ``predictors/build.py`` lists the corpus
  and its train / validation / test split). Tailoring is nested (:mod:`.tailoring`), so the smaller tailor
  sizes train on the leading columns of the same snapshots, and shorter windows are cut from the same
  histories. ``policy.weights = null`` loads the member trained at ``policy.window`` and
  ``policy.tailor_size`` (a :class:`ConfigError` lists the shipped ones when none matches);
  ``policy.any_window = true`` reads another window with the member of the same tailor size trained
  nearest to window 30. Each file stores its decision threshold, chosen on the validation runs.
  Figures of the default (window 30, tailor 1024; threshold 0.522, validation ROC AUC 0.906) on the
  test runs (never used to choose anything; an unseen low-lr AdamW fine-tuning setting at batch 128, the
  unseen mobilenet_v2, and resnet56 at an unseen cadence of one snapshot per 2 steps), all test samples
  together: ROC AUC 0.742, accuracy 0.686, precision 0.413, recall 0.648, F1 0.504 (the previous family,
  trained without deit_tiny, vgg11_bn with AdamW and resnet56 at batch 64: 0.716, 0.669, 0.388, 0.585,
  0.467); per run in the README.
* **Text (transformers).** The shipped family was trained on CNN runs only. Measured on four ``bert_tiny``
  runs of the embedded text task (``freezebench predictor collect`` at layer granularity, two
  configurations: AdamW lr 1e-3 batch 32, seeds 0/1, and lr 5e-4 batch 16, seeds 2/3; 4 epochs; the same
  CKA-oracle labels), the shipped default predictor (window 30, tailor 1024) ranks well, ROC AUC 0.787
  over 504 samples (per run 0.714 to 0.833; the CNN test runs: 0.742), but its decisions at the stored
  threshold agree poorly with the oracle: precision 0.151, recall 0.302, F1 0.202 (CNN test runs: 0.504;
  the previous family: AUC 0.783, F1 0.195), with only
  8.5 % of the samples labelled "freeze". So a text-trained predictor (or at least a threshold chosen on
  text runs) is needed before SmartFRZ's text results stand for the paper's method. Shipped since:
  ``smartfrz_text_w30_t1024.pt``, trained on ``predictors/build.py``'s ``TEXT_CORPUS`` (bert_tiny and
  bert_mini on ``text_demo``, AdamW, linear schedule with 10 % warm-up; ``first_delta`` as the image family,
  not re-selected on text; threshold 0.606 chosen on the validation runs, ROC AUC 0.771, F1 0.510 there).
  ``policy.domain = auto`` (default) picks the family from the model's modality (:attr:`Plan.modality`,
  set by the trainer's batch adapter); ``image`` / ``text`` force one. On the text test runs (unseen
  bert_small; unseen bert_tiny lr 3e-3 batch 128, one seed diverged), 1152 samples: ROC AUC 0.419,
  precision 0.077, recall 0.355, F1 0.126 (image default on the same runs: 0.410 / 0.054 / 0.131 / 0.077),
  so the text predictor does not yet generalise to an unseen architecture; treat SmartFRZ's text figures
  with that in mind.
* **Labels.** The CKA-oracle rule of the ``cka_oracle`` baseline (one implementation,
  :mod:`freezebench.analysis.oracle`: debiased linear CKA, a 2-epoch window), against the final weights of
  the same configuration trained with another seed (:mod:`.collect`).
* **Cost.** Every change below is exact: the same windows, probabilities (``torch.equal``) and decisions
  as the straightforward implementation (tests pin it; on the 10-epoch default job all six stages that
  judged units gave bit-identical probabilities and the same 19 freezes).

  - *Only the snapshots a stage reads are taken*: a snapshot more than ``window`` record steps before the
    next stage leaves the ring buffer before any stage reads it, so :meth:`SmartFRZ.observe_at` skips it.
    At one snapshot per step and one stage per 45-step epoch (the default job) that is 30 of every 45.
  - *Snapshots* (:meth:`.tailoring.Tailor.snapshot_all`): a plan cached per set of active units; small
    tensors (BatchNorm, small convolutions: 45 of resnet20's 57 layer tensors) copied whole by one
    ``_foreach_copy_``, each large one gathered by one ``index_select`` written in place, one index for
    the rest; the history stores them with one ``index_copy_``; no host synchronisation. Single-threaded
    CPU time of one resnet20 snapshot in isolation on a loaded machine: 297 us before, 81 us after.
  - *A stage* makes one batched predictor call in ``inference_mode`` on a fresh gather of the windows,
    normalised in place, ReLUs in place (:meth:`.model.SmartFRZPredictor.probabilities`; the same
    kernels as the forward), and one device-to-host transfer.

  What is left is mostly arithmetic: the predictor's forward is 42.0 MFLOPs per judged unit
  (:func:`.model.predictor_flops`), 4.49 GFLOPs over the 107 unit judgements of the 10-epoch default job,
  which is 2.9 % of that job's 0.156 training TFLOPs (tiny 8x8 images: training does little arithmetic
  per step). So the 0.5 % overhead target is out of reach on that job for an exact implementation (it
  would need the predictor's matrix products to run about six times faster per FLOP than the training
  step does); at a realistic step budget (resnet20 on 32x32 images, batch 128, 390 steps per epoch:
  about 6 training TFLOPs per epoch, one stage of at most 0.8 GFLOPs and 30 snapshots) it is about
  0.01 % in FLOPs. A smaller ``tailor_size`` cuts the first layers' work (512: 26.0 MFLOPs per unit), at
  the figures of that family member. The trainer times all policy work, the freezing itself included;
  the freezing stage's rule is the pure function :func:`stage_decision`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from freezebench.errors import ConfigError
from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig, Signal, Signals

from .history import HistoryBuffer
from .tailoring import Tailor
from .weights import DOMAINS, load_predictor, select_weights


@dataclass
class SmartFRZConfig(PolicyConfig):
    name: str = "smartfrz"
    weights: str | None = None  # predictor file (save_predictor); null: the shipped family member trained at policy.window and policy.tailor_size
    window: int = 30  # snapshots per layer the predictor reads (paper default 30; Table 4 sweeps 20-50)
    tailor_size: int = 1024  # weights sampled per layer per snapshot (paper default 1024; Table 5 sweeps 512-4096)
    record_every: int | None = None  # steps between snapshots; null: max(1, steps_per_epoch // 30), ~30 per epoch
    stage_every: int | None = None  # steps between freezing stages; null: once per epoch (steps_per_epoch)
    sequential: bool = False  # true: freeze only the longest front prefix of active layers predicted "freeze"
    seed: int = 0  # seed of the tailoring indices (which weights of each layer are sampled)
    domain: str = "auto"  # which shipped family policy.weights=null loads: auto (the model's modality, Plan.modality) | image | text
    any_window: bool = False  # true: read policy.window snapshots with a predictor trained at another window (its attention takes any length; window sensitivity without retraining)


def stage_decision(active: Sequence[int], p_freeze: dict[int, float], threshold: float,
                   sequential: bool = False) -> list[int]:
    """SmartFRZ's freezing stage (pure): the ``active`` units (forward order) to freeze, given the
    predictor's ``p_freeze`` of the units it judged (those with a full window). A unit is predicted
    "freeze" when ``p_freeze > threshold`` (strictly; a missing unit is "keep"); non-sequential: all of them
    (paper section 3.4); ``sequential``: only the longest front prefix of active units predicted "freeze"."""
    predicted = {u: p > threshold for u, p in p_freeze.items()}
    if sequential:
        return sequential_prefix(active, predicted)
    return [u for u in active if predicted.get(u, False)]


def sequential_prefix(active: Sequence[int], predicted: dict[int, bool]) -> list[int]:
    """The longest run of ``active`` units, from the front, whose prediction is "freeze" (missing = keep)."""
    out = []
    for u in active:
        if not predicted.get(u, False):
            break
        out.append(u)
    return out


class SmartFRZ(FreezePolicy):
    __doc__ = __doc__
    name = "smartfrz"
    needs = frozenset({Signal.WEIGHTS})
    granularity = "layer"
    Config = SmartFRZConfig

    @staticmethod
    def validate_config(cfg: SmartFRZConfig) -> None:
        if cfg.window < 1:
            raise ConfigError(f"policy.window must be >= 1 snapshot, got {cfg.window}")
        if cfg.tailor_size < 1:
            raise ConfigError(f"policy.tailor_size must be >= 1, got {cfg.tailor_size}")
        for key in ("record_every", "stage_every"):
            v = getattr(cfg, key)
            if v is not None and v < 1:
                raise ConfigError(f"policy.{key} must be >= 1 step (or null for the default), got {v}")
        if cfg.domain not in ("auto", *DOMAINS):
            raise ConfigError(f"policy.domain must be auto, {' or '.join(DOMAINS)}, got {cfg.domain!r}")

    @staticmethod
    def weights_path(cfg: SmartFRZConfig, modality: str = "image") -> str:
        """The predictor file to load: ``cfg.weights``, else the shipped family member of ``cfg.domain``
        (``auto``: ``modality``, the model's, :attr:`Plan.modality`) trained at ``cfg.window`` and
        ``cfg.tailor_size`` (with ``any_window``: at that tailor size, nearest window); a
        :class:`ConfigError` naming the shipped members of that domain when none matches."""
        if cfg.weights:
            return str(cfg.weights)
        domain = modality if cfg.domain == "auto" else cfg.domain
        return str(select_weights(cfg.window, cfg.tailor_size, any_window=cfg.any_window, domain=domain))

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        c = self.cfg
        self.validate_config(c)
        self.predictor, self.predictor_meta = load_predictor(
            self.weights_path(c, plan.modality), tailor_size=c.tailor_size, window=None if c.any_window else c.window,
            device=plan.device,
        )
        # the predictor file may carry a decision threshold chosen on validation runs (default: argmax)
        self.threshold = float(self.predictor_meta.get("threshold", 0.5))
        self.record_every = c.record_every or max(1, plan.steps_per_epoch // 30)
        self.stage_every = c.stage_every or plan.steps_per_epoch
        self._units = list(self.freezable)  # row r of the history/tailor = unit self._units[r]
        self._row = {u: r for r, u in enumerate(self._units)}
        self._params = [list(units[u].parameters) for u in self._units]
        self.tailor = Tailor(self._params, tailor_size=c.tailor_size, seed=c.seed, device=plan.device)
        self.history = HistoryBuffer(len(self._units), c.window, c.tailor_size, device=plan.device)
        self.records = 0  # snapshots recorded (record calls; only those a stage will read)
        self._active_key: frozenset[int] | None = None  # the frozen set self._active was computed for
        self._active: list[int] = []
        self.stages = 0  # freezing stages run
        self.last_stage: dict[str, float] = {}  # figures of the last stage (epoch_metrics)

    # --- life cycle -----------------------------------------------------------------------------------
    def observe_at(self, step: int) -> bool:
        """Every ``record_every`` steps, but only the snapshots that a stage will read: the last ``window``
        record steps up to the next stage (a snapshot older than that leaves every unit's ring buffer before
        any stage reads it, so skipping it changes no window; at one snapshot per step and one stage per
        45-step epoch, a third of the snapshots)."""
        if step <= 0 or step % self.record_every:
            return False
        nxt = -(-step // self.stage_every) * self.stage_every  # the next stage at or after this step
        if nxt // self.record_every - step // self.record_every >= self.history.window:
            return False
        return bool(self._active_rows())

    def _active_rows(self) -> list[int]:
        """History rows of the active units, cached per frozen set (it changes only at a freeze)."""
        if self._active_key is not self.frozen:
            self._active_key = self.frozen
            self._active = [self._row[u] for u in self.active_units()]
        return self._active

    def observe(self, step: int, signals: Signals) -> None:
        rows = self._active_rows()
        if not rows:
            return
        self.history.record(rows, self.tailor.snapshot_all(self._params, rows))
        self.records += 1

    def decide_at(self, step: int) -> bool:
        return step > 0 and step % self.stage_every == 0

    def decide(self, step: int) -> Decision | None:
        active = self.active_units()
        live = set(active)
        ready_rows = [r for r in self.history.ready_units() if self._units[r] in live]
        self.stages += 1
        if not ready_rows:
            self.last_stage = {"evaluated_units": 0.0, "predicted_freeze_frac": 0.0}
            return None
        # one batched call on a fresh gather of the windows, normalised in place
        probs = self.predictor.probabilities(self.history.windows(ready_rows), inplace=True)
        p_freeze = probs[:, 1].tolist()  # the one device->host transfer of a stage
        conf = {self._units[r]: p for r, p in zip(ready_rows, p_freeze)}
        n_pred = sum(p > self.threshold for p in p_freeze)
        self.last_stage = {"evaluated_units": float(len(ready_rows)), "predicted_freeze_frac": n_pred / len(ready_rows)}
        todo = stage_decision(active, conf, self.threshold, self.cfg.sequential)
        for u in todo:
            self.history.drop(self._row[u])
        if not todo:
            return None
        shown = ", ".join(f"{u}:{conf[u]:.3f}" for u in todo)
        return Decision(freeze=todo, reason=f"predictor: freeze (p_freeze {shown})")

    def notify_frozen(self, frozen: frozenset[int]) -> None:
        super().notify_frozen(frozen)
        for u in frozen:  # units frozen by anyone: forget their history
            r = self._row.get(u)
            if r is not None and self.history.count(r):
                self.history.drop(r)

    def epoch_metrics(self) -> dict[str, float]:
        """Figures of the last freezing stage: units judged and the fraction predicted "freeze"."""
        return dict(self.last_stage)

    # --- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.state_dict(),
            "records": self.records,
            "stages": self.stages,
            "last_stage": dict(self.last_stage),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hist = state["history"]
        if int(hist["window"]) != self.history.window or int(hist["tailor_size"]) != self.history.tailor_size:
            raise ConfigError(
                f"SmartFRZ state was saved with window={hist['window']}, tailor_size={hist['tailor_size']}, but "
                f"this run has window={self.history.window}, tailor_size={self.history.tailor_size}; resume with "
                f"the same policy.window and policy.tailor_size"
            )
        self.history.load_state_dict(hist)
        self.records = int(state["records"])
        self.stages = int(state["stages"])
        self.last_stage = {str(k): float(v) for k, v in state.get("last_stage", {}).items()}
