"""Training data for SmartFRZ's predictor (paper section 3.4): windows of weight snapshots labelled by the CKA oracle.

    path = collect(["model.name=resnet20", "data.name=digits", "trainer.epochs=10"], out="data/r20_s0.pt")

Steps:

1. **Reference.** Train the model with ``policy=full`` (the given overrides, tracking and progress bar off);
   its final weights are the reference, written to a temporary checkpoint.
2. **Recording run.** Train the *same* model again from the *same* initial weights (same config and seed,
   so the same init; checked by comparing the two initial ``state_dict``\\ s, a mismatch is an error) with
   :class:`_Recorder`, a policy that never freezes. Every ``record_every`` steps (default
   ``max(1, steps_per_epoch // 30)``, as :mod:`.policy`) it stores every freezable unit's tailored snapshot
   (:class:`.tailoring.Tailor`, ``tailor_size`` weights, tailoring seed ``seed``); at every check
   (``Plan.check_steps(checks_per_epoch)``) it computes each freezable unit's linear CKA to the reference's
   corresponding unit on the trainer's fixed probe batch (the reference side computed once, as the oracle).
3. **Labels.** For each unit, its CKA history over the checks is labelled with the CKA-oracle rule
   (:func:`oracle_labels`): 1 from the first check where :func:`~freezebench.baselines.cka_oracle.cka_ready`
   holds (the oracle would freeze the unit then; it has converged, so later checks are 1 too), else 0.
4. **Samples.** At each check step ``t`` a unit gives one sample: the last ``window`` snapshots recorded at
   or before ``t`` (what SmartFRZ's predictor sees at a stage at step ``t``), oldest first, and its label;
   checks before a full window exists give none.

Dataset file (``torch.save``, plain types and tensors, readable with ``weights_only=True``)::

    {"format_version": 1, "window": W, "tailor_size": T,
     "windows": float16 (N, W, T), "labels": int64 (N,), "unit": int64 (N,), "step": int64 (N,),
     "run": int64 (N,)  -- index into "runs",
     "runs": [{"id", "model", "dataset", "seed", "epochs", "steps_per_epoch", "overrides", "unit_names",
               "record_every", "check_steps", "cka" (per unit, per check), "labels" (per unit, per check),
               "label_rule", "tailor_seed", "init_hash", "reference_init_hash", ...}],
     # only with keep_snapshots=True: "snapshots" float32 (S, U, T), "snapshot_steps" int64 (S,)}

:func:`merge_datasets` concatenates several files (runs keep their ids; the ids must be distinct).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from freezebench.fileio import atomic_torch_save

from freezebench.baselines.cka_oracle import build_reference, cka_ready
from freezebench.policy import FreezePolicy, Plan, PolicyConfig, Signal, Signals
from freezebench.analysis.similarity import cka_from_grams, gram_linear

from .tailoring import Tailor

__all__ = ["FORMAT_VERSION", "collect", "oracle_labels", "build_samples", "merge_datasets", "load_dataset",
           "state_hash"]

FORMAT_VERSION = 1
_ARRAYS = ("windows", "labels", "unit", "step", "run")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a ``state_dict`` (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def oracle_labels(history: Sequence[float], window: int, var_threshold: float, cutoff: float) -> list[int]:
    """Label of each check of one unit's CKA history (oldest first): 1 from the first check where the
    oracle's rule holds on the history up to that check (inclusive), 0 before (and 0 everywhere if never)."""
    labels, frozen = [], False
    for t in range(len(history)):
        frozen = frozen or cka_ready(history[: t + 1], window, var_threshold, cutoff)
        labels.append(int(frozen))
    return labels


def build_samples(snapshots: torch.Tensor, snapshot_steps: Sequence[int], check_steps: Sequence[int],
                  labels: Sequence[Sequence[int]], window: int) -> dict[str, torch.Tensor]:
    """Samples from one run: ``snapshots`` ``(S, U, T)`` recorded after ``snapshot_steps`` (ascending),
    ``labels[u][c]`` the label of unit ``u`` at ``check_steps[c]``. A sample per (check, unit) with at least
    ``window`` snapshots at or before the check: its window is the last ``window`` of them, oldest first.
    Returns ``windows`` (float16), ``labels``, ``unit``, ``step`` (int64)."""
    steps = torch.as_tensor(list(snapshot_steps), dtype=torch.long)
    wins, labs, units, at = [], [], [], []
    for c, t in enumerate(check_steps):
        n = int((steps <= t).sum())  # snapshots recorded at or before step t
        if n < window:
            continue
        block = snapshots[n - window : n]  # (W, U, T)
        for u in range(snapshots.shape[1]):
            wins.append(block[:, u])
            labs.append(int(labels[u][c]))
            units.append(u)
            at.append(int(t))
    T = snapshots.shape[-1]
    return {
        "windows": torch.stack(wins).half() if wins else torch.empty(0, window, T, dtype=torch.float16),
        "labels": torch.tensor(labs, dtype=torch.long),
        "unit": torch.tensor(units, dtype=torch.long),
        "step": torch.tensor(at, dtype=torch.long),
    }


class _Recorder(FreezePolicy):
    """Never freezes; records tailored snapshots and, at each check, CKA to a reference (see module doc)."""

    name = "smartfrz_recorder"
    needs = frozenset({Signal.WEIGHTS, Signal.ACTIVATIONS})
    granularity = "layer"

    def __init__(self, reference_path: str, *, tailor_size: int, record_every: int | None, checks_per_epoch: int,
                 seed: int):
        super().__init__(PolicyConfig(name=self.name))
        self.reference_path = reference_path
        self.tailor_size, self._record_every = int(tailor_size), record_every
        self.checks_per_epoch, self.seed = int(checks_per_epoch), int(seed)

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.record_every = int(self._record_every or max(1, plan.steps_per_epoch // 30))
        self.check_steps = sorted(plan.check_steps(self.checks_per_epoch))
        self._checks = frozenset(self.check_steps)
        self.rows = list(self.freezable)  # row r = unit self.rows[r]
        self._params = [list(units[u].parameters) for u in self.rows]
        self.tailor = Tailor(self._params, tailor_size=self.tailor_size, seed=self.seed, device=plan.device)
        self.reference, self.reference_units = build_reference(self.reference_path, units, plan.device)
        self._ref_grams: dict[int, torch.Tensor] | None = None
        self.snapshots: list[torch.Tensor] = []  # (U, T) float32 CPU per record
        self.snapshot_steps: list[int] = []
        self.cka: list[list[float]] = [[] for _ in self.rows]  # per row, per check
        self._check_due = False

    def observe_at(self, step: int) -> bool:
        self._check_due = step in self._checks
        return step > 0 and (step % self.record_every == 0 or self._check_due)

    def probe_units(self) -> list[int]:
        return list(self.rows) if self._check_due else []

    def decide_at(self, step: int) -> bool:
        return False

    def observe(self, step: int, signals: Signals) -> None:
        if step % self.record_every == 0:
            with torch.no_grad():
                snaps = self.tailor.snapshot_all(self._params)
            self.snapshots.append(snaps.float().cpu())
            self.snapshot_steps.append(step)
        if step in self._checks:
            assert signals.activations is not None and signals.probe_inputs is not None
            if self._ref_grams is None:
                from freezebench.units import capture_outputs

                outs = capture_outputs(self.reference, self.reference_units, self.rows, signals.probe_inputs)
                self._ref_grams = {i: gram_linear(y) for i, y in outs.items()}
                self.reference = self.reference_units = None  # released: the Grams are all that is needed
            for r, u in enumerate(self.rows):
                self.cka[r].append(cka_from_grams(gram_linear(signals.activations[u]), self._ref_grams[u]))


def _config(overrides: Sequence[str]):
    from freezebench.config import load_config

    base = [*overrides, "policy=full", "tracking.enabled=false", "trainer.progress=false",
            "trainer.save_checkpoint=false"]
    cfg = load_config(base)
    if cfg.model.granularity == "auto":  # the recorder works on layers: both runs use the same partition
        base.append("model.granularity=layer")
        cfg = load_config(base)
    return cfg


def collect(
    overrides: list[str],
    *,
    out: str | os.PathLike,
    window: int = 30,  # snapshots per sample (the predictor's window; paper default 30)
    tailor_size: int = 1024,  # weights per snapshot (paper default 1024)
    record_every: int | None = None,  # steps between snapshots; None: max(1, steps_per_epoch // 30)
    checks_per_epoch: int = 1,  # CKA checks (label times) per epoch
    oracle_window: int = 3,  # CKA-oracle rule: checks whose variance must be small
    var_threshold: float = 1e-4,  # CKA-oracle rule: variance threshold
    cutoff: float = 0.3,  # CKA-oracle rule: current CKA must exceed this
    seed: int = 0,  # tailoring seed (which weights are sampled)
    run_id: str | None = None,  # id of this run in the dataset; default "<model>-<dataset>-s<seed>"
    keep_snapshots: bool = False,  # also store every recorded snapshot (tests, inspection)
) -> Path:
    """Train a reference, retrain with recording, label with the CKA oracle, save the samples to ``out``."""
    from omegaconf import OmegaConf

    from freezebench.trainer import Trainer

    if window < 1 or tailor_size < 1 or checks_per_epoch < 1 or oracle_window < 1:
        raise ValueError("window, tailor_size, checks_per_epoch and oracle_window must be >= 1")
    if record_every is not None and record_every < 1:
        raise ValueError(f"record_every must be >= 1 or None, got {record_every}")
    cfg = _config(overrides)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # 1. the reference
    ref_trainer = Trainer(cfg)
    ref_init = {k: v.detach().cpu().clone() for k, v in ref_trainer.model.state_dict().items()}
    ref_trainer.fit()
    with tempfile.TemporaryDirectory(prefix="smartfrz-collect-") as tmp:
        ref_path = ref_trainer.save_checkpoint(Path(tmp) / "reference.pt")
        unit_names = [u.name for u in ref_trainer.units]
        del ref_trainer

        # 2. the recording run, from the same initial weights
        rec = _Recorder(str(ref_path), tailor_size=tailor_size, record_every=record_every,
                        checks_per_epoch=checks_per_epoch, seed=seed)
        trainer = Trainer(cfg, policy=rec)
        init = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
        if init.keys() != ref_init.keys() or any(not torch.equal(init[k], ref_init[k]) for k in init):
            raise RuntimeError("the recording run does not start from the reference run's initial weights; "
                               "set trainer.deterministic=true and do not pass model.pretrained/checkpoint that vary")
        init_hash, ref_init_hash = state_hash(init), state_hash(ref_init)
        result = trainer.fit()

    # 3-4. labels and samples
    labels = [oracle_labels(h, oracle_window, var_threshold, cutoff) for h in rec.cka]
    snaps = torch.stack(rec.snapshots) if rec.snapshots else torch.empty(0, len(rec.rows), tailor_size)
    samples = build_samples(snaps, rec.snapshot_steps, rec.check_steps, labels, window)
    samples["unit"] = torch.tensor([rec.rows[r] for r in samples["unit"].tolist()], dtype=torch.long)
    c = cfg
    run = {
        "id": run_id or f"{c.model.name}-{c.data.name}-s{c.trainer.seed}",
        "model": str(c.model.name),
        "dataset": str(c.data.name),
        "seed": int(c.trainer.seed),
        "epochs": int(c.trainer.epochs),
        "steps_per_epoch": int(trainer.plan.steps_per_epoch),
        "overrides": [str(o) for o in overrides],
        "config": OmegaConf.to_container(c, resolve=True),
        "unit_names": unit_names,
        "units": [int(u) for u in rec.rows],
        "record_every": int(rec.record_every),
        "check_steps": [int(s) for s in rec.check_steps],
        "cka": [[float(v) for v in h] for h in rec.cka],
        "labels": labels,
        "label_rule": {"rule": "cka_oracle", "window": int(oracle_window), "var_threshold": float(var_threshold),
                       "cutoff": float(cutoff), "checks_per_epoch": int(checks_per_epoch)},
        "tailor_seed": int(seed),
        "init_hash": init_hash,
        "reference_init_hash": ref_init_hash,
        "val_acc": float(result.metrics.get("val/acc", float("nan"))),
    }
    data: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "window": int(window),
        "tailor_size": int(tailor_size),
        **samples,
        "run": torch.zeros(len(samples["labels"]), dtype=torch.long),
        "runs": [run],
    }
    if keep_snapshots:
        data["snapshots"] = snaps
        data["snapshot_steps"] = torch.tensor(rec.snapshot_steps, dtype=torch.long)
    atomic_torch_save(data, out)
    return out


def load_dataset(path: str | os.PathLike) -> dict[str, Any]:
    """Read one dataset file (``weights_only``) and check its keys and version."""
    from freezebench.errors import ConfigError
    from freezebench.fileio import read_torch

    data = read_torch(path, what="SmartFRZ predictor dataset", error=ConfigError,  # CRC32-checked
                      fix="the file is corrupt or truncated: collect it again (freezebench predictor collect)")
    missing = [k for k in ("format_version", "window", "tailor_size", "runs", *_ARRAYS) if k not in data]
    if missing:
        raise ValueError(f"{path}: not a SmartFRZ predictor dataset (missing {', '.join(missing)})")
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: dataset format {data['format_version']}, expected {FORMAT_VERSION}")
    return data


def merge_datasets(paths: Sequence[str | os.PathLike | dict[str, Any]]) -> dict[str, Any]:
    """Concatenate datasets (paths or loaded dicts): same window and tailor size; run ids must be distinct."""
    parts = [p if isinstance(p, dict) else load_dataset(p) for p in paths]
    if not parts:
        raise ValueError("no datasets to merge")
    W, T = parts[0]["window"], parts[0]["tailor_size"]
    runs: list[dict[str, Any]] = []
    arrays: dict[str, list[torch.Tensor]] = {k: [] for k in _ARRAYS}
    for p in parts:
        if (p["window"], p["tailor_size"]) != (W, T):
            raise ValueError(f"cannot merge window/tailor_size {p['window']}/{p['tailor_size']} with {W}/{T}")
        for k in _ARRAYS:
            arrays[k].append(p[k] + len(runs) if k == "run" else p[k])
        runs.extend(dict(r) for r in p["runs"])
    ids = [r["id"] for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"run ids appear in more than one dataset: {dup}; give each collect() a distinct run_id")
    merged = {"format_version": FORMAT_VERSION, "window": W, "tailor_size": T, "runs": runs}
    merged.update({k: torch.cat(v) for k, v in arrays.items()})
    return merged
