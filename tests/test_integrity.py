"""Integrity of every file freezebench reads: a byte flipped inside a tensor's data is refused, in one line.

``torch.load`` does not check the CRC32 that ``torch.save``'s zip archive stores for every member, so a
flipped byte in a weight loads silently (the tests show it does). :func:`freezebench.fileio.read_torch`
verifies every member first.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import StopAt, one_line

from freezebench.cli import main
from freezebench.config import load_config
from freezebench.errors import CheckpointError, ConfigError, FreezebenchError
from freezebench.fileio import atomic_torch_save, read_torch, remove_stale_temporaries
from freezebench.trainer import Trainer
from freezebench.trainer import checkpoint as ckpt


def flip_tensor_byte(path: Path, key_hint: str = "") -> str:
    """Flip one byte in the middle of the largest tensor's data (a zip member ``archive/data/N``) in place;
    returns the member's name. The offset is the member's local header + 30 + name + extra field."""
    with zipfile.ZipFile(path) as z:
        members = [i for i in z.infolist() if "/data/" in i.filename and key_hint in i.filename]
        info = max(members, key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


def test_flipped_byte_in_tensor_data_loads_silently_with_torch_but_not_here(tmp_path):
    p = tmp_path / "w.pt"
    original = torch.arange(1000, dtype=torch.float32)
    atomic_torch_save({"w": original}, p)
    member = flip_tensor_byte(p)
    assert not torch.equal(torch.load(p, weights_only=True)["w"], original)  # torch accepts the damage
    with pytest.raises(FreezebenchError, match=f"member '{member}' fails its CRC32 check"):
        read_torch(p, what="file", fix="write it again")


@pytest.fixture
def interrupted(tiny_overrides, tmp_path):
    """last.pt of a run stopped at step 6 (untracked)."""
    args = [*tiny_overrides, "tracking.enabled=false", "tracking.run_name=run", f"trainer.output_dir={tmp_path}"]
    with pytest.raises(Exception, match="stopped at step 6"):
        Trainer(load_config(args), hooks=[StopAt(6)]).fit()
    return args, tmp_path / "run" / "last.pt"


def test_corrupt_last_pt_is_refused_by_resume(interrupted, capsys):
    args, last = interrupted
    member = flip_tensor_byte(last)
    line = one_line(capsys, main(["train", *args, f"resume={last}"]))
    assert f"checkpoint '{last}' cannot be read (member '{member}' fails its CRC32 check" in line
    with pytest.raises(CheckpointError, match="CRC32"):
        ckpt.read(last, lazy=True)
    # resume=auto skips it (with a warning) and starts afresh rather than resuming damaged weights
    from freezebench.config import flatten

    assert ckpt.find_latest(last.parent.parent, ckpt.config_fingerprint(flatten(load_config(args)))) is None


def test_corrupt_final_weights_and_predictor_are_refused(interrupted, tiny_overrides, tmp_path, capsys,
                                                         always_freeze_predictor):
    args, last = interrupted
    weights = tmp_path / "final.pt"
    atomic_torch_save(ckpt.read(last), weights)
    flip_tensor_byte(weights)
    line = one_line(capsys, main(["train", *tiny_overrides, "tracking.enabled=false", f"model.checkpoint={weights}"]))
    assert f"model checkpoint '{weights}' cannot be read" in line and "CRC32" in line
    predictor = tmp_path / "predictor.pt"
    predictor.write_bytes(Path(always_freeze_predictor).read_bytes())
    flip_tensor_byte(predictor)
    with pytest.raises(ConfigError, match=f"SmartFRZ predictor weights '{predictor}' cannot be read .*CRC32"):
        from freezebench.predictors.weights import load_predictor

        load_predictor(predictor)


def test_corrupt_space_and_suite_files_are_one_line(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_bytes(b"name: s\nparams:\n  policy: [full\xff\xfe]\n")
    line = one_line(capsys, main(["sweep", str(space), "--no-plots"]))
    assert f"space file '{space}' is damaged or not a text file (not UTF-8" in line
    from freezebench.sweeps.space import SweepError
    from freezebench.sweeps.suite import load_suite

    suite = tmp_path / "t.yaml"
    suite.write_bytes(b"name: t\x00\x00")
    with pytest.raises(SweepError, match=f"suite file '{suite}' is damaged or not a text file"):
        load_suite(str(suite))


def test_durable_write_removes_stale_temporaries_of_the_same_target_only(tmp_path):
    target = tmp_path / "last.pt"
    stale = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".last.pt.zz.tmp"]
    other = tmp_path / ".final.pt.abc.tmp"
    for p in (*stale, other):
        p.write_bytes(b"half")
    atomic_torch_save({"x": torch.ones(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".final.pt.abc.tmp", "last.pt"]
    assert torch.equal(read_torch(target, what="f", fix="")["x"], torch.ones(2))
    assert remove_stale_temporaries(tmp_path / "final.pt") == [other]


def test_durable_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_torch_save({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert len(synced) == 2
    assert Path(synced[0]).name.startswith(".a.pt.") and Path(synced[1]) == tmp_path.resolve()
