"""Faults a long run meets: an unreachable tracking server, corrupt or mismatched files, a failing disk.

Each gives one clear line from the command line (exit status 2, no traceback) and never leaves a
half-written checkpoint in place of the last good one.
"""

from __future__ import annotations

import errno
import socket
import threading

import pytest
import torch

from freezebench.trainer import checkpoint as ckpt
from freezebench.trainer import tracking
from freezebench.cli import main
from freezebench.config import load_config
from freezebench.errors import CheckpointError, TrackingError
from freezebench.trainer import Trainer
from helpers import StopAt
from helpers import one_line as _one_line_error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_training(capsys, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    built = []
    monkeypatch.setattr("freezebench.trainer.loop.build_data", lambda *a, **k: built.append(1))
    line = _one_line_error(capsys, main(["train", *tiny_overrides, f"tracking.uri={uri}"]))
    assert f"MLflow tracking server {uri} is unreachable" in line and "tracking.enabled=false" in line
    assert built == []  # detected before the data (let alone training) was touched


def test_tracking_server_that_never_answers_times_out(monkeypatch):
    with socket.socket() as server:  # accepts connections, never replies
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(TrackingError, match="unreachable .*timed out"):
            tracking.check_reachable(f"http://127.0.0.1:{port}", timeout=0.5)


def test_a_tracking_server_answering_anything_is_reachable():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}")  # no error
        tracking.check_reachable("sqlite:///mlflow.db")  # not a server: nothing to probe
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def checkpointed(tiny_overrides, tmp_path):
    """An interrupted-style checkpoint: the state after epoch 1 of a 3-epoch run (untracked)."""
    cfg = load_config([*tiny_overrides, "tracking.enabled=false", f"trainer.output_dir={tmp_path}",
                       "tracking.run_name=run"])
    t = Trainer(cfg, hooks=[StopAt(4)])  # after epoch 1
    with pytest.raises(Exception, match="stopped at step 4"):
        t.fit()
    return tmp_path / "run" / "last.pt"


BASE = ["tracking.enabled=false", "tracking.run_name=run"]


def test_corrupt_checkpoint_is_a_clear_error(checkpointed, tiny_overrides, tmp_path, capsys):
    data = checkpointed.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    for bad in (truncated, garbage):
        line = _one_line_error(capsys, main(["train", *tiny_overrides, *BASE, f"trainer.output_dir={tmp_path}",
                                             f"resume={bad}"]))
        assert f"checkpoint '{bad}' cannot be read" in line and "corrupt or truncated" in line


def test_mismatched_checkpoints_are_clear_errors(checkpointed, tiny_overrides, tmp_path, capsys):
    out = f"trainer.output_dir={tmp_path}"
    line = _one_line_error(capsys, main(["train", *tiny_overrides, *BASE, out, "model.name=mlp",
                                         f"resume={checkpointed}"]))
    assert "another config (model.name: checkpoint 'tiny', this run 'mlp')" in line
    weights = tmp_path / "weights.pt"  # final weights only, not a training state
    torch.save({"model_state": {}, "model_name": "tiny"}, weights)
    line = _one_line_error(capsys, main(["train", *tiny_overrides, *BASE, out, f"resume={weights}"]))
    assert "final weights only" in line and f"model.checkpoint={weights}" in line
    # a training state that does not fit this model: an optimiser with one param group too few
    payload = ckpt.read(checkpointed)
    payload["optimizer"]["param_groups"] = payload["optimizer"]["param_groups"][:1]
    broken = tmp_path / "broken.pt"
    ckpt.write(payload, broken)
    line = _one_line_error(capsys, main(["train", *tiny_overrides, *BASE, out, f"resume={broken}"]))
    assert f"checkpoint '{broken}' does not fit this run" in line


def test_corrupt_predictor_file_is_a_clear_error(tiny_overrides, tmp_path, capsys):
    bad = tmp_path / "predictor.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    line = _one_line_error(capsys, main(["train", *tiny_overrides, *BASE, "policy=smartfrz",
                                         f"policy.weights={bad}"]))
    assert f"SmartFRZ predictor weights '{bad}' cannot be read" in line


def test_failing_disk_write_keeps_the_last_good_checkpoint(tiny_overrides, tmp_path, monkeypatch, capsys):
    """The epoch-2 checkpoint write fails half-way (disk full): epoch 1's last.pt stays, readable, alone."""
    real_save = torch.save
    calls = []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:  # the checkpoints before the first step and after epoch 1
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    line = _one_line_error(capsys, main(["train", *tiny_overrides, *BASE, f"trainer.output_dir={tmp_path}"]))
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert "previous checkpoint there (if any) is intact" in line
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt"]  # no temporary file left
    monkeypatch.setattr(torch, "save", real_save)
    kept = ckpt.read(tmp_path / "run" / "last.pt")
    assert kept["position"] == {"step": 4, "epoch": 1, "batch": 0, "world_size": 1}
    # and the run resumes from it
    assert main(["train", *tiny_overrides, *BASE, f"trainer.output_dir={tmp_path}", "resume=auto"]) == 0


def test_read_rejects_what_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.pt"
    torch.save([1, 2, 3], p)
    with pytest.raises(CheckpointError, match="not a freezebench training checkpoint"):
        ckpt.read(p)
    torch.save({"format": ckpt.FORMAT, "version": 99}, p)
    with pytest.raises(CheckpointError, match="format version 99"):
        ckpt.read(p)
