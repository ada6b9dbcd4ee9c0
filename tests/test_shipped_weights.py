"""The shipped SmartFRZ predictor family: loadable safely, the documented sizes, one collection, the default policy."""

from __future__ import annotations

import pytest
import torch

from freezebench.config import load_config
from freezebench.predictors.build import split_ids
from freezebench.predictors.model import QUERY_MODES, predictor_params
from freezebench.predictors.weights import DEFAULT_WEIGHTS, FAMILY, family_file, load_predictor
from freezebench.trainer import Trainer


@pytest.mark.parametrize("window, tailor", FAMILY)
def test_every_family_member_loads_with_weights_only(window, tailor):
    path = family_file(window, tailor)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["meta"]["window"] == window and raw["meta"]["tailor_size"] == tailor
    model, meta = load_predictor(path, tailor_size=tailor, window=window)
    assert model.num_params == predictor_params(tailor)
    assert meta["norm"] in QUERY_MODES and meta["storage_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values())
    prov = meta["provenance"]
    assert prov["train_runs"] and prov["val_runs"] and not set(prov["train_runs"]) & set(prov["val_runs"])
    # no test run (reported only) was used to train or select the predictor
    used = {r.rsplit("-s", 1)[0] for r in prov["train_runs"] + prov["val_runs"]}
    assert not used & set(split_ids("test"))
    assert 0.0 <= meta["threshold"] <= 1.0
    out = model(torch.randn(4, window, tailor))
    assert out.shape == (4, 2) and torch.isfinite(out).all()


def test_the_family_comes_from_one_collection():
    metas = [load_predictor(family_file(w, t))[1] for w, t in FAMILY]
    assert len({m["norm"] for m in metas}) == 1
    assert len({tuple(m["provenance"]["train_runs"]) for m in metas}) == 1
    assert len({tuple(m["provenance"]["val_runs"]) for m in metas}) == 1
    assert DEFAULT_WEIGHTS == family_file(30, 1024)


def test_installed_size_is_small():
    total = sum(family_file(w, t).stat().st_size for w, t in FAMILY)
    assert total < 24 * 2**20  # fp16: about 2 MB per tailor-1024 member, 7 MB at 4096


def test_smartfrz_runs_with_the_shipped_weights(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = Trainer(load_config(["policy=smartfrz", *tiny_overrides, "tracking.enabled=false"])).fit()
    assert torch.isfinite(torch.tensor(res.metrics["train/loss"]))
