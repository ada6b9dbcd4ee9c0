"""``freezebench suite NAME --plan``: what a suite will compute, before anything is trained.

One row per (model, dataset) of the suite's grid: the number of runs, the full-training TFLOPs under the
cost model (:mod:`freezebench.cost`: forward, weight gradients and input gradients of every unit, for every
training sample of every epoch), the paper's figure (the suite's ``paper_tflops``: model -> TFLOPs of full
training as the SmartFRZ paper reports it, Li et al., ICLR 2023, Tables 1 and 2) and their ratio. It trains
nothing and needs no dataset files: the CIFAR shapes are known (:data:`KNOWN_DATASETS`); the embedded and
synthetic datasets are built (they are in memory); pretrained models are built with their ImageNet stem
but without loading the weights (:func:`freezebench.zoo.models.architecture_only`).

At the paper's 224 px (``data.image_size=224`` in the paper suites) the cost model gives ResNet-50 12,3xx,
VGG-11 23,xxx and MobileNetV2 9xx TFLOPs for 10 epochs over CIFAR's 50,000 training images, within a few
percent of the paper's 12,360 / 22,950 / 960; at CIFAR's native 32 px it is 3x to 50x less.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from freezebench.cost import CostModel
from freezebench.errors import FreezebenchError

# dataset -> (classes, channels, native image side, training samples): enough to plan without the files
KNOWN_DATASETS = {"cifar10": (10, 3, 32, 50_000), "cifar100": (100, 3, 32, 50_000)}
COLUMNS = ["model", "dataset", "runs", "epochs", "image_size", "train_samples", "gflops_per_sample",
           "tflops_full", "paper_tflops_full", "ratio"]


@dataclass
class PlanRow:
    model: str
    dataset: str
    runs: int
    epochs: int
    image_size: int
    train_samples: int
    gflops_per_sample: float  # one full training step (forward + backward) per sample, GFLOPs
    tflops_full: float  # full training of one run: epochs x samples x per-sample step FLOPs
    paper_tflops_full: float | None
    ratio: float | None  # tflops_full / paper_tflops_full


def _data_shape(cfg: Any) -> tuple[int, int, int, int]:
    """(classes, channels, image side, training samples) of cfg.data, after data.classes/image_size."""
    d = cfg.data
    if d.name in KNOWN_DATASETS:
        classes, channels, side, n = KNOWN_DATASETS[d.name]
        if d.classes is not None:  # CIFAR's classes are balanced: n / classes samples each
            bad = [c for c in d.classes if not 0 <= int(c) < classes]
            if bad:
                raise FreezebenchError(f"data.classes names class {bad[0]} but {d.name} has classes 0..{classes - 1}")
            n, classes = n * len(d.classes) // classes, len(d.classes)
    elif d.name in ("digits", "synthetic"):
        from freezebench.zoo.data import build_data

        info = build_data(d, seed=0, device="cpu").info
        return info.num_classes, info.in_channels, info.image_size, info.num_train
    else:
        raise FreezebenchError(f"--plan cannot size data.name={d.name!r} without its files (it knows "
                               f"{', '.join([*KNOWN_DATASETS, 'digits', 'synthetic'])})")
    if d.train_subset is not None:
        n = min(n, int(d.train_subset))
    return classes, channels, int(d.image_size or side), n


#: GLUE training-set sizes (Wang et al., ICLR 2019, Table 1), for planning without the files
GLUE_TRAIN = {"mrpc": 3_668, "cola": 8_551, "sst2": 67_349, "rte": 2_490, "qnli": 104_743, "qqp": 363_846,
              "mnli": 392_702}
#: the uncased/cased BERT-base vocabulary (Devlin et al. 2019), when the tokenizer is not on this machine
BERT_VOCAB = 30_522


def _text_plan_row(cfg: Any, runs: int, paper: float | None) -> PlanRow:
    """A text (model, dataset): full-training FLOPs at ``data.max_length`` tokens per sequence (an upper bound:
    runs count every batch at its own padded length), from the model's architecture alone."""
    from types import SimpleNamespace

    import torch

    from freezebench.trainer.batches import TextBatches

    d = cfg.data
    if d.name == "text_demo":
        from freezebench.zoo.data import build_data

        info = build_data(d, seed=0, device="cpu").info
        classes, vocab, length, n = info.num_classes, info.vocab_size, info.max_length, info.num_train
    else:
        from freezebench.zoo.text_data import _task

        task, spec = _task(d)
        classes, vocab, length, n = spec.num_classes, BERT_VOCAB, int(d.max_length), GLUE_TRAIN[task]
    if d.train_subset is not None:
        n = min(n, int(d.train_subset))
    model = _text_architecture(cfg, classes, vocab, length)
    info = SimpleNamespace(max_length=length, num_classes=classes, task=None)
    probe = {"input_ids": torch.ones(2, length, dtype=torch.long), "attention_mask": torch.ones(2, length)}
    part = TextBatches(info).partition(model, probe, "layer")
    per_sample = CostModel([u.flops for u in part], part.other_flops).full_step_flops
    samples = n if not cfg.trainer.max_steps_per_epoch else min(n, cfg.trainer.max_steps_per_epoch * cfg.data.batch_size)
    tflops = cfg.trainer.epochs * samples * per_sample / 1e12
    name = str(cfg.model.hf_path) if cfg.model.name == "hf" else str(cfg.model.name)
    return PlanRow(model=name, dataset=f"{d.name}_{d.task}" if d.name == "glue" else str(d.name), runs=runs,
                   epochs=int(cfg.trainer.epochs), image_size=length, train_samples=samples,
                   gflops_per_sample=per_sample / 1e9, tflops_full=tflops, paper_tflops_full=paper,
                   ratio=tflops / paper if paper else None)


def _text_architecture(cfg: Any, classes: int, vocab: int, length: int) -> Any:
    """The text model's architecture, randomly initialised (no weights read): ``model.hf_path``'s config.json
    when it is on this machine, BERT-base's for a ``bert-base-*`` name that is not."""
    from freezebench.zoo.text import TextClassifier, build_text_model, require_transformers

    if cfg.model.name != "hf":
        return build_text_model(str(cfg.model.name), num_classes=classes, vocab_size=vocab, max_length=length)
    tf = require_transformers()
    path = str(cfg.model.hf_path)
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True, num_labels=classes)
    except (OSError, ValueError):
        if not path.rstrip("/").split("/")[-1].startswith("bert-base"):
            raise FreezebenchError(f"--plan needs the config.json of model.hf_path={path!r} on this machine (or a "
                                   f"bert-base-* name, planned as BERT-base)") from None
        config = tf.BertConfig(num_labels=classes)  # the defaults are BERT-base's
    return TextClassifier(tf.AutoModelForSequenceClassification.from_config(config))


def plan_row(cfg: Any, runs: int, paper: float | None) -> PlanRow:
    """The plan of one (model, dataset) from a resolved config."""
    if cfg.data.name in ("glue", "text_demo"):
        return _text_plan_row(cfg, runs, paper)
    from freezebench.units import example_batch, partition
    from freezebench.zoo.models import architecture_only, build_model

    classes, channels, side, n = _data_shape(cfg)
    with architecture_only():
        model = build_model(cfg.model.name, num_classes=classes, in_channels=channels, image_size=side,
                            pretrained=cfg.model.pretrained)
    part = partition(model, example_batch(channels, side), "layer")
    per_sample = CostModel([u.flops for u in part], part.other_flops).full_step_flops
    samples = n if not cfg.trainer.max_steps_per_epoch else min(n, cfg.trainer.max_steps_per_epoch * cfg.data.batch_size)
    tflops = cfg.trainer.epochs * samples * per_sample / 1e12
    return PlanRow(model=str(cfg.model.name), dataset=str(cfg.data.name), runs=runs, epochs=int(cfg.trainer.epochs),
                   image_size=side, train_samples=samples, gflops_per_sample=per_sample / 1e9, tflops_full=tflops,
                   paper_tflops_full=paper, ratio=tflops / paper if paper else None)


def plan_suite(suite: Any, overrides: list[str] | None = None, seeds: list[int] | None = None) -> list[PlanRow]:
    """One :class:`PlanRow` per (model, dataset) of ``suite`` (a :class:`freezebench.sweeps.suite.Suite`)."""
    from freezebench.config import load_config

    space = suite.space.with_(overrides=list(overrides or []), seeds=seeds)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    cfgs: dict[tuple[str, str], Any] = {}
    for point in space.grid():
        # the full-training cost does not depend on the policy: resolve each point as `full` (a policy's own
        # required keys, such as the CKA oracle's reference, exist only once a suite has run)
        plain = {k: v for k, v in point.items() if k != "policy" and not k.startswith("policy.")}
        over = [o for o in space.trial_overrides(plain) if not o.split("=", 1)[0].strip().startswith("policy")]
        cfg = load_config([*over, "policy=full"])
        key = (str(cfg.model.name), str(cfg.data.name), str(cfg.data.task), str(cfg.model.hf_path))
        groups.setdefault(key, []).append(point)
        cfgs.setdefault(key, cfg)
    paper = suite.paper_tflops or {}
    rows = []
    for key, points in groups.items():
        extra = (1 if suite.reference else 0) + (1 if suite.source else 0)  # reference / source runs
        rows.append(plan_row(cfgs[key], len(points) * len(space.seeds) + extra,
                             paper.get(key[0]) if key[1] != "glue" else paper.get(str(cfgs[key].data.task))))
    return rows


def render_plan(rows: list[PlanRow], fmt: str = "table") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.model, r.dataset, r.runs, r.epochs, r.image_size, r.train_samples,
                        repr(r.gflops_per_sample), repr(r.tflops_full),
                        "" if r.paper_tflops_full is None else repr(float(r.paper_tflops_full)),
                        "" if r.ratio is None else repr(r.ratio)])
        return buf.getvalue()
    head = ["model", "dataset", "runs", "epochs", "image", "samples", "GFLOPs/sample", "TFLOPs (full)",
            "paper TFLOPs", "ratio"]
    cells = [[r.model, r.dataset, str(r.runs), str(r.epochs), str(r.image_size), f"{r.train_samples:,}",
              f"{r.gflops_per_sample:.4g}", f"{r.tflops_full:,.0f}" if r.tflops_full >= 100 else f"{r.tflops_full:.4g}",
              "–" if r.paper_tflops_full is None else f"{r.paper_tflops_full:,.0f}",
              "–" if r.ratio is None else f"{r.ratio:.3f}"] for r in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    if fmt != "table":
        raise FreezebenchError(f"--plan prints table, md or csv, not {fmt!r}")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = lambda row: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(c) for c in cells)]) + "\n"
