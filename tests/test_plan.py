"""`freezebench suite NAME --plan`: the paper's full-training TFLOPs from the cost model, no data, no training."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from freezebench.cli import main

# SmartFRZ (Li et al., ICLR 2023) Table 2, full training: 10 epochs over CIFAR's 50,000 training images
PAPER = {"resnet50": 12360.0, "vgg11_bn": 22950.0, "mobilenet_v2": 960.0}


def _plan(capsys, *args):
    assert main(["suite", *args, "--plan", "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


@pytest.mark.slow
def test_table2_plan_is_within_ten_percent_of_the_paper(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no CIFAR files anywhere near: the plan needs none
    rows = _plan(capsys, "table2", f"data.root={tmp_path / 'nothing'}")
    assert [(r["model"], r["dataset"]) for r in rows] == [
        (m, d) for m in ("resnet50", "vgg11_bn", "mobilenet_v2") for d in ("cifar10", "cifar100")]
    for r in rows:
        assert float(r["paper_tflops_full"]) == PAPER[r["model"]]
        assert r["runs"] == "12" and r["epochs"] == "10" and r["image_size"] == "224" and r["train_samples"] == "50000"
        assert abs(float(r["tflops_full"]) / float(r["paper_tflops_full"]) - 1) < 0.10, r
        assert float(r["ratio"]) == pytest.approx(float(r["tflops_full"]) / float(r["paper_tflops_full"]))
    assert not any(tmp_path.iterdir())  # nothing written


def test_plan_flops_are_what_autograd_executes(capsys):
    """ResNet-18 at 112 px: the plan's per-sample FLOPs of a full step equal a real training step's forward +
    backward counted by FlopCounterMode (0.1 %), and the TFLOPs are epochs x samples x that. (A ResNet: the
    counter's backward formula for grouped convolutions, MobileNet's depthwise ones, ignores the groups.)"""
    from freezebench.config import load_config
    from freezebench.sweeps.plan import plan_row
    from freezebench.zoo.models import build_model

    cfg = load_config(["model.name=resnet18", "data.name=cifar100", "data.image_size=112", "trainer.epochs=10"])
    row = plan_row(cfg, runs=1, paper=None)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=100, in_channels=3, image_size=112).train()
    x = torch.randn(2, 3, 112, 112)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    assert row.gflops_per_sample * 1e9 == pytest.approx(fc.get_total_flops() / 2, rel=1e-3)
    assert row.tflops_full == pytest.approx(10 * 50_000 * row.gflops_per_sample / 1e3, rel=1e-12)
    # at CIFAR's native 32 px (the old suites) MobileNetV2 plans far less than the paper's 960 TFLOPs
    small = plan_row(load_config(["model.name=mobilenet_v2", "data.name=cifar100", "trainer.epochs=10"]), 1, 960.0)
    assert small.image_size == 32 and small.ratio < 0.2


@pytest.mark.slow
def test_deit_tiny_at_224_over_100_epochs_is_the_papers_figure():
    from freezebench.config import load_config
    from freezebench.sweeps.plan import plan_row

    cfg = load_config(["model.name=deit_tiny", "data.name=cifar100", "data.image_size=224", "trainer.epochs=100"])
    row = plan_row(cfg, runs=1, paper=32400.0)  # Table 2: DeiT-T, 100 epochs
    assert abs(row.ratio - 1) < 0.10 and row.image_size == 224 and row.train_samples == 50_000


def test_table2_digits_plan_and_bad_suite(capsys):
    from freezebench.config import load_config
    from freezebench.zoo.data import build_data

    rows = _plan(capsys, "table2_digits")
    target = build_data(load_config(["data.classes=[5,6,7,8,9]"]).data, seed=0, device="cpu")
    assert len(rows) == 1 and rows[0]["model"] == "resnet20" and rows[0]["dataset"] == "digits"
    assert rows[0]["runs"] == "20"  # 6 policies x 3 seeds, the source model and the oracle's reference
    assert int(rows[0]["train_samples"]) == target.info.num_train and rows[0]["paper_tflops_full"] == ""
    assert main(["suite", "no_such_suite", "--plan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown suite 'no_such_suite'" in err
