"""Datasets and loaders.

Every dataset yields batches ``(x, y, idx)``: inputs, labels and the samples' indices in the training set
(per-sample signals such as data sieving need them). Small datasets (digits, CIFAR, synthetic) are held as
tensors, batched by :class:`TensorLoader` with vectorised augmentation (no worker processes, no per-sample
Python); folders of images go through a ``torch.utils.data.DataLoader``.

Registered datasets (``data.name``):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes), the embedded
  default that needs no download; a stratified, seeded train/val split (``data.val_fraction``,
  ``data.split_seed``). Pixel values scaled to [0, 1] and standardised with the training mean/std.
* ``cifar10`` / ``cifar100``: torchvision's CIFAR from ``data.root`` (``data.download=true`` fetches it when
  the machine has the internet); standard augmentation (4-pixel padded random crop + horizontal flip).
* ``imagefolder``: ``data.root/train/<class>/*`` and ``data.root/val/<class>/*`` (ImageNet layout).
* ``synthetic``: seeded Gaussian class blobs in image shape, for tests.
* ``glue`` / ``text_demo``: text classification (:mod:`freezebench.zoo.text_data`, the ``nlp`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DatasetNotFoundError
from ..registry import DATASETS
from .sampling import EpochShuffle, epoch_seed

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    num_val: int
    random_augmentation: bool  # whether training inputs change from epoch to epoch
    # text data (freezebench.zoo.text_data): modality "text", the token vocabulary size, the longest padded
    # sequence, the GLUE task (or None) and the tokenizer's folder (None: the task's own vocabulary)
    modality: str = "image"
    vocab_size: int = 0
    max_length: int = 0
    task: str | None = None
    tokenizer: str | None = None


class TensorLoader:
    """Batches of a tensor dataset, shuffled with a seeded generator per epoch, augmented on the fly.

    ``set_epoch(e)`` fixes the order of epoch ``e`` (seed + e), so a run's data order is reproducible and
    resumable. Tensors live on ``device`` when given (the whole dataset is moved once).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        augment: bool = False,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        size: int | None = None,
    ):
        device = torch.device(device) if device is not None else x.device
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.mean = None if mean is None else mean.to(device).view(1, -1, 1, 1)
        self.std = None if std is None else std.to(device).view(1, -1, 1, 1)
        self.drop_last = drop_last
        self.epoch = 0
        self.device = device
        self.size = size  # resize every batch to size x size on the device (after augmentation); None: native

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def unaugmented(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``idx`` as the model sees them, without random augmentation."""
        i = idx.to(self.device)
        return self._prepare(self.x[i], None), self.y[i]

    def _prepare(self, xb: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
        if self.augment and gen is not None:
            xb = random_crop_flip(xb, pad=4, gen=gen)
        if self.size is not None and tuple(xb.shape[-2:]) != (self.size, self.size):
            # bilinear, as torchvision's Resize on tensors: the paper fine-tunes at 224 px on 32 px CIFAR
            xb = torch.nn.functional.interpolate(xb, size=(self.size, self.size), mode="bilinear",
                                                 align_corners=False)
        if self.mean is not None:
            xb = (xb - self.mean) / self.std
        return xb

    def __iter__(self) -> Iterator[Batch]:
        order, gen = EpochShuffle(len(self.x), self.seed, self.shuffle).order(self.epoch)
        yield from self.batches_of(order, gen, batches=len(self))

    def batches_of(self, order: torch.Tensor, gen: torch.Generator, batches: int | None = None) -> Iterator[Batch]:
        """The samples ``order`` in batches (``batches`` of them; all by default), augmented from ``gen``."""
        order = order.to(self.device)
        for b in range(math.ceil(len(order) / self.batch_size) if batches is None else batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._prepare(self.x[idx], gen if self.augment else None), self.y[idx], idx


def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Vectorised random crop (zero padding ``pad``) and horizontal flip of a batch (N, C, H, W)."""
    n, c, h, w = x.shape
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    bidx = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[bidx, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset so items come with their index: ``(x, y, idx)``."""

    def __init__(self, base: Any):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.base[i]
        return x, y, i


class FolderLoader:
    """A DataLoader over an :class:`IndexedDataset` with a per-epoch seeded shuffle and device copies."""

    def __init__(self, ds: Any, batch_size: int, *, shuffle: bool, seed: int, num_workers: int, device: Any,
                 probe_ds: Any = None):
        self.ds = IndexedDataset(ds)
        self.probe_ds = probe_ds if probe_ds is not None else ds  # same samples, no random augmentation
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_workers, self.device, self.epoch = num_workers, torch.device(device), 0

    def __len__(self) -> int:
        return math.ceil(len(self.ds) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.ds)

    def unaugmented(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``idx`` through the unaugmented view of the dataset."""
        xs, ys = zip(*(self.probe_ds[int(j)] for j in idx))
        return torch.stack(xs).to(self.device), torch.as_tensor(ys).to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        dl = torch.utils.data.DataLoader(
            self.ds, batch_size=self.batch_size, shuffle=self.shuffle, generator=gen,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
        )
        yield from self._to_device(dl)

    def batches_of(self, order: torch.Tensor, gen: torch.Generator) -> Iterator[Batch]:
        """The samples ``order`` in batches (a DataLoader over those indices, its workers seeded from ``gen``)."""
        dl = torch.utils.data.DataLoader(self.ds, batch_size=self.batch_size, sampler=order.tolist(), generator=gen,
                                         num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        yield from self._to_device(dl)

    def _to_device(self, dl: Any) -> Iterator[Batch]:
        nb = self.device.type == "cuda"
        for x, y, i in dl:
            yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), i.to(self.device)


@dataclass
class DataBundle:
    """A dataset ready for training: info, loaders and the fixed probe batch."""

    info: DataInfo
    train: Any  # TensorLoader | FolderLoader
    val: Any

    def probe_batch(self, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, seeded subset of the training set without augmentation (for activation signals)."""
        n = self.train.num_samples
        gen = torch.Generator().manual_seed(10_007 + seed)
        return self.train.unaugmented(torch.randperm(n, generator=gen)[: min(size, n)])


def _split(n: int, labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices, sorted: the split of scikit-learn's ``train_test_split(range(n),
    test_size=val_fraction, random_state=seed, stratify=labels)``, computed here (importing sklearn costs a
    large share of a short run's start-up); sklearn itself for the cases it refuses, with its message."""
    labels = np.asarray(labels)
    classes, y_idx, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_test = math.ceil(val_fraction * n) if 0 < val_fraction < 1 else 0
    n_train = n - n_test
    if not (0 < val_fraction < 1) or len(labels) != n or counts.min() < 2 or min(n_train, n_test) < len(classes):
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(np.arange(n), test_size=val_fraction, random_state=seed, stratify=labels)
        return np.sort(tr), np.sort(va)
    # StratifiedShuffleSplit's first split (sklearn/model_selection/_split.py), step for step, same RNG draws
    class_indices = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    val: list[int] = []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        val.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws closest to proportional, ties broken at random (sklearn.utils.extmath)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images (1797, 8, 8) float64, targets int), read from its data file
    without importing sklearn (what ``sklearn.datasets.load_digits`` returns; sklearn's loader if the file
    is not where it should be)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package, imports nothing
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def _tensor_bundle(name: str, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
                   num_classes: int, cfg: Any, seed: int, device: Any, augment: bool,
                   mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> DataBundle:
    if cfg.classes is not None:
        (x, y), (xv, yv) = (select_classes(a, b, list(cfg.classes), num_classes, name) for a, b in ((x, y), (xv, yv)))
        num_classes = len(cfg.classes)
    if cfg.train_subset is not None:
        if cfg.train_subset > len(x):
            from ..errors import ConfigError

            raise ConfigError(f"data.train_subset={cfg.train_subset} is more than the {len(x)} training samples of "
                              f"{name}; pass at most {len(x)}, or null for all")
        x, y = x[: cfg.train_subset], y[: cfg.train_subset]
    size = cfg.image_size
    info = DataInfo(name, num_classes, x.shape[1], size or x.shape[-1], len(x), len(xv), augment)
    train = TensorLoader(x, y, cfg.batch_size, shuffle=True, seed=seed, augment=augment, mean=mean, std=std,
                         device=device, size=size)
    val = TensorLoader(xv, yv, cfg.eval_batch_size, shuffle=False, mean=mean, std=std, device=device, size=size)
    return DataBundle(info, train, val)


def select_classes(x: torch.Tensor, y: torch.Tensor, classes: list[int], num_classes: int,
                   name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of ``classes`` only, relabelled ``classes[i] -> i`` (``data.classes``: a class subset, e.g.
    the source and target tasks of a transfer experiment). Unknown classes: :class:`ConfigError`."""
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ConfigError(f"data.classes names class {bad[0]} but {name} has classes 0..{num_classes - 1}")
    lut = torch.full((num_classes,), -1, dtype=torch.long)
    lut[torch.tensor([int(c) for c in classes])] = torch.arange(len(classes))
    new = lut[y]
    keep = new >= 0
    return x[keep], new[keep]


@DATASETS.register("digits")
def digits(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (no download); values in 0..16 scaled to [0, 1], standardised."""
    d_images, d_target = _load_digits()
    images = torch.tensor(d_images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(d_target, dtype=torch.long)
    tr, va = _split(len(labels), d_target, cfg.val_fraction, cfg.split_seed)
    x, y = images[tr], labels[tr]
    mean, std = x.mean().view(1), x.std().view(1)
    return _tensor_bundle("digits", x, y, images[va], labels[va], 10, cfg, seed, device, augment=False,
                          mean=mean, std=std)


@DATASETS.register("synthetic")
def synthetic(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """Seeded Gaussian blobs shaped like images: each class has its own mean image (learnable, for tests)."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    n, k, c, s = cfg.synthetic_samples, cfg.synthetic_classes, cfg.synthetic_channels, cfg.synthetic_size
    centres = torch.randn(k, c, s, s, generator=g)
    labels = torch.arange(n) % k
    images = centres[labels] + 0.8 * torch.randn(n, c, s, s, generator=g)
    tr, va = _split(n, labels.numpy(), cfg.val_fraction, cfg.split_seed)
    return _tensor_bundle("synthetic", images[tr], labels[tr], images[va], labels[va], k, cfg, seed, device,
                          augment=False)


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(name: str, cfg: Any, seed: int, device: Any) -> DataBundle:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(cfg.root).expanduser()
    # folders a failed download would leave behind (torchvision creates root before downloading)
    created = [p for p in (root, *root.parents) if not p.exists()] if cfg.download else []
    try:
        try:
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
        except BaseException:
            _remove_created(created)
            raise
    except RuntimeError as e:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DatasetNotFoundError(
            f"{name} not found under {root.resolve()} (expected {folder}/ there). Place the extracted "
            f"python version of {name} in that folder, point data.root at it, or pass data.download=true on "
            f"a machine with internet access. ({e})"
        ) from None
    except OSError as e:  # download attempted without network
        raise DatasetNotFoundError(f"could not download {name} into {root}: {e}") from None
    x = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 32, 32)
    xv = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
    y, yv = torch.tensor(train.targets), torch.tensor(test.targets)
    mean, std = (torch.tensor(v) for v in CIFAR_STATS[name])
    return _tensor_bundle(name, x, y, xv, yv, 10 if name == "cifar10" else 100, cfg, seed, device,
                          augment=cfg.augment, mean=mean, std=std)


def _remove_created(created: list[Path]) -> None:
    """Remove the folders this call created (the outermost holds the others), with whatever half-written
    download they hold; folders that existed before are left alone."""
    import shutil

    if created:
        shutil.rmtree(created[-1], ignore_errors=True)


@DATASETS.register("cifar10")
def cifar10(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """CIFAR-10 from ``data.root`` (Krizhevsky 2009); the test split serves as validation set."""
    return _cifar("cifar10", cfg, seed, device)


@DATASETS.register("cifar100")
def cifar100(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """CIFAR-100 from ``data.root`` (Krizhevsky 2009); the test split serves as validation set."""
    return _cifar("cifar100", cfg, seed, device)


@DATASETS.register("imagefolder")
def imagefolder(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; ImageNet-style transforms."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetNotFoundError(
                f"imagefolder needs {root.resolve() / split}/<class>/<image> folders; set data.root to a folder "
                f"holding train/ and val/"
            )
    if cfg.classes is not None:
        raise ConfigError("data.classes works with the tensor datasets (digits, cifar10, cifar100, synthetic); for "
                          "imagefolder keep only the wanted class folders under data.root")
    size = cfg.image_size or 224
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if cfg.augment:
        tt = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        tt = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
    tv = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
    train = ImageFolder(str(root / "train"), transform=tt)
    probe = ImageFolder(str(root / "train"), transform=tv)  # the probe batch must not change between calls
    val = ImageFolder(str(root / "val"), transform=tv)
    if cfg.train_subset is not None:
        keep = range(min(cfg.train_subset, len(train)))
        train, probe = torch.utils.data.Subset(train, keep), torch.utils.data.Subset(probe, keep)
    classes = len(val.classes)
    info = DataInfo("imagefolder", classes, 3, size, len(train), len(val), cfg.augment)
    tl = FolderLoader(train, cfg.batch_size, shuffle=True, seed=seed, num_workers=cfg.num_workers, device=device,
                      probe_ds=probe)
    vl = FolderLoader(val, cfg.eval_batch_size, shuffle=False, seed=seed, num_workers=cfg.num_workers,
                      device=device)
    return DataBundle(info, tl, vl)


@DATASETS.register("glue")
def glue(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """A GLUE task (``data.task``) from ``data.root``, tokenised with the model's tokenizer (text; needs the
    ``nlp`` extra): see :func:`freezebench.zoo.text_data.glue`."""
    from .text_data import glue as build

    return build(cfg, seed=seed, device=device)


@DATASETS.register("text_demo")
def text_demo(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """The embedded synthetic text task (seeded token sequences, its own vocabulary; no download): see
    :func:`freezebench.zoo.text_data.text_demo`."""
    from .text_data import text_demo as build

    return build(cfg, seed=seed, device=device)


def build_data(cfg: Any, *, seed: int, device: Any) -> DataBundle:
    """Build the dataset named ``cfg.name`` (clear error listing the known names when unknown)."""
    return DATASETS.get(cfg.name)(cfg, seed=seed, device=device)
