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

__all__ = ["CORPORA", "CORPUS", "SOURCE", "TEXT_CORPUS", "build_source", "collect_corpus", "corpus_paths", "split_ids"]

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


_TX = ["data.name=text_demo", "data.text_samples=1600", "schedule.name=linear", "schedule.warmup_fraction=0.1",
       "trainer.device=cpu"]
_TADAMW = ["optim.name=adamw", "optim.weight_decay=0.01"]

#: the text corpus (``--corpus text``): BERTs on the embedded ``text_demo`` task with the BERT fine-tuning
#: recipe (AdamW, linear warm-up over 10 % of the steps and linear decay), at layer granularity (as the
#: ``smartfrz`` policy), two seeds per entry. The test split holds an architecture never trained on
#: (bert_small) and a bert_tiny setting never trained on (lr 3e-3 at batch 128: 10 steps and snapshots per
#: epoch, on sequences of another seed, ``data.split_seed=3``).
TEXT_CORPUS: list[dict[str, Any]] = [
    {"id": "tiny-lr1e-3-b32", "split": "train", "overrides": ["model.name=bert_tiny", *_TADAMW, "optim.lr=1e-3",
                                                              "data.batch_size=32", "trainer.epochs=6"]},
    {"id": "mini-lr5e-4-b32", "split": "val", "overrides": ["model.name=bert_mini", *_TADAMW, "optim.lr=5e-4",
                                                            "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "tiny-lr3e-3-b128-split3", "split": "test", "overrides": ["model.name=bert_tiny", *_TADAMW,
                                                                     "optim.lr=3e-3", "data.batch_size=128",
                                                                     "data.split_seed=3", "trainer.epochs=10"]},
    {"id": "small-lr5e-4-b32", "split": "test", "overrides": ["model.name=bert_small", *_TADAMW, "optim.lr=5e-4",
                                                              "data.batch_size=32", "trainer.epochs=5"]},
    {"id": "tiny-lr5e-4-b16", "split": "train", "overrides": ["model.name=bert_tiny", *_TADAMW, "optim.lr=5e-4",
                                                              "data.batch_size=16", "trainer.epochs=5"]},
    {"id": "mini-lr1e-3-b64", "split": "train", "overrides": ["model.name=bert_mini", *_TADAMW, "optim.lr=1e-3",
                                                              "data.batch_size=64", "trainer.epochs=6"]},
    {"id": "tiny-lr2e-3-b32-len16", "split": "train", "overrides": ["model.name=bert_tiny", *_TADAMW,
                                                                    "optim.lr=2e-3", "data.batch_size=32",
                                                                    "data.max_length=16", "trainer.epochs=6"]},
    {"id": "tiny-lr1e-3-b16-split1", "split": "val", "overrides": ["model.name=bert_tiny", *_TADAMW,
                                                                   "optim.lr=1e-3", "data.batch_size=16",
                                                                   "data.split_seed=1", "trainer.epochs=5"]},
    {"id": "mini-lr2e-4-b16", "split": "train", "overrides": ["model.name=bert_mini", *_TADAMW, "optim.lr=2e-4",
                                                              "data.batch_size=16", "trainer.epochs=5"]},
    {"id": "tiny-lr1e-3-b64-split2", "split": "train", "overrides": ["model.name=bert_tiny", *_TADAMW,
                                                                     "optim.lr=1e-3", "data.batch_size=64",
                                                                     "data.split_seed=2", "trainer.epochs=8"]},
]

#: the corpora of ``freezebench predictor build --corpus NAME``: entries and their shared overrides
CORPORA: dict[str, dict[str, Any]] = {"image": {"entries": CORPUS, "base": _D},
                                      "text": {"entries": TEXT_CORPUS, "base": _TX}}


def _entries(corpus: str) -> list[dict[str, Any]]:
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    return CORPORA[corpus]["entries"]


def split_ids(split: str, corpus: str = "image") -> list[str]:
    """Corpus entry ids of one split."""
    return [e["id"] for e in _entries(corpus) if e["split"] == split]


def corpus_paths(data_dir: str | os.PathLike, split: str | None = None, corpus: str = "image") -> list[Path]:
    """The dataset files of the corpus (of one split) under ``data_dir``, those that exist."""
    d = Path(data_dir)
    return [d / f"{e['id']}.pt" for e in _entries(corpus)
            if (split is None or e["split"] == split) and (d / f"{e['id']}.pt").is_file()]


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


def collect_corpus(data_dir: str | os.PathLike, *, only: list[str] | None = None, corpus: str = "image",
                   log=print) -> list[Path]:
    """Collect every entry of ``corpus`` (or those in ``only``) not yet in ``data_dir``; returns all present
    files. The image corpus first builds its fine-tuning source model; the text corpus needs none."""
    from .collect import collect

    entries, base = _entries(corpus), CORPORA[corpus]["base"]
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    source = build_source(d) if any(_FT in e["overrides"] for e in entries) else None
    for e in entries:
        if only and e["id"] not in only:
            continue
        out = d / f"{e['id']}.pt"
        if out.is_file():
            continue
        t0 = time.time()
        ov = [o.format(source=source) for o in [*base, *e["overrides"]]]
        collect(ov, out=out, seeds=(0, 1), record_every=e.get("record_every"), run_id=e["id"])
        log(f"collected {e['id']} ({e['split']}) in {time.time() - t0:.0f} s -> {out}")
    return corpus_paths(d, corpus=corpus)


if __name__ == "__main__":  # python -m predictors.build DIR [image|text] [ids...]: collect the corpus only
    import sys

    name = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] in CORPORA else "image"
    rest = sys.argv[3:] if len(sys.argv) > 2 and sys.argv[2] in CORPORA else sys.argv[2:]
    collect_corpus(sys.argv[1], only=rest or None, corpus=name, log=lambda m: print(m, flush=True))
