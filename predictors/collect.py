"""Training data for SmartFRZ's predictor (paper section 3.4): recorded weight histories labelled by the CKA oracle.

    path = collect(["model.name=resnet20", "data.name=digits", "trainer.epochs=8"], out="data/r20.pt",
                   seeds=(0, 1))

A collection trains the same configuration twice, with two seeds ``a`` and ``b`` (different initial
weights and data order), each time under :class:`Recorder`, a policy that never freezes and records:

* every ``record_every`` steps (default as the ``smartfrz`` policy: ``max(1, steps_per_epoch // 30)``)
  the **tailored snapshot** of every freezable unit, ``tailor_size`` weights in **float32** (exactly what
  :class:`~.policy.SmartFRZ` writes into its history, bit for bit: same :class:`~.tailoring.Tailor`, same
  seed, same dtype, same steps);
* at every check (``checks_per_epoch`` per epoch, :func:`freezebench.analysis.oracle.check_steps`) the
  linear Gram matrix of every freezable unit's output on a **fixed probe batch** (the training set's
  probe of seed ``a``, the same inputs in both runs).

Then each run is labelled against the **other** run's final weights (the paper trains the network
"again"; a reference of another seed, as the Table 1 suite does, so the recording run does not retrace
its reference's trajectory and the last CKA is not 1 by construction): run ``a``'s CKA history of unit
``u`` is ``oracle_cka(G_a[c, u], G_b[last, u])`` over its checks ``c`` (and the other way round), and the
labels are :func:`freezebench.analysis.oracle.oracle_labels` of that history: the one rule the
``cka_oracle`` baseline runs, with its window in epochs.

**Nested tailoring.** Snapshots are collected at the largest tailor size (4096 by default). The first
``k`` of a unit's sampled indices are its size-``k`` tailoring (:func:`~.tailoring.draw_indices`), so the
first ``k`` columns of a stored snapshot are exactly the snapshot the policy records at
``policy.tailor_size = k``. A sample for window ``W`` at check step ``t`` is the last ``W`` snapshots
recorded at or before ``t`` (what the policy's freezing stage reads at step ``t``), so every window up to
the number recorded can be cut from one collection (:func:`build_samples`).

Dataset file (``torch.save``, plain types and tensors, readable with ``weights_only=True``)::

    {"format_version": 2, "tailor_size": T,
     "runs": [{"id", "model", "dataset", "seed", "reference_seed", "epochs", "steps_per_epoch", "overrides",
               "config", "unit_names", "units", "record_every", "checks_per_epoch", "check_steps",
               "snapshots": float32 (S, U, T), "snapshot_steps": int64 (S,),
               "cka" (per unit, per check), "labels" (per unit, per check), "label_rule", "tailor_seed",
               "probe_seed", "probe_size", "val_acc"}, ...]}

:func:`merge_datasets` concatenates files (run ids must be distinct); :func:`build_samples` cuts windows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from freezebench.analysis.oracle import CUTOFF, VAR_THRESHOLD, WINDOW_EPOCHS, check_steps, oracle_cka, oracle_labels
from freezebench.analysis.similarity import gram_linear
from freezebench.fileio import atomic_torch_save
from freezebench.policy import FreezePolicy, Plan, PolicyConfig, Signal, Signals

from .tailoring import Tailor

__all__ = ["FORMAT_VERSION", "COLLECT_TAILOR", "Recorder", "collect", "label_runs", "build_samples", "gather_windows",
           "merge_datasets", "load_dataset", "state_hash", "default_record_every"]

FORMAT_VERSION = 2
COLLECT_TAILOR = 4096  # the largest tailor size of the family: every smaller one is a prefix
_RUN_KEYS = ("id", "units", "record_every", "check_steps", "snapshots", "snapshot_steps", "labels")


def default_record_every(steps_per_epoch: int) -> int:
    """The ``smartfrz`` policy's default cadence: about 30 snapshots per epoch."""
    return max(1, int(steps_per_epoch) // 30)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a ``state_dict`` (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_samples(run: dict[str, Any], window: int) -> dict[str, torch.Tensor]:
    """The samples of one collected run for a predictor of ``window`` snapshots: one per (check, unit) with at least ``window`` snapshots at or before the
    check step. Returns ``end`` (index one past the window's last snapshot), ``row`` (the unit's row in
    ``run["snapshots"]``), ``unit`` (its unit index), ``step``, ``check`` (index into ``check_steps``) and
    ``labels``, all int64; :func:`gather_windows` turns them into windows."""
    steps = torch.as_tensor(run["snapshot_steps"], dtype=torch.long)
    U = len(run["units"])
    ends, rows, units, at, checks, labs = [], [], [], [], [], []
    for c, t in enumerate(run["check_steps"]):
        n = int((steps <= t).sum())  # snapshots recorded at or before step t
        if n < window:
            continue
        for r in range(U):
            ends.append(n)
            rows.append(r)
            units.append(int(run["units"][r]))
            at.append(int(t))
            checks.append(c)
            labs.append(int(run["labels"][r][c]))
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in
           (("end", ends), ("row", rows), ("unit", units), ("step", at), ("check", checks), ("labels", labs))}
    return out


def gather_windows(snapshots: torch.Tensor, end: torch.Tensor, row: torch.Tensor, window: int,
                   tailor_size: int | None = None) -> torch.Tensor:
    """Windows ``(B, window, k)`` (float32, oldest first) from one run's ``snapshots`` ``(S, U, T)``: sample
    ``i`` is ``snapshots[end[i] - window : end[i], row[i], :k]``, ``k = tailor_size`` (default ``T``)."""
    k = snapshots.shape[-1] if tailor_size is None else int(tailor_size)
    if k > snapshots.shape[-1]:
        raise ValueError(f"tailor_size {k} exceeds the collected tailor size {snapshots.shape[-1]}")
    t = (end.unsqueeze(1) - window + torch.arange(window)).reshape(-1)  # (B * W,)
    r = row.repeat_interleave(window)
    return snapshots[t, r, :k].view(len(end), window, k)


class Recorder(FreezePolicy):
    """Never freezes; records tailored fp32 snapshots and, at each check, every unit's Gram on a fixed
    probe (see the module docstring). ``probe_fn(unit_ids) -> {unit: activations}`` is set by
    :func:`collect` after the trainer is built (the trainer's outputs on the fixed probe inputs)."""

    name = "smartfrz_recorder"
    needs = frozenset({Signal.WEIGHTS})
    granularity = "layer"

    def __init__(self, *, tailor_size: int, record_every: int | None, checks_per_epoch: int, seed: int):
        super().__init__(PolicyConfig(name=self.name))
        self.tailor_size, self._record_every = int(tailor_size), record_every
        self.checks_per_epoch, self.seed = int(checks_per_epoch), int(seed)
        self.probe_fn: Callable[[list[int]], dict[int, torch.Tensor]] | None = None

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.record_every = int(self._record_every or default_record_every(plan.steps_per_epoch))
        self.check_steps = check_steps(plan.steps_per_epoch, plan.epochs, self.checks_per_epoch)
        self._checks = frozenset(self.check_steps)
        self.rows = list(self.freezable)  # row r = unit self.rows[r]
        self._params = [list(units[u].parameters) for u in self.rows]
        self.tailor = Tailor(self._params, tailor_size=self.tailor_size, seed=self.seed, device=plan.device)
        self.snapshots: list[torch.Tensor] = []  # (U, T) float32 CPU per record
        self.snapshot_steps: list[int] = []
        self.grams: list[torch.Tensor] = []  # (U, n, n) float64 CPU per check

    def observe_at(self, step: int) -> bool:
        return step > 0 and (step % self.record_every == 0 or step in self._checks)

    def decide_at(self, step: int) -> bool:
        return False

    def observe(self, step: int, signals: Signals) -> None:
        if step % self.record_every == 0:
            with torch.no_grad():
                snaps = self.tailor.snapshot_all(self._params)
            self.snapshots.append(snaps.float().cpu())
            self.snapshot_steps.append(step)
        if step in self._checks:
            if self.probe_fn is None:
                raise RuntimeError("Recorder.probe_fn is not set: build the recorder with collect()")
            acts = self.probe_fn(self.rows)
            self.grams.append(torch.stack([gram_linear(acts[u]).cpu() for u in self.rows]))


def _config(overrides: Sequence[str], seed: int):
    from freezebench.config import load_config

    base = [*overrides, f"trainer.seed={int(seed)}", "policy=full", "tracking.enabled=false",
            "trainer.progress=false", "trainer.save_checkpoint=false", "trainer.checkpoint_every=0"]
    cfg = load_config(base)
    if cfg.model.granularity == "auto":  # the recorder works on layers, as the smartfrz policy
        base.append("model.granularity=layer")
        cfg = load_config(base)
    return cfg


def _record(overrides: Sequence[str], seed: int, probe_seed: int, *, tailor_size: int, record_every: int | None,
            checks_per_epoch: int, tailor_seed: int) -> dict[str, Any]:
    """Train one recorded run; returns its (unlabelled) run record with ``grams`` (C, U, n, n)."""
    from omegaconf import OmegaConf

    from freezebench.trainer import Trainer

    cfg = _config(overrides, seed)
    rec = Recorder(tailor_size=tailor_size, record_every=record_every, checks_per_epoch=checks_per_epoch,
                   seed=tailor_seed)
    trainer = Trainer(cfg, policy=rec)
    probe_x = trainer.data.probe_batch(cfg.trainer.probe_batch_size, seed=probe_seed)[0]
    probe_x = ({k: v.to(trainer.device) for k, v in probe_x.items()} if isinstance(probe_x, dict)  # text batch
               else probe_x.to(trainer.device))
    rec.probe_fn = lambda ids: trainer.unit_activations(ids, x=probe_x)
    init_hash = state_hash(trainer.model.state_dict())
    result = trainer.fit()
    c = cfg
    return {
        "model": str(c.model.name),
        "dataset": str(c.data.name),
        "seed": int(c.trainer.seed),
        "epochs": int(c.trainer.epochs),
        "steps_per_epoch": int(trainer.plan.steps_per_epoch),
        "overrides": [str(o) for o in overrides],
        "config": OmegaConf.to_container(c, resolve=True),
        "unit_names": [trainer.units[u].name for u in rec.rows],
        "units": [int(u) for u in rec.rows],
        "record_every": int(rec.record_every),
        "checks_per_epoch": int(checks_per_epoch),
        "check_steps": [int(s) for s in rec.check_steps],
        "snapshots": torch.stack(rec.snapshots) if rec.snapshots else torch.empty(0, len(rec.rows), tailor_size),
        "snapshot_steps": torch.tensor(rec.snapshot_steps, dtype=torch.long),
        "grams": torch.stack(rec.grams),
        "tailor_seed": int(tailor_seed),
        "probe_seed": int(probe_seed),
        "probe_size": int(len(next(iter(probe_x.values()))) if isinstance(probe_x, dict) else probe_x.shape[0]),
        "init_hash": init_hash,
        "val_acc": float(result.metrics.get("val/acc", float("nan"))),
    }


def label_runs(run: dict[str, Any], reference: dict[str, Any], *, window_epochs: float = WINDOW_EPOCHS,
               var_threshold: float = VAR_THRESHOLD, cutoff: float = CUTOFF) -> None:
    """Label ``run`` in place against ``reference``'s last check (its final weights): ``cka`` per unit per
    check and the oracle ``labels`` (:func:`freezebench.analysis.oracle.oracle_labels`)."""
    if run["unit_names"] != reference["unit_names"]:
        raise ValueError(f"run {run.get('id')} and its reference have different units")
    ref_last = reference["grams"][-1]
    cka = [[oracle_cka(run["grams"][c, r], ref_last[r]) for c in range(run["grams"].shape[0])]
           for r in range(len(run["units"]))]
    run["cka"] = cka
    run["labels"] = [oracle_labels(h, checks_per_epoch=run["checks_per_epoch"], window_epochs=window_epochs,
                                   var_threshold=var_threshold, cutoff=cutoff) for h in cka]
    run["reference_seed"] = int(reference["seed"])
    run["label_rule"] = {"rule": "cka_oracle", "estimator": "debiased linear CKA", "window_epochs": float(window_epochs),
                         "var_threshold": float(var_threshold), "cutoff": float(cutoff),
                         "checks_per_epoch": int(run["checks_per_epoch"]),
                         "reference": "final weights of the same configuration trained with another seed"}


def collect(
    overrides: list[str],
    *,
    out: str | os.PathLike,
    seeds: tuple[int, int] = (0, 1),  # the two runs; each is the other's reference
    tailor_size: int = COLLECT_TAILOR,  # weights per snapshot; smaller tailor sizes are its prefixes
    record_every: int | None = None,  # steps between snapshots; None: the policy's default
    checks_per_epoch: int = 2,  # CKA checks (label times) per epoch
    window_epochs: float = WINDOW_EPOCHS,  # the oracle rule (freezebench.analysis.oracle)
    var_threshold: float = VAR_THRESHOLD,
    cutoff: float = CUTOFF,
    tailor_seed: int = 0,  # the tailoring seed (the policy's policy.seed)
    run_id: str | None = None,  # id prefix; default "<model>-<dataset>"; runs get "-s<seed>"
    keep_grams: bool = False,  # also store the probe Grams (C, U, n, n) (relabelling, inspection)
) -> Path:
    """Record two runs of ``overrides`` (seeds ``seeds``), label each against the other, save both to ``out``."""
    if tailor_size < 1 or checks_per_epoch < 1:
        raise ValueError("tailor_size and checks_per_epoch must be >= 1")
    if record_every is not None and record_every < 1:
        raise ValueError(f"record_every must be >= 1 or None, got {record_every}")
    a, b = (int(s) for s in seeds)
    if a == b:
        raise ValueError(f"the two seeds must differ (each run is the other's reference), got {seeds}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kw = dict(tailor_size=tailor_size, record_every=record_every, checks_per_epoch=checks_per_epoch,
              tailor_seed=tailor_seed)
    from freezebench.progress import track

    runs = [_record(overrides, s, probe_seed=a, **kw)  # on a terminal: runs done of 2, ETA
            for s in track((a, b), "collect (two seeds, each the other's reference)", unit="run")]
    if runs[0]["unit_names"] != runs[1]["unit_names"]:
        raise RuntimeError("the two seeds partition the model differently")
    prefix = run_id or f"{runs[0]['model']}-{runs[0]['dataset']}"
    for run, ref in ((runs[0], runs[1]), (runs[1], runs[0])):
        label_runs(run, ref, window_epochs=window_epochs, var_threshold=var_threshold, cutoff=cutoff)
    for run in runs:
        run["id"] = f"{prefix}-s{run['seed']}"
        if keep_grams:
            run["grams"] = run["grams"].float()
        else:
            del run["grams"]
    atomic_torch_save({"format_version": FORMAT_VERSION, "tailor_size": int(tailor_size), "runs": runs}, out)
    return out


def load_dataset(path: str | os.PathLike) -> dict[str, Any]:
    """Read one dataset file (``weights_only``) and check its keys and version."""
    from freezebench.errors import ConfigError
    from freezebench.fileio import read_torch

    data = read_torch(path, what="SmartFRZ predictor dataset", error=ConfigError,  # CRC32-checked
                      fix="the file is corrupt or truncated: collect it again (freezebench predictor collect)")
    if not isinstance(data, dict) or "format_version" not in data:
        raise ValueError(f"{path}: not a SmartFRZ predictor dataset")
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: dataset format {data['format_version']}, expected {FORMAT_VERSION} "
                         f"(collect it again with `freezebench predictor collect`)")
    for r in data.get("runs", []):
        missing = [k for k in _RUN_KEYS if k not in r]
        if missing:
            raise ValueError(f"{path}: run {r.get('id')} lacks {', '.join(missing)}")
    return data


def merge_datasets(paths: Sequence[str | os.PathLike | dict[str, Any]]) -> dict[str, Any]:
    """Concatenate datasets (paths or loaded dicts): the same tailor size; run ids must be distinct."""
    parts = [p if isinstance(p, dict) else load_dataset(p) for p in paths]
    if not parts:
        raise ValueError("no datasets to merge")
    T = parts[0]["tailor_size"]
    runs: list[dict[str, Any]] = []
    for p in parts:
        if p["tailor_size"] != T:
            raise ValueError(f"cannot merge tailor size {p['tailor_size']} with {T}")
        runs.extend(p["runs"])
    ids = [r["id"] for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"run ids appear in more than one dataset: {dup}; give each collect() a distinct run_id")
    return {"format_version": FORMAT_VERSION, "tailor_size": T, "runs": runs}
