"""Training SmartFRZ's predictor on datasets written by :func:`.collect.collect`.

    metrics = train_predictor(["data/r20_s0.pt", "data/r20_s1.pt"], out="predictor.pt", val_runs=["resnet20-digits-s1"])

* **Split by run**, never by sample: validation = the runs named in ``val_runs`` (default: the last run of
  the merged datasets), training = all the others. Samples of one run are strongly correlated (overlapping
  windows of the same weights), so a per-sample split would overstate validation scores.
* **Loss:** cross-entropy with class weights ``N / (2 N_c)`` from the *training* label frequencies (a class
  absent from training gets weight 0). **Optimiser:** Adam, ``lr``; minibatches of ``batch_size``
  windows, reshuffled every epoch (seeded).
* **Model selection:** after every epoch the predictor is scored on the validation runs; the epoch with the
  lowest (class-weighted) validation loss is kept and saved with :func:`.weights.save_predictor`.
* **Metrics** (on validation, of the kept model): ``accuracy``; ``precision``, ``recall`` and ``f1`` of the
  freeze class (0 when undefined); ``auc``: ROC AUC of p(freeze) (Mann-Whitney with tied ranks averaged;
  NaN when validation holds one class only); ``loss``, ``best_epoch``, sample counts, the freeze fraction.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .collect import merge_datasets
from .model import SmartFRZPredictor
from .weights import save_predictor

__all__ = ["train_predictor", "roc_auc", "binary_metrics"]


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
    cands = torch.unique(p_freeze.float())
    best_t, best_score = 0.5, -1.0
    for t in cands.tolist():
        pred = p_freeze >= t
        score = 0.5 * (int((pred & y).sum()) / n_pos + int((~pred & ~y).sum()) / n_neg)
        if score > best_score:
            best_t, best_score = t, score
    # predict "freeze" when p > threshold: step just below the chosen score
    return float(max(0.0, best_t - 1e-7))


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


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, batch_size: int,
              device: torch.device) -> tuple[float, torch.Tensor]:
    model.eval()
    logits = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits.append(model(x[i : i + batch_size].to(device).float()).cpu())
    model.train()
    logits_t = torch.cat(logits)
    return float(loss_fn(logits_t, y)), torch.softmax(logits_t, dim=-1)[:, 1]


def train_predictor(
    datasets: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    val_runs: list[str] | None = None,  # run ids held out for validation; None: the last run
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    norm: str = "standardize",  # input normalisation of the predictor (model.NORM_MODES)
    seed: int = 0,
    device: str = "cpu",
    return_model: bool = False,  # also return the trained (kept) model: (metrics, model)
) -> dict[str, Any] | tuple[dict[str, Any], SmartFRZPredictor]:
    """Train a predictor on ``datasets``, save the best epoch's model to ``out``, return validation metrics."""
    data = merge_datasets(list(datasets))
    ids = [r["id"] for r in data["runs"]]
    val_ids = list(val_runs) if val_runs else [ids[-1]]
    unknown = [v for v in val_ids if v not in ids]
    if unknown:
        raise ValueError(f"val_runs {unknown} are not runs of these datasets (runs: {ids})")
    train_ids = [i for i in ids if i not in val_ids]
    if not train_ids:
        raise ValueError(f"every run ({ids}) is a validation run: nothing left to train on")
    run_idx = data["run"]
    val_mask = torch.isin(run_idx, torch.tensor([ids.index(v) for v in val_ids]))
    x_tr, y_tr = data["windows"][~val_mask], data["labels"][~val_mask]
    x_va, y_va = data["windows"][val_mask], data["labels"][val_mask]
    if len(x_tr) == 0 or len(x_va) == 0:
        raise ValueError(f"empty split: {len(x_tr)} training and {len(x_va)} validation samples")

    counts = torch.bincount(y_tr, minlength=2).double()
    weight = torch.where(counts > 0, counts.sum() / (2 * counts.clamp_min(1)), torch.zeros(2, dtype=torch.double))
    dev = torch.device(device)
    loss_fn = nn.CrossEntropyLoss(weight=weight.float())
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmartFRZPredictor(tailor_size=int(data["tailor_size"]), norm=norm).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_loss_fn = nn.CrossEntropyLoss(weight=weight.float().to(dev))

    best: tuple[float, int, dict[str, torch.Tensor], torch.Tensor] | None = None
    from freezebench.progress import track

    for epoch in track(range(1, epochs + 1), "training the predictor", unit="epoch"):  # a terminal: ETA
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(perm), batch_size):
            b = perm[i : i + batch_size]
            loss = train_loss_fn(model(x_tr[b].to(dev).float()), y_tr[b].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_loss, p = _evaluate(model, x_va, y_va, loss_fn, batch_size, dev)
        # select by validation ROC AUC (ranking quality), ties and single-class validation by loss
        auc = roc_auc(p, y_va)
        key = (-auc if not math.isnan(auc) else 0.0, val_loss)
        if best is None or key < best[0]:
            best = (key, epoch, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, p, val_loss)
    if best is None:
        raise ValueError("epochs must be >= 1")
    _key, best_epoch, state, p, val_loss = best
    model.load_state_dict(state)
    model = model.cpu().eval()

    threshold = balanced_threshold(p, y_va)
    metrics: dict[str, Any] = binary_metrics(p, y_va, threshold)
    metrics["threshold"] = threshold
    metrics.update({"loss": val_loss, "best_epoch": best_epoch, "epochs": epochs, "n_train": len(y_tr),
                    "n_val": len(y_va), "train_freeze_frac": float(y_tr.float().mean()),
                    "val_freeze_frac": float(y_va.float().mean())})
    runs = {r["id"]: r for r in data["runs"]}
    provenance = {
        "datasets": [str(d) for d in datasets],
        "train_runs": train_ids,
        "val_runs": val_ids,
        "runs": [{k: runs[i].get(k) for k in ("id", "model", "dataset", "seed", "epochs", "overrides", "label_rule")}
                 for i in ids],
        "metrics": dict(metrics),
        "training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "optimizer": "adam",
                     "loss": "class-weighted cross-entropy", "class_weights": [float(w) for w in weight],
                     "selection": "highest validation ROC AUC (then lowest loss); decision threshold "
                                  "maximising balanced accuracy on the validation runs"},
    }
    save_predictor(out, model, metadata={"window": int(data["window"]), "threshold": threshold,
                                         "provenance": provenance})
    return (metrics, model) if return_model else metrics


def evaluate_predictor(weights: str | os.PathLike, datasets: Sequence[str | os.PathLike], *,
                       batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    """Agreement of a trained predictor with the CKA-oracle labels of ``datasets`` (e.g. held-out runs of
    an architecture the predictor never saw): accuracy, precision/recall/F1 of the freeze class, ROC AUC."""
    from .weights import load_predictor

    data = merge_datasets(list(datasets))
    model, meta = load_predictor(weights, tailor_size=int(data["tailor_size"]), window=int(data["window"]),
                                  device=device)
    x, y = data["windows"], data["labels"]
    probs = []
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            logits = model(x[i : i + batch_size].to(device=device, dtype=torch.float32))
            probs.append(torch.softmax(logits, dim=-1)[:, 1].cpu())
    p = torch.cat(probs) if probs else torch.zeros(0)
    out = binary_metrics(p, y, float(meta.get("threshold", 0.5)))
    out.update({"n": float(len(y)), "freeze_frac": float(y.float().mean()) if len(y) else float("nan")})
    return out
