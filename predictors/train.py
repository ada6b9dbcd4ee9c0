"""Training and evaluating SmartFRZ's predictor on collections written by :func:`.collect.collect`.

    metrics = train_predictor(train=["data/a.pt"], val=["data/b.pt"], out="p.pt", window=30, tailor_size=1024)
    figures = evaluate_predictor("p.pt", ["data/test.pt"])

* **Samples** are cut from the collected fp32 snapshots (:func:`.collect.build_samples`): for window ``W``
  and tailor size ``k``, the last ``W`` snapshots at or before each check, their first ``k`` columns (the
  nested size-``k`` tailoring): exactly the windows the policy feeds its predictor.
* **Three-way split by run**, never by sample (the samples of one run are overlapping windows of the same
  weights): ``train`` fits the weights; ``val`` selects the epoch (highest ROC AUC, then lowest loss), the
  decision threshold (maximum balanced accuracy) and, in :func:`train_family`, the normalisation; ``test``
  runs are only ever passed to :func:`evaluate_predictor`.
* **Loss:** cross-entropy with class weights ``N / (2 N_c)`` from the *training* label frequencies.
  **Optimiser:** Adam. Each epoch draws ``samples_per_epoch`` training samples (seeded, without
  replacement; all when fewer), a CPU budget: the windows of consecutive checks overlap, so a subsample
  loses little.
* **Metrics**: ``accuracy``; ``precision``, ``recall`` and ``f1`` of the freeze class (0 when undefined);
  ``auc``: ROC AUC of p(freeze) (Mann-Whitney, tied ranks averaged; NaN with one class). **Timing**
  (:func:`freeze_timing`): per run and unit, the first check at which the predictor says "freeze" (the
  policy would freeze it then) against the first check the oracle labels 1, in epochs.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .collect import build_samples, gather_windows, merge_datasets
from .model import NORM_MODES, SmartFRZPredictor
from .weights import family_file, save_predictor

__all__ = ["Samples", "train_predictor", "evaluate_predictor", "train_family", "roc_auc", "binary_metrics",
           "balanced_threshold", "freeze_timing", "predict"]


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the positive class (``labels == 1``); NaN if only one class is present."""
    scores, labels = scores.double().reshape(-1), labels.reshape(-1).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(s)
    i, n = 0, len(s)
    while i < n:  # average ranks over ties (1-based)
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = torch.empty_like(ranks)
    r[order] = ranks
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_threshold(p_freeze: torch.Tensor, labels: torch.Tensor) -> float:
    """The decision threshold on ``p_freeze`` that maximises balanced accuracy on these labels (0.5 when the
    labels hold one class). Class-weighted training shifts probabilities, so argmax is not calibrated."""
    y = labels.bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    best_t, best_score = 0.5, -1.0
    for t in torch.unique(p_freeze.float()).tolist():
        pred = p_freeze >= t
        score = 0.5 * (int((pred & y).sum()) / n_pos + int((~pred & ~y).sum()) / n_neg)
        if score > best_score:
            best_t, best_score = t, score
    return float(max(0.0, best_t - 1e-7))  # predict "freeze" when p > threshold: just below the chosen score


def binary_metrics(p_freeze: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision/recall/F1 of class 1 (prediction: p_freeze > threshold) and ROC AUC."""
    pred = p_freeze > threshold
    y = labels.bool()
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    n = len(y)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((pred == y).sum()) / n if n else float("nan"), "precision": precision,
            "recall": recall, "f1": f1, "auc": roc_auc(p_freeze, labels)}


class Samples:
    """The samples of some collected runs at one window and tailor size (snapshots kept per run, fp32,
    cut to the first ``tailor_size`` columns; windows gathered per batch)."""

    def __init__(self, data: dict[str, Any], window: int, tailor_size: int):
        if tailor_size > int(data["tailor_size"]):
            raise ValueError(f"tailor_size {tailor_size} exceeds the collected {data['tailor_size']}")
        self.window, self.tailor_size = int(window), int(tailor_size)
        self.snapshots = [r["snapshots"][..., :tailor_size].contiguous() for r in data["runs"]]
        # metadata only: the full-width snapshots are not kept (memory)
        self.runs = [{k: v for k, v in r.items() if k != "snapshots"} for r in data["runs"]]
        parts = [build_samples(r, window) for r in data["runs"]]
        self.run = torch.cat([torch.full((len(p["end"]),), i, dtype=torch.long) for i, p in enumerate(parts)]) \
            if parts else torch.zeros(0, dtype=torch.long)
        for key in ("end", "row", "unit", "step", "check", "labels"):
            setattr(self, key, torch.cat([p[key] for p in parts]) if parts else torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def windows(self, idx: torch.Tensor) -> torch.Tensor:
        """Windows ``(len(idx), window, tailor_size)`` of samples ``idx`` (in that order)."""
        out = torch.empty(len(idx), self.window, self.tailor_size)
        for r in torch.unique(self.run[idx]).tolist():
            sel = (self.run[idx] == r).nonzero().squeeze(1)
            j = idx[sel]
            out[sel] = gather_windows(self.snapshots[r], self.end[j], self.row[j], self.window)
        return out


def _load(datasets: Sequence[str | os.PathLike | dict[str, Any]], window: int, tailor_size: int) -> Samples:
    return Samples(merge_datasets(list(datasets)), window, tailor_size)


def predict(model: nn.Module, samples: Samples, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """p(freeze) of every sample, in sample order."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(samples)))
            out.append(torch.softmax(model(samples.windows(idx).to(device)), dim=-1)[:, 1].cpu())
    return torch.cat(out) if out else torch.zeros(0)


def train_predictor(
    *,
    train: Sequence[str | os.PathLike | dict[str, Any]],
    val: Sequence[str | os.PathLike | dict[str, Any]],
    out: str | os.PathLike | None,
    window: int = 30,
    tailor_size: int = 1024,
    norm: str = "first_delta",
    epochs: int = 6,
    samples_per_epoch: int | None = 768,  # training samples drawn per epoch (None: all)
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    half: bool = True,  # store the weights in float16
    return_model: bool = False,
    log=None,
) -> dict[str, Any] | tuple[dict[str, Any], SmartFRZPredictor]:
    """Train on ``train``, select epoch and threshold on ``val``, save to ``out``; return validation figures."""
    if norm not in NORM_MODES:
        raise ValueError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORM_MODES)}")
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    tr, va = _load(train, window, tailor_size), _load(val, window, tailor_size)
    tr_ids, va_ids = [r["id"] for r in tr.runs], [r["id"] for r in va.runs]
    if set(tr_ids) & set(va_ids):
        raise ValueError(f"runs in both train and val: {sorted(set(tr_ids) & set(va_ids))}")
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"empty split at window {window}: {len(tr)} training and {len(va)} validation samples")
    counts = torch.bincount(tr.labels, minlength=2).double()
    weight = torch.where(counts > 0, counts.sum() / (2 * counts.clamp_min(1)), torch.zeros(2, dtype=torch.double))
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmartFRZPredictor(tailor_size=tailor_size, norm=norm).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_loss_fn = nn.CrossEntropyLoss(weight=weight.float().to(dev))
    best = None
    from freezebench.progress import track

    for epoch in track(range(1, epochs + 1), "training the predictor", unit="epoch"):  # a terminal: ETA
        model.train()
        perm = torch.randperm(len(tr), generator=gen)
        if samples_per_epoch:
            perm = perm[:samples_per_epoch]
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            loss = train_loss_fn(model(tr.windows(b).to(dev)), tr.labels[b].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        p = predict(model, va, device=device)
        logp = torch.log(torch.stack([1 - p, p], 1).clamp_min(1e-12))
        val_loss = float(nn.functional.nll_loss(logp, va.labels, weight=weight.float()))
        auc = roc_auc(p, va.labels)
        if log:
            log(f"  w{window} t{tailor_size} {norm} epoch {epoch}: val auc {auc:.4f} loss {val_loss:.4f}")
        key = (-auc if not math.isnan(auc) else 0.0, val_loss)
        if best is None or key < best[0]:
            best = (key, epoch, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, p, val_loss)
    _key, best_epoch, state, p, val_loss = best
    model.load_state_dict(state)
    model = model.cpu().eval()
    threshold = balanced_threshold(p, va.labels)
    metrics: dict[str, Any] = binary_metrics(p, va.labels, threshold)
    metrics.update({"threshold": threshold, "loss": val_loss, "best_epoch": best_epoch, "epochs": epochs,
                    "n_train": len(tr), "n_val": len(va), "train_freeze_frac": float(tr.labels.float().mean()),
                    "val_freeze_frac": float(va.labels.float().mean())})
    if out is not None:
        def runs_of(s: Samples) -> list[dict[str, Any]]:
            return [{k: r.get(k) for k in ("id", "model", "dataset", "seed", "reference_seed", "epochs", "overrides",
                                           "record_every", "label_rule")} for r in s.runs]

        provenance = {
            "train_runs": tr_ids, "val_runs": va_ids, "runs": runs_of(tr) + runs_of(va),
            "metrics": dict(metrics),
            "training": {"epochs": epochs, "samples_per_epoch": samples_per_epoch, "lr": lr, "batch_size": batch_size,
                         "seed": seed, "optimizer": "adam", "loss": "class-weighted cross-entropy",
                         "class_weights": [float(w) for w in weight],
                         "selection": "highest validation ROC AUC (then lowest loss); decision threshold maximising "
                                      "balanced accuracy on the validation runs"},
        }
        save_predictor(out, model, half=half, metadata={"window": int(window), "threshold": threshold,
                                                        "provenance": provenance})
    return (metrics, model) if return_model else metrics


def freeze_timing(samples: Samples, p_freeze: torch.Tensor, threshold: float) -> list[dict[str, Any]]:
    """Per run and unit: the first check at which the predictor says "freeze" against the first the oracle
    labels 1 (among the checks with a full window), and the difference in epochs (positive: the predictor
    freezes later). ``None`` where one side never freezes."""
    out = []
    for i, run in enumerate(samples.runs):
        spe = run["steps_per_epoch"]
        for r in range(len(run["units"])):
            m = ((samples.run == i) & (samples.row == r)).nonzero().squeeze(1)
            if not len(m):
                continue
            order = m[torch.argsort(samples.step[m])]
            steps = samples.step[order].tolist()
            pred = (p_freeze[order] > threshold).tolist()
            lab = samples.labels[order].tolist()
            ps = next((s for s, v in zip(steps, pred) if v), None)
            os_ = next((s for s, v in zip(steps, lab) if v), None)
            out.append({"run": run["id"], "unit": int(run["units"][r]), "predictor_epoch": None if ps is None else ps / spe,
                        "oracle_epoch": None if os_ is None else os_ / spe,
                        "delta_epochs": None if ps is None or os_ is None else (ps - os_) / spe})
    return out


def _timing_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    d = [r["delta_epochs"] for r in rows if r["delta_epochs"] is not None]
    return {
        "units": len(rows),
        "both_freeze": len(d),
        "only_predictor_freezes": sum(r["predictor_epoch"] is not None and r["oracle_epoch"] is None for r in rows),
        "only_oracle_freezes": sum(r["predictor_epoch"] is None and r["oracle_epoch"] is not None for r in rows),
        "neither_freezes": sum(r["predictor_epoch"] is None and r["oracle_epoch"] is None for r in rows),
        "median_delta_epochs": statistics.median(d) if d else None,
        "mean_delta_epochs": statistics.fmean(d) if d else None,
        "earlier": sum(x < 0 for x in d), "same": sum(x == 0 for x in d), "later": sum(x > 0 for x in d),
    }


def evaluate_predictor(weights: str | os.PathLike, datasets: Sequence[str | os.PathLike | dict[str, Any]], *,
                       device: str = "cpu", per_run: bool = True) -> dict[str, Any]:
    """Agreement of a trained predictor with the oracle labels of ``datasets`` at the predictor's own window
    and tailor size: ``auc``, ``accuracy``, ``precision``, ``recall``, ``f1`` (at its stored threshold),
    ``n``, ``freeze_frac``, the freeze timing summary and, with ``per_run``, the same per run."""
    from .weights import load_predictor

    model, meta = load_predictor(weights, device=device)
    data = merge_datasets(list(datasets))
    s = Samples(data, int(meta["window"]), int(meta["tailor_size"]))
    thr = float(meta.get("threshold", 0.5))
    p = predict(model, s, device=device)
    out: dict[str, Any] = binary_metrics(p, s.labels, thr)
    out.update({"n": len(s), "freeze_frac": float(s.labels.float().mean()) if len(s) else float("nan"),
                "threshold": thr, "window": int(meta["window"]), "tailor_size": int(meta["tailor_size"])})
    timing = freeze_timing(s, p, thr)
    out["timing"] = _timing_summary(timing)
    if per_run:
        runs = {}
        for i, run in enumerate(s.runs):
            m = s.run == i
            fig = binary_metrics(p[m], s.labels[m], thr)
            fig.update({"n": int(m.sum()), "freeze_frac": float(s.labels[m].float().mean()) if m.any() else float("nan"),
                        "model": run["model"], "overrides": run["overrides"], "record_every": run["record_every"]})
            fig["timing"] = _timing_summary([t for t in timing if t["run"] == run["id"]])
            runs[run["id"]] = fig
        out["runs"] = runs
    return out


def train_family(train: Sequence[Any], val: Sequence[Any], *, folder: str | os.PathLike | None = None,
                 norms: Sequence[str] = ("first_delta", "diff", "standardize"), norm: str | None = None,
                 members: Sequence[tuple[int, int]] | None = None, select_at: tuple[int, int] = (30, 1024),
                 select_epochs: int = 4, select_samples: int | None = 512, paths: Sequence[Any] | None = None,
                 log=print, **kw) -> dict[str, Any]:
    """Train the shipped family from one collection: the normalisation chosen on ``val`` (highest ROC AUC)
    at ``select_at`` = (window, tailor) among ``norms`` (unless ``norm`` is given; ``select_epochs`` epochs of
    ``select_samples`` samples each, a smaller budget than the members'), then every member of :data:`.weights.FAMILY`
    (or ``members``) with it, written to ``folder`` (default the package's weights folder)."""
    from .weights import FAMILY

    train_d, val_d = merge_datasets(list(train)), merge_datasets(list(val))
    report: dict[str, Any] = {"norm_selection": {}}
    if norm is None:
        for n in norms:
            sel = {**kw, "epochs": select_epochs, "samples_per_epoch": select_samples}
            m = train_predictor(train=[train_d], val=[val_d], out=None, window=select_at[0],
                                tailor_size=select_at[1], norm=n, log=log, **sel)
            report["norm_selection"][n] = {k: m[k] for k in ("auc", "f1", "accuracy", "best_epoch")}
            log(f"norm {n}: val auc {m['auc']:.4f} f1 {m['f1']:.4f}")
        norm = max(report["norm_selection"], key=lambda k: (report["norm_selection"][k]["auc"], k))
    report["norm"] = norm
    report["members"] = {}
    for i, (w, t) in enumerate(members or FAMILY):
        path = paths[i] if paths else family_file(w, t, folder)
        m = train_predictor(train=[train_d], val=[val_d], out=path, window=w, tailor_size=t, norm=norm, log=log, **kw)
        report["members"][f"w{w}_t{t}"] = {k: m[k] for k in ("auc", "f1", "accuracy", "threshold", "best_epoch",
                                                             "n_train", "n_val")}
        log(f"w{w} t{t}: val auc {m['auc']:.4f} f1 {m['f1']:.4f} -> {path}")
    return report
