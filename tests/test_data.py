"""Datasets and loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from freezebench.config import DataConfig
from freezebench.zoo.data import build_data, random_crop_flip
from freezebench.errors import DatasetNotFoundError


def cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def test_digits_split_is_fixed_and_stratified():
    a = build_data(cfg(), seed=0, device="cpu")
    b = build_data(cfg(), seed=5, device="cpu")
    assert (a.info.num_train, a.info.num_val, a.info.num_classes) == (1437, 360, 10)
    assert (a.info.in_channels, a.info.image_size) == (1, 8)
    assert torch.equal(a.val.y, b.val.y) and torch.equal(a.train.x, b.train.x)  # split ignores the run seed
    counts = torch.bincount(a.val.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert abs(float(a.train.x.mean())) < 1e-6 or a.train.mean is not None


def test_loader_visits_every_sample_once_per_epoch_in_a_seeded_order():
    d = build_data(cfg(), seed=3, device="cpu")
    d.train.set_epoch(0)
    idx0 = torch.cat([i for _, _, i in d.train])
    assert sorted(idx0.tolist()) == list(range(d.info.num_train))
    d.train.set_epoch(1)
    idx1 = torch.cat([i for _, _, i in d.train])
    assert not torch.equal(idx0, idx1)
    d.train.set_epoch(0)
    assert torch.equal(idx0, torch.cat([i for _, _, i in d.train]))
    x, y, i = next(iter(d.train))
    assert torch.equal(y, d.train.y[i])
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32


def test_probe_batch_is_fixed():
    d = build_data(cfg(), seed=0, device="cpu")
    x1, y1 = d.probe_batch(64, seed=0)
    x2, y2 = d.probe_batch(64, seed=0)
    assert x1.shape == (64, 1, 8, 8) and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_random_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, pad=1, gen=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for n in range(2):
        windows = [padded[n, :, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[n], w) for w in windows)


def test_synthetic_is_seeded():
    a = build_data(cfg(name="synthetic"), seed=0, device="cpu")
    b = build_data(cfg(name="synthetic"), seed=0, device="cpu")
    assert torch.equal(a.train.x, b.train.x) and a.info.num_classes == 4


def test_train_subset():
    d = build_data(cfg(train_subset=100), seed=0, device="cpu")
    assert d.info.num_train == 100 and len(d.train) == 4


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_data(cfg(name="cifar100", root=str(tmp_path)), seed=0, device="cpu")
    msg = str(e.value)
    assert "cifar-100-python" in msg and "data.download=true" in msg


def test_cifar_from_a_local_folder(tmp_path, monkeypatch):
    """A CIFAR-10 folder in torchvision's format (tiny, written here) loads and augments."""
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)],
                "filenames": ["x"] * n, "batch_label": "b"}

    for k in range(1, 6):
        pickle.dump(batch(8), open(root / f"data_batch_{k}", "wb"))
    pickle.dump(batch(8), open(root / "test_batch", "wb"))
    pickle.dump({"label_names": [str(i) for i in range(10)]}, open(root / "batches.meta", "wb"))
    import torchvision.datasets.cifar as tv_cifar

    # our files are not the real ones: skip torchvision's md5 checks
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    d = build_data(cfg(name="cifar10", root=str(tmp_path), batch_size=16), seed=0, device="cpu")
    assert (d.info.num_train, d.info.num_val, d.info.image_size, d.info.random_augmentation) == (40, 8, 32, True)
    x, y, i = next(iter(d.train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (20, 20), (k * 40, 10, 200)).save(tmp_path / split / c / f"{k}.png")
    d = build_data(cfg(name="imagefolder", root=str(tmp_path), image_size=16, batch_size=4, augment=False),
                   seed=0, device="cpu")
    assert (d.info.num_classes, d.info.num_train, d.info.image_size) == (2, 6, 16)
    batches = list(d.train)
    assert sum(len(b[2]) for b in batches) == 6 and batches[0][0].shape[1:] == (3, 16, 16)
    px, py = d.probe_batch(4, seed=0)
    assert px.shape == (4, 3, 16, 16)
    # with random augmentation on, the probe batch is still the same every time
    d = build_data(cfg(name="imagefolder", root=str(tmp_path), image_size=16, batch_size=4, augment=True),
                   seed=0, device="cpu")
    assert torch.equal(d.probe_batch(4, seed=0)[0], d.probe_batch(4, seed=0)[0])


def test_augmentation_is_fixed_per_epoch_but_changes_between_epochs():
    """Why the frozen-prefix cache refuses random augmentation: a sample's input differs from epoch to epoch."""
    from freezebench.zoo.data import TensorLoader

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 8, 8, generator=g), torch.arange(12) % 3
    loader = TensorLoader(x, y, 4, shuffle=True, seed=1, augment=True)

    def inputs(epoch: int) -> torch.Tensor:
        loader.set_epoch(epoch)
        out = torch.empty_like(x)
        for xb, _, idx in loader:
            out[idx] = xb
        return out

    assert torch.equal(inputs(0), inputs(0))  # deterministic per (seed, epoch): resumable
    assert not torch.equal(inputs(0), inputs(1))  # but not the same input every epoch
    plain = TensorLoader(x, y, 4, shuffle=True, seed=1, augment=False)
    plain.set_epoch(1)
    assert torch.equal(torch.cat([xb for xb, _, _ in plain]), x[torch.cat([i for _, _, i in plain])])
