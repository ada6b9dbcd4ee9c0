"""The shipped SmartFRZ predictor weights: loadable safely, the documented sizes, and the default policy."""

from __future__ import annotations

import torch

from freezebench.config import load_config
from freezebench.predictors.weights import DEFAULT_WEIGHTS, load_predictor
from freezebench.trainer import Trainer


def test_shipped_weights_load_with_weights_only():
    raw = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    assert raw["meta"]["window"] == 30 and raw["meta"]["tailor_size"] == 1024
    model, meta = load_predictor(DEFAULT_WEIGHTS, tailor_size=1024, window=30)
    assert sum(p.numel() for p in model.parameters()) == 1_037_122
    prov = meta["provenance"]
    assert len({r["model"] for r in prov["runs"]}) >= 3  # trained on at least three zoo architectures
    out = model(torch.randn(4, 30, 1024))
    assert out.shape == (4, 2) and torch.isfinite(out).all()


def test_smartfrz_runs_with_the_shipped_weights(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = Trainer(load_config(["policy=smartfrz", *tiny_overrides, "tracking.enabled=false"])).fit()
    assert torch.isfinite(torch.tensor(res.metrics["train/loss"]))
