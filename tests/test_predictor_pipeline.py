"""SmartFRZ predictor pipeline: collecting oracle-labelled windows and training the predictor on them."""

from __future__ import annotations

import math

import pytest
import torch

from freezebench.predictors.collect import build_samples, collect, load_dataset, merge_datasets, oracle_labels
from freezebench.predictors.train import roc_auc, train_predictor
from freezebench.predictors.weights import load_predictor

# labels of both classes on the tiny run: var_threshold=1 and cutoff=0 freeze at the 2nd check
SMALL = dict(window=2, tailor_size=64, record_every=1, checks_per_epoch=2, oracle_window=2, var_threshold=1.0,
             cutoff=0.0)


def _tiny(seed):
    from conftest import TINY

    return [*TINY, f"trainer.seed={seed}"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("collect")
    return [collect(_tiny(s), out=d / f"run{s}.pt", keep_snapshots=True, **SMALL) for s in (0, 1)]


# --------------------------------------------------------------------------------------------------------
# labelling
# --------------------------------------------------------------------------------------------------------


def test_oracle_labels_on_crafted_histories():
    # window 3, var < 1e-4, cutoff 0.3
    assert oracle_labels([0.1, 0.5, 0.9, 0.95, 0.95, 0.95, 0.95], 3, 1e-4, 0.3) == [0, 0, 0, 0, 0, 1, 1]
    # stable but below the cutoff: never
    assert oracle_labels([0.2, 0.2, 0.2, 0.2], 3, 1e-4, 0.3) == [0, 0, 0, 0]
    # once ready, later checks stay 1 even if the CKA moves again
    assert oracle_labels([0.9, 0.9, 0.9, 0.5, 0.1], 3, 1e-4, 0.3) == [0, 0, 1, 1, 1]
    # shorter than the window: never; a NaN never freezes
    assert oracle_labels([0.9, 0.9], 3, 1e-4, 0.3) == [0, 0]
    assert oracle_labels([0.9, float("nan"), 0.9, 0.9, 0.9], 3, 1e-4, 0.3) == [0, 0, 0, 0, 1]
    assert oracle_labels([], 3, 1e-4, 0.3) == []


def test_build_samples_windows_end_at_the_check():
    snaps = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)  # 5 records, 2 units, tailor 3
    s = build_samples(snaps, [2, 4, 6, 8, 10], [3, 5, 10], [[0, 1, 1], [0, 0, 1]], window=2)
    # check 3 has one snapshot (< window): no sample; check 5 -> records at 2, 4; check 10 -> 8, 10
    assert s["step"].tolist() == [5, 5, 10, 10]
    assert s["unit"].tolist() == [0, 1, 0, 1]
    assert s["labels"].tolist() == [1, 0, 1, 1]
    assert torch.equal(s["windows"][1], snaps[0:2, 1].half())
    assert torch.equal(s["windows"][2], snaps[3:5, 0].half())


# --------------------------------------------------------------------------------------------------------
# collect
# --------------------------------------------------------------------------------------------------------


def test_collect_dataset(datasets):
    d = load_dataset(datasets[0])
    run = d["runs"][0]
    n = len(d["labels"])
    assert d["windows"].shape == (n, 2, 64) and d["windows"].dtype == torch.float16
    assert d["labels"].dtype == torch.int64 and d["unit"].shape == d["step"].shape == d["run"].shape == (n,)
    assert set(d["labels"].tolist()) == {0, 1}
    assert run["id"] == "tiny-synthetic-s0" and run["seed"] == 0 and run["epochs"] == 3
    # the reference and the recording run start from identical weights
    assert run["init_hash"] == run["reference_init_hash"]
    # windows are the recorded snapshots: the last `window` recorded at or before the sample's step
    snaps, steps = d["snapshots"], d["snapshot_steps"].tolist()
    rows = {u: r for r, u in enumerate(run["units"])}
    for i in range(n):
        k = sum(1 for s in steps if s <= int(d["step"][i]))
        assert torch.equal(d["windows"][i], snaps[k - 2 : k, rows[int(d["unit"][i])]].half())
    # labels follow the oracle rule on the stored CKA histories and are monotone per unit
    assert run["check_steps"] == [2, 4, 6, 8, 10, 12]
    for r, u in enumerate(run["units"]):
        assert run["labels"][r] == oracle_labels(run["cka"][r], 2, 1.0, 0.0)
        lab = d["labels"][d["unit"] == u][torch.argsort(d["step"][d["unit"] == u])].tolist()
        assert lab == sorted(lab)
        assert all(0.0 <= c <= 1.0 + 1e-9 for c in run["cka"][r])


def test_merge_datasets(datasets):
    m = merge_datasets(datasets)
    a, b = (load_dataset(p) for p in datasets)
    assert [r["id"] for r in m["runs"]] == ["tiny-synthetic-s0", "tiny-synthetic-s1"]
    assert len(m["labels"]) == len(a["labels"]) + len(b["labels"])
    assert m["run"].tolist() == [0] * len(a["labels"]) + [1] * len(b["labels"])
    with pytest.raises(ValueError, match="more than one dataset"):
        merge_datasets([datasets[0], datasets[0]])


# --------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------


def test_roc_auc():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_train_predictor_splits_by_run_and_saves(datasets, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "pred.pt"
    metrics, model = train_predictor(datasets, out=out, epochs=2, batch_size=8, return_model=True)
    for k in ("accuracy", "precision", "recall", "f1"):
        assert 0.0 <= metrics[k] <= 1.0
    assert math.isnan(metrics["auc"]) or 0.0 <= metrics["auc"] <= 1.0
    assert metrics["n_train"] > 0 and metrics["n_val"] > 0
    loaded, meta = load_predictor(out, tailor_size=64, window=2)
    prov = meta["provenance"]
    assert prov["val_runs"] == ["tiny-synthetic-s1"] and prov["train_runs"] == ["tiny-synthetic-s0"]
    assert not set(prov["train_runs"]) & set(prov["val_runs"])
    assert prov["metrics"]["n_val"] == metrics["n_val"]
    x = load_dataset(datasets[1])["windows"].float()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # explicit validation run; unknown or all-validation splits are errors
    m2 = train_predictor(datasets, out=tmp_path / "p2.pt", val_runs=["tiny-synthetic-s0"], epochs=1)
    assert m2["n_train"] == metrics["n_val"] and m2["n_val"] == metrics["n_train"]
    with pytest.raises(ValueError, match="not runs"):
        train_predictor(datasets, out=tmp_path / "p3.pt", val_runs=["nope"], epochs=1)
    with pytest.raises(ValueError, match="nothing left"):
        train_predictor(datasets, out=tmp_path / "p3.pt", val_runs=["tiny-synthetic-s0", "tiny-synthetic-s1"])


def test_balanced_threshold_is_chosen_on_validation():
    import pytest as _pytest
    import torch as _torch

    from freezebench.predictors.train import balanced_threshold, binary_metrics

    p = _torch.tensor([0.90, 0.95, 0.97, 0.99])  # argmax would call every sample "freeze"
    y = _torch.tensor([0, 0, 1, 1])
    t = balanced_threshold(p, y)
    assert t == _pytest.approx(0.97, abs=1e-6) and t < 0.97
    m = binary_metrics(p, y, t)
    assert m["accuracy"] == 1.0 and m["f1"] == 1.0
    assert binary_metrics(p, y)["precision"] == 0.5  # the uncalibrated 0.5 threshold
    assert balanced_threshold(p, _torch.ones(4, dtype=_torch.long)) == 0.5
