"""SmartFRZ predictor pipeline v2: exact fp32 collection, the shared oracle rule, nested tailoring, training
on a three-way split, evaluation, family selection."""

from __future__ import annotations

import json
import math

import pytest
import torch

from freezebench.analysis.oracle import check_steps, oracle_labels, window_checks
from freezebench.predictors.collect import (
    COLLECT_TAILOR,
    build_samples,
    collect,
    gather_windows,
    load_dataset,
    merge_datasets,
)
from freezebench.predictors.train import evaluate_predictor, roc_auc, train_predictor
from freezebench.predictors.weights import load_predictor
from helpers import THREADS

# a permissive rule (any variance, any CKA) so the tiny runs hold both labels: ready once the window fills
RULE = dict(window_epochs=1.0, var_threshold=1.0, cutoff=-1.0)


def _tiny(extra=()):
    from conftest import TINY

    return [*TINY, *extra]


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    torch.set_num_threads(THREADS)
    d = tmp_path_factory.mktemp("collect")
    a = collect(_tiny(), out=d / "a.pt", seeds=(0, 1), tailor_size=256, record_every=1, checks_per_epoch=2,
                run_id="tiny-a", **RULE)
    b = collect(_tiny(["optim.lr=0.05"]), out=d / "b.pt", seeds=(2, 3), tailor_size=256, record_every=1,
                checks_per_epoch=2, run_id="tiny-b", **RULE)
    return a, b


# --------------------------------------------------------------------------------------------------------
# the shared oracle rule, in epochs
# --------------------------------------------------------------------------------------------------------


def test_window_is_in_epochs():
    assert window_checks(2, 1) == 3  # the Table 1 baseline's 3 checks at one check per epoch
    assert window_checks(2, 2) == 5 and window_checks(2, 4) == 9  # the same 2-epoch span at other rates
    assert window_checks(0.25, 4) == 2
    with pytest.raises(ValueError, match="spans no check interval"):
        window_checks(0.1, 2)


def test_oracle_labels_on_crafted_histories():
    rule = dict(var_threshold=1e-4, cutoff=0.3)
    # one check per epoch, 2-epoch window = 3 checks
    assert oracle_labels([0.1, 0.5, 0.9, 0.95, 0.95, 0.95, 0.95], checks_per_epoch=1, **rule) == [0, 0, 0, 0, 0, 1, 1]
    # two checks per epoch: the same 2 epochs need 5 stable checks, not 3
    h = [0.1, 0.5, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]
    assert oracle_labels(h, checks_per_epoch=2, **rule) == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    # stable but not above the cutoff: never; once ready, later checks stay 1
    assert oracle_labels([0.3, 0.3, 0.3, 0.3], checks_per_epoch=1, **rule) == [0, 0, 0, 0]
    assert oracle_labels([0.9, 0.9, 0.9, 0.5, 0.1], checks_per_epoch=1, **rule) == [0, 0, 1, 1, 1]
    # a NaN never freezes; an empty history has no labels
    assert oracle_labels([0.9, math.nan, 0.9, 0.9, 0.9], checks_per_epoch=1, **rule) == [0, 0, 0, 0, 1]
    assert oracle_labels([], checks_per_epoch=1, **rule) == []


def test_the_baseline_and_collection_share_one_rule():
    import freezebench.baselines.cka_oracle as base
    import freezebench.predictors.collect as col
    from freezebench.analysis import oracle

    assert base.cka_ready is oracle.cka_ready and base.check_steps is oracle.check_steps
    assert col.oracle_labels is oracle.oracle_labels and col.oracle_cka is oracle.oracle_cka
    assert base.oracle_cka is oracle.oracle_cka and oracle.DEBIASED is True
    # the baseline's decision sequence on a history equals the collection's labels
    hist = [0.2, 0.6, 0.8, 0.81, 0.81, 0.81, 0.81, 0.5]
    k = window_checks(oracle.WINDOW_EPOCHS, 2)
    first = next(t for t in range(len(hist)) if base.oracle_decision({0: hist[: t + 1]}, k, 1e-4, 0.3) == [0])
    labels = oracle_labels(hist, checks_per_epoch=2)
    assert labels.index(1) == first and all(labels[first:])


# --------------------------------------------------------------------------------------------------------
# collection
# --------------------------------------------------------------------------------------------------------


def test_collect_stores_exact_fp32_against_another_seed(collected):
    data = load_dataset(collected[0])
    assert data["format_version"] == 2 and data["tailor_size"] == 256
    a, b = data["runs"]
    assert (a["id"], b["id"]) == ("tiny-a-s0", "tiny-a-s1")
    assert (a["seed"], a["reference_seed"], b["seed"], b["reference_seed"]) == (0, 1, 1, 0)
    assert a["init_hash"] != b["init_hash"]  # another seed: another start
    for r in (a, b):
        assert r["snapshots"].dtype == torch.float32
        assert r["snapshots"].shape == (12, len(r["units"]), 256)  # 3 epochs x 4 steps, one record per step
        assert r["snapshot_steps"].tolist() == list(range(1, 13))
        assert r["check_steps"] == check_steps(4, 3, 2) == [2, 4, 6, 8, 10, 12]
        assert len(r["cka"]) == len(r["units"]) and all(len(h) == 6 for h in r["cka"])
        # the reference is another run: its last CKA is not 1 by construction
        assert all(h[-1] < 0.999 for h in r["cka"])
        assert r["labels"] == [oracle_labels(h, checks_per_epoch=2, **RULE) for h in r["cka"]]
        assert r["label_rule"]["window_epochs"] == 1.0 and r["label_rule"]["estimator"] == "debiased linear CKA"
        # the recorded weights move between records (fp32 deltas are kept, not rounded to 0)
        assert (r["snapshots"][1:] != r["snapshots"][:-1]).float().mean() > 0.9


def test_build_samples_windows_end_at_the_check():
    run = {"snapshots": torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3),
           "snapshot_steps": torch.tensor([2, 4, 6, 8, 10]), "check_steps": [3, 5, 10], "units": [4, 7],
           "labels": [[0, 1, 1], [0, 0, 1]]}
    s = build_samples(run, window=2)
    # check 3 has one snapshot (< window): no sample; check 5 -> records at 2, 4; check 10 -> 8, 10
    assert s["step"].tolist() == [5, 5, 10, 10]
    assert s["unit"].tolist() == [4, 7, 4, 7]
    assert s["labels"].tolist() == [1, 0, 1, 1]
    w = gather_windows(run["snapshots"], s["end"], s["row"], 2)
    assert torch.equal(w[1], run["snapshots"][0:2, 1]) and torch.equal(w[2], run["snapshots"][3:5, 0])
    assert torch.equal(gather_windows(run["snapshots"], s["end"], s["row"], 2, tailor_size=2), w[..., :2])


def test_merge_datasets_and_errors(collected):
    m = merge_datasets(list(collected))
    assert [r["id"] for r in m["runs"]] == ["tiny-a-s0", "tiny-a-s1", "tiny-b-s2", "tiny-b-s3"]
    with pytest.raises(ValueError, match="more than one dataset"):
        merge_datasets([collected[0], collected[0]])
    with pytest.raises(ValueError, match="seeds must differ"):
        collect(_tiny(), out="unused.pt", seeds=(1, 1))


@pytest.mark.slow
def test_replay_feeds_the_predictor_exactly_the_stored_windows(collected, tmp_path):
    """Train the recorded configuration again under the real ``smartfrz`` policy (a predictor that never
    freezes, recording what it is fed) at window 3 and tailor 64: every window equals the stored snapshots'
    window at that check, cut to the first 64 columns (nested tailoring), bit for bit."""
    from freezebench.config import load_config
    from freezebench.predictors.model import SmartFRZPredictor
    from freezebench.predictors.policy import SmartFRZ
    from freezebench.predictors.weights import save_predictor
    from freezebench.trainer import Trainer

    model = SmartFRZPredictor(tailor_size=64)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        model.mlp_z[-1].bias.copy_(torch.tensor([10.0, -10.0]))  # never freeze
    wpath = save_predictor(tmp_path / "never.pt", model, metadata={"window": 3})
    run = load_dataset(collected[0])["runs"][0]
    cfg = load_config([*run["overrides"], "trainer.seed=0", "policy=smartfrz", f"policy.weights={wpath}",
                       "policy.window=3", "policy.tailor_size=64", "policy.record_every=1", "policy.stage_every=2",
                       "tracking.enabled=false", "trainer.save_checkpoint=false", "trainer.checkpoint_every=0",
                       "model.granularity=layer"])
    fed: list[tuple[int, torch.Tensor]] = []
    trainer = Trainer(cfg)
    assert isinstance(trainer.policy, SmartFRZ)
    orig = SmartFRZ.decide

    def spy(self, step):
        ready = self.history.ready_units()
        if ready:
            fed.append((step, self.history.windows(ready).clone()))
        return orig(self, step)

    SmartFRZ.decide = spy
    try:
        trainer.fit()
    finally:
        SmartFRZ.decide = orig
    s = build_samples(run, window=3)
    assert [t for t, _ in fed] == sorted(set(s["step"].tolist()))
    for t, windows in fed:
        m = s["step"] == t
        stored = gather_windows(run["snapshots"], s["end"][m], s["row"][m], 3, tailor_size=64)
        assert torch.equal(windows, stored), f"step {t}"


# --------------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------------


def test_roc_auc():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)
    assert math.isnan(roc_auc(torch.tensor([0.2, 0.3]), torch.tensor([1, 1])))


def test_train_and_evaluate(collected, tmp_path):
    out = tmp_path / "p.pt"
    m = train_predictor(train=[collected[0]], val=[collected[1]], out=out, window=3, tailor_size=64, epochs=2,
                        samples_per_epoch=None, batch_size=8)
    model, meta = load_predictor(out, window=3, tailor_size=64)
    assert meta["storage_dtype"] == "float16" and meta["norm"] == "first_delta"
    assert meta["provenance"]["train_runs"] == ["tiny-a-s0", "tiny-a-s1"]
    assert meta["provenance"]["val_runs"] == ["tiny-b-s2", "tiny-b-s3"]
    assert m["threshold"] == meta["threshold"] and m["n_val"] > 0
    ev = evaluate_predictor(out, [collected[1]])
    assert ev["n"] == m["n_val"] and ev["auc"] == pytest.approx(m["auc"], abs=1e-3)
    assert set(ev["runs"]) == {"tiny-b-s2", "tiny-b-s3"} and ev["timing"]["units"] == 2 * len(
        load_dataset(collected[1])["runs"][0]["units"])
    with pytest.raises(ValueError, match="in both train and val"):
        train_predictor(train=[collected[0]], val=[collected[0]], out=None, window=3, tailor_size=64)
    with pytest.raises(ValueError, match="exceeds the collected"):
        train_predictor(train=[collected[0]], val=[collected[1]], out=None, window=3, tailor_size=512)


def test_evaluate_cli_json(collected, tmp_path, capsys):
    from freezebench.cli import main

    out = tmp_path / "p.pt"
    train_predictor(train=[collected[0]], val=[collected[1]], out=out, window=3, tailor_size=64, epochs=1,
                    samples_per_epoch=None, batch_size=8)
    assert main(["predictor", "evaluate", str(collected[1]), "--weights", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert {"auc", "accuracy", "precision", "recall", "f1"} <= set(obj)
    assert main(["predictor", "evaluate", str(tmp_path / "missing.pt"), "--weights", str(out)]) == 2
    assert "error" in capsys.readouterr().err


def test_balanced_threshold_is_chosen_on_validation():
    from freezebench.predictors.train import balanced_threshold

    p = torch.tensor([0.1, 0.2, 0.6, 0.7])
    y = torch.tensor([0, 0, 1, 1])
    t = balanced_threshold(p, y)
    assert ((p > t) == y.bool()).all()
    assert balanced_threshold(p, torch.ones(4, dtype=torch.long)) == 0.5


def test_collect_tailor_is_the_family_maximum():
    from freezebench.predictors.weights import FAMILY

    assert COLLECT_TAILOR == max(t for _, t in FAMILY) == 4096


def test_train_family_writes_every_member(collected, tmp_path):
    from freezebench.predictors.train import train_family
    from freezebench.predictors.weights import family_file

    rep = train_family([collected[0]], [collected[1]], folder=tmp_path, norms=("first_delta", "diff"),
                       members=[(3, 64), (2, 32)], select_at=(3, 64), select_epochs=1, select_samples=None,
                       epochs=1, samples_per_epoch=None,
                       batch_size=8, log=lambda s: None)
    assert set(rep["norm_selection"]) == {"first_delta", "diff"} and rep["norm"] in rep["norm_selection"]
    best = max(rep["norm_selection"].values(), key=lambda m: m["auc"])["auc"]
    assert rep["norm_selection"][rep["norm"]]["auc"] == best
    for w, t in ((3, 64), (2, 32)):
        _, meta = load_predictor(family_file(w, t, tmp_path), window=w, tailor_size=t)
        assert meta["norm"] == rep["norm"]
