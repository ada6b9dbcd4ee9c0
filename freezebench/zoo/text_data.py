"""Text classification data: GLUE tasks from local files and an embedded synthetic task.

    freezebench train --config text_demo                                     # the embedded task, bert_tiny
    freezebench train model.name=hf model.hf_path=/models/bert-base-uncased data.name=glue data.task=cola \\
        data.root=/data/glue

* ``glue`` (``data.task=mrpc|cola|sst2|rte|qnli|qqp|mnli``; Wang et al., "GLUE: A Multi-Task Benchmark and
  Analysis Platform for Natural Language Understanding", ICLR 2019): the TSV files as the GLUE download
  script lays them out, ``<data.root>/<MRPC|CoLA|SST-2|RTE|QNLI|QQP|MNLI>/train.tsv`` and ``dev.tsv``
  (MNLI: ``dev_matched.tsv``; ``data.root`` may also be the task's folder itself), or a ``datasets`` folder
  saved with ``save_to_disk`` (splits ``train`` and ``validation``/``validation_matched``, the Hugging Face
  ``glue`` columns) when ``datasets`` is installed. The dev set is the validation set (GLUE's test labels are
  not public). Tokenised with the model's tokenizer (``data.tokenizer``, by default ``model.hf_path``), read
  offline, truncated to ``data.max_length`` tokens.
* ``text_demo``: ``data.text_samples`` seeded token sequences (8 to 31 tokens) over a vocabulary of its own
  (:data:`DEMO_VOCAB` tokens, no tokenizer): the label says whether the sequence holds more tokens of the
  first half of the vocabulary than of the second. A learnable rule, so a tiny BERT reaches high accuracy
  in a minute on a CPU.

Batches are ``(inputs, labels, idx)`` with ``inputs`` a dict of ``input_ids``, ``attention_mask`` (and
``token_type_ids`` for sentence pairs), the Hugging Face keys, padded dynamically to the batch's longest
sequence. Length bucketing (``data.bucket_batches``) is the last stage of the sampler chain
(:mod:`freezebench.zoo.sampling`): whatever order the chain gives (the epoch shuffle, the sieve's partial set,
a DDP rank's shard), :class:`TextLoader` sorts each run of ``bucket_batches`` batches of it by length and
visits those batches in a seeded random order, so padding is small and the order stays reproducible.

Metrics as GLUE defines them (:func:`task_metrics`): accuracy for every task, F1 of the positive class for
MRPC and QQP, Matthews correlation for CoLA; each task's main metric is also logged as ``val/score``.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics as M
from ..errors import ConfigError, DatasetNotFoundError
from .data import DataBundle, DataInfo, _split
from .sampling import EpochShuffle

#: the embedded task's vocabulary: [PAD] [CLS] [SEP] [UNK] and 60 word tokens
DEMO_VOCAB = 64
DEMO_SPECIAL = 4


@dataclass(frozen=True)
class GlueTask:
    folder: str  # the task's folder in the GLUE download
    dev: str  # the dev file
    header: bool
    text: tuple[Any, ...]  # column names (header) or indices
    label: Any
    labels: tuple[str, ...] | None  # label strings in class order (None: the file holds 0..k-1)
    hf_text: tuple[str, ...]  # the Hugging Face `glue` dataset's columns
    main: str  # the main metric (val/score)
    num_classes: int = 2


GLUE: dict[str, GlueTask] = {
    "mrpc": GlueTask("MRPC", "dev.tsv", True, ("#1 String", "#2 String"), "Quality", None,
                     ("sentence1", "sentence2"), M.VAL_F1),
    "cola": GlueTask("CoLA", "dev.tsv", False, (3,), 1, None, ("sentence",), M.VAL_MCC),
    "sst2": GlueTask("SST-2", "dev.tsv", True, ("sentence",), "label", None, ("sentence",), M.VAL_ACC),
    "rte": GlueTask("RTE", "dev.tsv", True, ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
                    ("sentence1", "sentence2"), M.VAL_ACC),
    "qnli": GlueTask("QNLI", "dev.tsv", True, ("question", "sentence"), "label", ("entailment", "not_entailment"),
                     ("question", "sentence"), M.VAL_ACC),
    "qqp": GlueTask("QQP", "dev.tsv", True, ("question1", "question2"), "is_duplicate", None,
                    ("question1", "question2"), M.VAL_F1),
    "mnli": GlueTask("MNLI", "dev_matched.tsv", True, ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"), M.VAL_ACC, 3),
}


# --- metrics ---------------------------------------------------------------------------------------------------
def task_metrics(task: str | None, confusion: torch.Tensor) -> dict[str, float]:
    """GLUE's metrics of ``task`` (None: the embedded task, accuracy only) as ``val/*`` names, with the main one
    also as ``val/score``, from the confusion counts ``confusion[label, prediction]`` (summed over DDP ranks)."""
    c = confusion.double()
    n = float(c.sum())
    out = {M.VAL_ACC: float(c.diagonal().sum()) / n if n else math.nan}
    spec = GLUE.get(task) if task else None
    if spec is not None and spec.main in (M.VAL_F1, M.VAL_MCC):
        tn, fp, fn, tp = (float(v) for v in (c[0, 0], c[0, 1], c[1, 0], c[1, 1]))
        if spec.main == M.VAL_F1:
            out[M.VAL_F1] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        else:
            den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            out[M.VAL_MCC] = (tp * tn - fp * fn) / den if den else 0.0
    out[M.VAL_SCORE] = out[spec.main] if spec is not None else out[M.VAL_ACC]
    return out


# --- the loader ------------------------------------------------------------------------------------------------
class TextLoader:
    """Batches of tokenised sequences, padded to each batch's longest, with length bucketing.

    ``ids`` (N, T) holds the sequences padded with ``pad_id`` to the longest, ``lengths`` (N,) their lengths,
    ``types`` (N, T) the segment ids of sentence pairs (or None). Has the base-loader interface of
    :mod:`freezebench.zoo.data` (``set_epoch``, ``num_samples``, ``unaugmented``, ``batches_of``), so the
    sampler chain (sieve, DDP shards) works on it unchanged.
    """

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, types: torch.Tensor | None, labels: torch.Tensor,
                 batch_size: int, *, shuffle: bool, seed: int = 0, device: Any = None, bucket: int = 0):
        device = torch.device(device) if device is not None else ids.device
        self.ids, self.lengths, self.y = ids.to(device), lengths.to(device), labels.to(device)
        self.types = None if types is None else types.to(device)
        self._lengths_cpu = lengths.cpu()
        self.batch_size, self.shuffle, self.seed, self.device = batch_size, shuffle, seed, device
        self.bucket = bucket
        self.epoch = 0
        self.augment = False
        self._pos = torch.arange(ids.shape[1], device=device)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs of samples ``idx``, padded to their longest."""
        lens = self.lengths[idx]
        width = int(self._lengths_cpu[idx.cpu()].max()) if len(idx) else 1
        out = {"input_ids": self.ids[idx, :width],
               "attention_mask": (self._pos[:width].unsqueeze(0) < lens.unsqueeze(1)).long()}
        if self.types is not None:
            out["token_type_ids"] = self.types[idx, :width]
        return out

    def unaugmented(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        i = idx.to(self.device)
        return self.inputs(i), self.y[i]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
        order, gen = EpochShuffle(len(self.y), self.seed, self.shuffle).order(self.epoch)
        yield from self.batches_of(order, gen)

    def bucketed(self, order: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """``order`` as batches: each run of ``bucket`` batches sorted by length, its batches in a random order
        drawn from ``gen`` (in order when the loader does not shuffle); without bucketing, plain batches."""
        order = order.cpu()
        bs = self.batch_size
        if self.bucket <= 1:
            return [order[b : b + bs] for b in range(0, len(order), bs)]
        batches: list[torch.Tensor] = []
        run = self.bucket * bs
        for start in range(0, len(order), run):
            chunk = order[start : start + run]
            chunk = chunk[torch.argsort(self._lengths_cpu[chunk], stable=True)]
            part = [chunk[b : b + bs] for b in range(0, len(chunk), bs)]
            if self.shuffle:
                part = [part[int(j)] for j in torch.randperm(len(part), generator=gen)]
            batches.extend(part)
        return batches

    def batches_of(self, order: torch.Tensor, gen: torch.Generator,
                   batches: int | None = None) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
        for idx in self.bucketed(order, gen)[:batches]:
            idx = idx.to(self.device)
            yield self.inputs(idx), self.y[idx], idx


def _bundle(name: str, train: tuple, val: tuple, num_classes: int, vocab_size: int, cfg: Any, seed: int,
            device: Any, *, task: str | None = None, tokenizer: str | None = None) -> DataBundle:
    """A :class:`DataBundle` of text: ``train``/``val`` are (ids, lengths, types, labels)."""
    if cfg.classes is not None:
        raise ConfigError(f"data.classes works with the image datasets; {name} keeps all its labels")
    ids, lengths, types, labels = train
    if cfg.train_subset is not None:
        if cfg.train_subset > len(labels):
            raise ConfigError(f"data.train_subset={cfg.train_subset} is more than the {len(labels)} training samples "
                              f"of {name}; pass at most {len(labels)}, or null for all")
        n = cfg.train_subset
        ids, lengths, labels = ids[:n], lengths[:n], labels[:n]
        types = None if types is None else types[:n]
    width = int(max(lengths.max(), val[1].max()))
    info = DataInfo(name, num_classes, 1, width, len(labels), len(val[3]), False, modality="text",
                    vocab_size=vocab_size, max_length=width, task=task, tokenizer=tokenizer)
    bucket = int(cfg.bucket_batches)
    tl = TextLoader(ids, lengths, types, labels, cfg.batch_size, shuffle=True, seed=seed, device=device, bucket=bucket)
    vl = TextLoader(*val[:3], val[3], cfg.eval_batch_size, shuffle=False, seed=seed, device=device, bucket=bucket)
    return DataBundle(info, tl, vl)


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 1), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


# --- the embedded task -----------------------------------------------------------------------------------------
def demo_sequences(n: int, seed: int) -> tuple[list[list[int]], np.ndarray]:
    """``n`` seeded sequences ``[CLS] w1 .. wk [SEP]`` (k odd, 7..29) over :data:`DEMO_VOCAB` tokens, and their
    labels: 1 when more of the words come from the first half of the word tokens than from the second."""
    rng = np.random.RandomState(seed)
    words = DEMO_VOCAB - DEMO_SPECIAL
    seqs, labels = [], []
    for _ in range(n):
        k = 2 * rng.randint(3, 15) + 1
        w = rng.randint(0, words, size=k)
        labels.append(int((w < words // 2).sum() > k // 2))
        seqs.append([1, *(w + DEMO_SPECIAL).tolist(), 2])
    return seqs, np.asarray(labels)


def text_demo(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """The embedded synthetic text task (see the module docstring); split seeded by ``data.split_seed``."""
    seqs, labels = demo_sequences(int(cfg.text_samples), int(cfg.split_seed))
    seqs = [s[: int(cfg.max_length)] for s in seqs]
    ids, lengths = _pad(seqs, 0)
    y = torch.tensor(labels, dtype=torch.long)
    tr, va = _split(len(y), labels, cfg.val_fraction, cfg.split_seed)
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    return _bundle("text_demo", (ids[tr], lengths[tr], None, y[tr]), (ids[va], lengths[va], None, y[va]), 2,
                   DEMO_VOCAB, cfg, seed, device)


# --- GLUE --------------------------------------------------------------------------------------------------------
def _task(cfg: Any) -> tuple[str, GlueTask]:
    task = str(cfg.task).lower() if cfg.task else None
    if task not in GLUE:
        from ..errors import did_you_mean

        raise ConfigError(f"data.name=glue needs data.task=<{'|'.join(GLUE)}>, got {cfg.task!r}."
                          f"{did_you_mean(str(task), list(GLUE))}")
    return task, GLUE[task]


def _task_folder(root: Path, spec: GlueTask) -> Path:
    for cand in (root / spec.folder, root / spec.folder.lower(), root / spec.folder.replace("-", "").lower(), root):
        if (cand / "train.tsv").is_file() or (cand / "dataset_dict.json").is_file():
            return cand
    return root / spec.folder


def _read_tsv(path: Path, spec: GlueTask, task: str) -> tuple[list[tuple[str, ...]], list[int]]:
    if not path.is_file():
        raise DatasetNotFoundError(f"data.task={task}: expected {path} (the GLUE layout: <data.root>/{spec.folder}/"
                                   f"train.tsv and {spec.dev}, as the GLUE download has them; or a datasets "
                                   f"save_to_disk folder)")
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        if not rows:
            raise DatasetNotFoundError(f"{path} is empty; expected the GLUE {spec.folder} header and rows")
        header, rows = rows[0], rows[1:]
        missing = [c for c in (*spec.text, spec.label) if c not in header]
        if missing:
            raise DatasetNotFoundError(f"{path} has no column {missing[0]!r} (its columns: {', '.join(header)}); "
                                       f"expected the GLUE {spec.folder} layout")
        cols = [header.index(c) for c in spec.text]
        lab = header.index(spec.label)
    else:
        cols, lab = list(spec.text), spec.label
    need = max(*cols, lab) + 1
    texts, labels = [], []
    for n, r in enumerate(rows):
        if len(r) < need:
            if task == "qqp":  # the GLUE QQP files hold a few malformed lines; the usual readers skip them
                continue
            raise DatasetNotFoundError(f"{path} line {n + 1 + spec.header} has {len(r)} columns, the GLUE "
                                       f"{spec.folder} layout needs {need}")
        raw = r[lab].strip()
        if spec.labels is not None:
            if raw not in spec.labels:
                raise DatasetNotFoundError(f"{path} line {n + 1 + spec.header}: label {raw!r} is not one of "
                                           f"{', '.join(spec.labels)}")
            y = spec.labels.index(raw)
        else:
            if raw not in {str(i) for i in range(spec.num_classes)}:
                raise DatasetNotFoundError(f"{path} line {n + 1 + spec.header}: label {raw!r} is not one of "
                                           f"{', '.join(str(i) for i in range(spec.num_classes))}")
            y = int(raw)
        texts.append(tuple(r[c] for c in cols))
        labels.append(y)
    return texts, labels


def _read_saved(folder: Path, spec: GlueTask) -> tuple[tuple[list, list], tuple[list, list]]:
    import datasets  # a save_to_disk folder: only when datasets is installed

    dd = datasets.load_from_disk(str(folder))
    val_name = "validation_matched" if "validation_matched" in dd else "validation"
    out = []
    for split in ("train", val_name):
        if split not in dd:
            raise DatasetNotFoundError(f"{folder} (a datasets folder) has no split {split!r}; it has "
                                       f"{', '.join(dd)}")
        ds = dd[split]
        missing = [c for c in (*spec.hf_text, "label") if c not in ds.column_names]
        if missing:
            raise DatasetNotFoundError(f"{folder}/{split} has no column {missing[0]!r}; expected the Hugging Face "
                                       f"glue columns {', '.join((*spec.hf_text, 'label'))}")
        out.append((list(zip(*(ds[c] for c in spec.hf_text))), [int(v) for v in ds["label"]]))
    return out[0], out[1]


def _tokenise(tok: Any, texts: list[tuple[str, ...]], max_length: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    cols = list(zip(*texts)) if texts else [[]]
    enc = tok(list(cols[0]), list(cols[1]) if len(cols) > 1 else None, truncation=True, max_length=max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, lengths = _pad(enc["input_ids"], pad)
    types = None
    if len(cols) > 1 and "token_type_ids" in enc:
        types, _ = _pad(enc["token_type_ids"], 0)
    return ids, lengths, types


def glue(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """GLUE task ``data.task`` from ``data.root`` (see the module docstring)."""
    task, spec = _task(cfg)
    root = Path(cfg.root).expanduser()
    folder = _task_folder(root, spec)
    if not cfg.tokenizer:
        raise ConfigError("data.name=glue tokenises with the model's tokenizer: set model.hf_path (model.name=hf) "
                          "or data.tokenizer=<a folder holding a saved tokenizer>")
    from .text import load_tokenizer

    if (folder / "dataset_dict.json").is_file():
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DatasetNotFoundError(f"{folder} is a datasets save_to_disk folder, but datasets is not "
                                       f"installed: pip install datasets, or use the GLUE TSV files") from None
        (tr_text, tr_y), (va_text, va_y) = _read_saved(folder, spec)
    else:
        tr_text, tr_y = _read_tsv(folder / "train.tsv", spec, task)
        va_text, va_y = _read_tsv(folder / spec.dev, spec, task)
    if not tr_y or not va_y:
        raise DatasetNotFoundError(f"data.task={task}: {folder} holds no {'training' if not tr_y else 'dev'} rows")
    tok = load_tokenizer(str(cfg.tokenizer))
    ml = int(cfg.max_length)
    train = (*_tokenise(tok, tr_text, ml), torch.tensor(tr_y, dtype=torch.long))
    val = (*_tokenise(tok, va_text, ml), torch.tensor(va_y, dtype=torch.long))
    if (train[2] is None) != (val[2] is None):
        train, val = (t if t[2] is not None else (t[0], t[1], torch.zeros_like(t[0]), t[3]) for t in (train, val))
    return _bundle(f"glue_{task}", train, val, spec.num_classes, len(tok), cfg, seed, device, task=task,
                   tokenizer=str(cfg.tokenizer))


def check_local_inputs(cfg: Any, what: str = "this run") -> None:
    """One line naming what a GLUE run lacks on this machine (its task's files, the model or its tokenizer),
    before anything is trained (``freezebench suite`` checks every grid point first)."""
    import os

    if cfg.data.name != "glue":
        return
    task, spec = _task(cfg.data)
    folder = _task_folder(Path(cfg.data.root).expanduser(), spec)
    if not (folder / "dataset_dict.json").is_file():
        for name in ("train.tsv", spec.dev):
            if not (folder / name).is_file():
                raise DatasetNotFoundError(f"{what} needs the GLUE {spec.folder} files: expected {folder / name} "
                                           f"(set data.root to the folder holding {spec.folder}/)")
    for key, path in (("model.hf_path", cfg.model.hf_path if cfg.model.name == "hf" else None),
                      ("data.tokenizer", cfg.data.tokenizer)):
        if not path or os.path.isdir(path):
            continue
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(path), "config.json" if key == "model.hf_path" else "tokenizer_config.json")
        except Exception:  # not a repository name, or huggingface_hub missing
            cached = None
        if not isinstance(cached, str):
            raise DatasetNotFoundError(f"{what} needs {key}={path!r} on this machine: neither a folder nor in the "
                                       f"local Hugging Face cache (nothing is downloaded); pass {key}=<folder>")

