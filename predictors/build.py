"""Regenerate the shipped SmartFRZ predictor family: ``freezebench predictor build --data DIR``.

Steps (each skips what ``DIR`` already holds, so an interrupted build resumes):

1. **Source model** for the fine-tuning runs: resnet20 trained on seeded synthetic 8x8 one-channel images
   (10 classes; nothing to download), written to ``DIR/source_resnet20.pt``; fine-tuning runs start from
   it on the digits (``model.checkpoint=...``).
2. **Corpus** (:data:`CORPUS`): one :func:`~.collect.collect` per entry (two seeds, each labelled against
   the other), at tailor 4096, two CKA checks per epoch, to ``DIR/<id>.pt``.
3. **Family** (:func:`~.train.train_family`): the predictors for window {20, 30, 40, 50} at tailor 1024
   and tailor {512, 1024, 2048, 4096} at window 30, all from that one corpus, written to
   ``predictors/weights/`` (or ``--weights-dir``).

Splits are by configuration (both seeds of an entry in the same split): ``train``; ``val`` (model
selection: normalisation, epoch, threshold); ``test`` (reported only, never used to choose anything).
The test split holds an architecture the predictor never sees in training (mobilenet_v2) and a setting
it never sees (fine-tuning with AdamW at a low learning rate and batch 128; a recording cadence of one
snapshot every 2 steps).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

__all__ = ["CORPUS", "SOURCE", "build_source", "collect_corpus", "corpus_paths", "split_ids"]

_D = ["data.name=digits", "schedule.name=cosine", "trainer.device=cpu"]
_SGD = ["optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=5.0e-4"]
_ADAMW = ["optim.name=adamw", "optim.weight_decay=0.01"]
SOURCE = "source_resnet20.pt"
_FT = "model.checkpoint={source}"

#: the corpus: id, split, config overrides, optional explicit record cadence (steps between snapshots)
CORPUS: list[dict[str, Any]] = [
    # in collection order (a cut-short build still has every split); "split" says where each run goes
    {"id": "r20-sgd-b32", "split": "train", "overrides": ["model.name=resnet20", *_SGD, "optim.lr=0.05",
                                                          "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "r32-adamw-b32", "split": "val", "overrides": ["model.name=resnet32", *_ADAMW, "optim.lr=1e-3",
                                                          "data.batch_size=32", "trainer.epochs=4"]},
    {"id": "mlp-sgd-b32", "split": "train", "overrides": ["model.name=mlp", *_SGD, "optim.lr=0.05",
                                                          "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "r20-ft-adamw-b128", "split": "test", "overrides": ["model.name=resnet20", _FT, *_ADAMW,
                                                               "optim.lr=1e-4", "data.batch_size=128",
                                                               "trainer.epochs=6"]},
    {"id": "mnv2-sgd-b32", "split": "test", "overrides": ["model.name=mobilenet_v2", *_SGD, "optim.lr=0.05",
                                                          "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "r20-adamw-b64", "split": "train", "overrides": ["model.name=resnet20", *_ADAMW, "optim.lr=1e-3",
                                                            "data.batch_size=64", "trainer.epochs=5"]},
    {"id": "vgg-sgd-b32", "split": "train", "overrides": ["model.name=vgg11_bn", *_SGD, "optim.lr=0.05",
                                                          "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "r20-ft-sgd-b32", "split": "train", "overrides": ["model.name=resnet20", _FT, *_SGD, "optim.lr=0.01",
                                                             "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "mlp-adamw-b16", "split": "train", "overrides": ["model.name=mlp", *_ADAMW, "optim.lr=1e-3",
                                                            "data.batch_size=16", "trainer.epochs=5"]},
    {"id": "vgg-sgd-b16", "split": "val", "overrides": ["model.name=vgg11_bn", *_SGD, "optim.lr=0.02",
                                                        "data.batch_size=16", "trainer.epochs=5"]},
    {"id": "r32-sgd-b64", "split": "train", "overrides": ["model.name=resnet32", *_SGD, "optim.lr=0.1",
                                                          "data.batch_size=64", "trainer.epochs=5"]},
    {"id": "r56-sgd-b32-every2", "split": "test", "record_every": 2,
     "overrides": ["model.name=resnet56", *_SGD, "optim.lr=0.02", "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "deit-adamw-b64", "split": "train", "overrides": ["model.name=deit_tiny", *_ADAMW, "optim.lr=5e-4",
                                                             "data.batch_size=64", "trainer.epochs=5"]},
    {"id": "vgg-adamw-b64", "split": "train", "overrides": ["model.name=vgg11_bn", *_ADAMW, "optim.lr=5e-4",
                                                            "data.batch_size=64", "trainer.epochs=5"]},
    {"id": "r56-sgd-b64", "split": "train", "overrides": ["model.name=resnet56", *_SGD, "optim.lr=0.05",
                                                          "data.batch_size=64", "trainer.epochs=5"]},
]


def split_ids(split: str) -> list[str]:
    """Corpus entry ids of one split."""
    return [e["id"] for e in CORPUS if e["split"] == split]


def corpus_paths(data_dir: str | os.PathLike, split: str | None = None) -> list[Path]:
    """The dataset files of the corpus (of one split) under ``data_dir``, those that exist."""
    d = Path(data_dir)
    return [d / f"{e['id']}.pt" for e in CORPUS if (split is None or e["split"] == split) and (d / f"{e['id']}.pt").is_file()]


def build_source(data_dir: str | os.PathLike) -> Path:
    """The fine-tuning source: resnet20 on seeded synthetic 1x8x8 images with 10 classes (4 epochs)."""
    from freezebench.config import load_config
    from freezebench.trainer import Trainer

    path = Path(data_dir) / SOURCE
    if path.is_file():
        return path
    cfg = load_config(["model.name=resnet20", "data.name=synthetic", "data.synthetic_channels=1",
                       "data.synthetic_size=8", "data.synthetic_classes=10", "data.synthetic_samples=2000",
                       *_SGD, "optim.lr=0.05", "data.batch_size=64", "schedule.name=cosine", "trainer.epochs=4",
                       "trainer.device=cpu", "policy=full", "tracking.enabled=false", "trainer.progress=false",
                       "trainer.save_checkpoint=false", "trainer.checkpoint_every=0"])
    trainer = Trainer(cfg)
    trainer.fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    return trainer.save_checkpoint(path)


def collect_corpus(data_dir: str | os.PathLike, *, only: list[str] | None = None, log=print) -> list[Path]:
    """Collect every corpus entry (or those in ``only``) not yet in ``data_dir``; returns all present files."""
    from .collect import collect

    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    source = build_source(d)
    for e in CORPUS:
        if only and e["id"] not in only:
            continue
        out = d / f"{e['id']}.pt"
        if out.is_file():
            continue
        t0 = time.time()
        ov = [o.format(source=source) for o in [*_D, *e["overrides"]]]
        collect(ov, out=out, seeds=(0, 1), record_every=e.get("record_every"), run_id=e["id"])
        log(f"collected {e['id']} ({e['split']}) in {time.time() - t0:.0f} s -> {out}")
    return corpus_paths(d)


if __name__ == "__main__":  # python -m freezebench.predictors.build DIR: collect the corpus only
    import sys

    collect_corpus(sys.argv[1], only=sys.argv[2:] or None, log=lambda m: print(m, flush=True))
