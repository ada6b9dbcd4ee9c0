"""Data parallelism under torchrun: every rank freezes the same units and ends with the same model.

CPU runs use gloo with two processes; the CUDA test (NCCL, one process per GPU, at most two) runs only
where a GPU is present.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from freezebench.trainer import checkpoint as ckpt
from freezebench.trainer.distributed import ShardedLoader
from freezebench.zoo.data import TensorLoader

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, dump: Path, args: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), **extra_env}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(HERE / "ddp_worker.py"), str(dump), "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _check_ranks_agree(dump: Path, nproc: int, run_name: str, steps: int, batch: int, epochs: int) -> None:
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    first = ranks[0]
    assert first["world_size"] == nproc
    assert first["frozen"] and first["events"]  # the policy froze something: the DDP wrapper was rebuilt
    for other in ranks[1:]:
        assert other["frozen"] == first["frozen"] and other["events"] == first["events"]
        assert first["state"].keys() == other["state"].keys()
        assert all(torch.equal(first["state"][k], other["state"][k]) for k in first["state"])
        assert set(other["shard"]).isdisjoint(first["shard"])  # each rank trained on its own samples
        assert other["run_id"] is None  # only rank 0 tracks
    # one MLflow run, logged once per epoch, costs counted over all ranks
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("freezebench").experiment_id],
                              f"attributes.run_name = '{run_name}'")
    assert [r.info.run_id for r in runs] == [first["run_id"]]
    assert runs[0].info.status == "FINISHED"
    samples = client.get_metric_history(first["run_id"], "data/samples_per_epoch")
    assert sorted((m.step, m.value) for m in samples) == [(e + 1, float(nproc * steps * batch)) for e in range(epochs)]
    full = client.get_metric_history(first["run_id"], "cost/tflops_full")
    want = first["full_step_flops"] * nproc * steps * batch * epochs / 1e12
    assert max(m.value for m in full) == pytest.approx(want, rel=1e-12)
    frozen = client.get_metric_history(first["run_id"], "freeze/frozen_units")
    assert len(frozen) == epochs and frozen[-1].value == len(first["frozen"])


@pytest.mark.slow
def test_two_gloo_processes_freeze_the_same_units_and_end_identical(mlflow_uri, tiny_overrides, tmp_path):
    args = [*tiny_overrides, "policy=autofreeze", "model.granularity=layer", "tracking.run_name=ddp-cpu"]
    proc = _torchrun(2, tmp_path, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_ranks_agree(tmp_path, 2, "ddp-cpu", steps=4, batch=16, epochs=3)
    # rank 0's checkpoint carries both ranks' random states
    [last] = list((tmp_path / "outputs").glob("*/last.pt"))
    saved = ckpt.read(last)
    assert saved["position"]["world_size"] == 2 and len(saved["rng"]) == 2 and saved["finished"]

    # SIGTERM on rank 0 mid-epoch 2: both ranks stop at one step boundary, rank 0 checkpoints; torchrun resumes
    (tmp_path / "cut").mkdir()
    cut = [*args[:-1], "tracking.run_name=ddp-cut", "trainer.check_finite_every=1"]
    proc = _torchrun(2, tmp_path / "cut", cut, tmp_path, FB_SIGNAL_AT_STEP="6")
    assert proc.returncode != 0 and "SIGTERM: stopped at step 6 (epoch 2, batch 2)" in proc.stderr, proc.stderr[-3000:]
    proc = _torchrun(2, tmp_path / "cut", [*cut, "resume=auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for r in range(2):
        resumed = torch.load(tmp_path / "cut" / f"rank{r}.pt", weights_only=True)
        assert all(torch.equal(v, resumed["state"][k]) for k, v in reference["state"].items())
        assert resumed["events"] == reference["events"]
    strip = [{k: v for k, v in h.items() if not k.startswith(("time/", "mem/"))} for h in reference["history"]]
    assert [{k: v for k, v in h.items() if not k.startswith(("time/", "mem/"))} for h in resumed["history"]] == strip


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL)")
def test_nccl_processes_freeze_the_same_units_and_end_identical(mlflow_uri, tiny_overrides, tmp_path):
    nproc = min(2, torch.cuda.device_count())
    args = [*[o for o in tiny_overrides if o != "trainer.device=cpu"], "trainer.device=cuda", "policy=autofreeze",
            "model.granularity=layer", "tracking.run_name=ddp-cuda"]
    proc = _torchrun(nproc, tmp_path, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_ranks_agree(tmp_path, nproc, "ddp-cuda", steps=4, batch=16, epochs=3)


def test_shards_partition_the_epoch_like_distributed_sampler():
    x, y = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    base = TensorLoader(x, y, batch_size=2, shuffle=True, seed=3)
    base.set_epoch(1)
    order = [int(i) for _, _, idx in base for i in idx]
    train = [ShardedLoader(base, r, 3, pad=True) for r in range(3)]
    val = [ShardedLoader(base, r, 3, pad=False) for r in range(3)]
    # padded (training): 12 = 10 + the first 2 again, every 3rd from the rank; equal batch counts
    assert [s.shard().tolist() for s in train] == [(order + order[:2])[r::3] for r in range(3)]
    assert [len(s) for s in train] == [2, 2, 2]
    assert [int(i) for _, _, idx in train[1] for i in idx] == (order + order[:2])[1::3]
    # unpadded (validation): a partition, nothing counted twice
    assert sorted(i for s in val for i in s.shard().tolist()) == list(range(10))
    assert [len(s) for s in val] == [2, 2, 2]
    for s in train:  # the batches carry the samples of the indices they report
        for xb, yb, idx in s:
            assert torch.equal(yb, idx) and torch.equal(xb.view(-1), idx.float())


def test_resume_with_another_world_size_is_a_clear_error(tiny_overrides, tmp_path):
    from freezebench.config import load_config
    from freezebench.errors import CheckpointError
    from freezebench.trainer import Trainer

    t = Trainer(load_config([*tiny_overrides, "tracking.enabled=false", f"trainer.output_dir={tmp_path}",
                             "trainer.epochs=1", "tracking.run_name=w"]))
    payload = ckpt.build_payload(t.state_dict(), t.checkpoint_payload(), t.cfg, rng=[], epoch_acc=None, world_size=2,
                                 mlflow={"run_id": None, "uri": None})
    ckpt.write(payload, tmp_path / "w2.pt")
    with pytest.raises(CheckpointError, match="written by 2 process.*--nproc_per_node 2"):
        Trainer(load_config([*tiny_overrides, "tracking.enabled=false", f"trainer.output_dir={tmp_path}",
                             "trainer.epochs=1", f"resume={tmp_path / 'w2.pt'}"]))


def test_sharded_sieve_order_is_the_partial_set_split_over_ranks():
    """Sieve then shard (a sampler chain): the ranks' padded shards cover exactly the sieve's partial set of
    the epoch, in its order, and every rank takes the same number of batches."""
    from freezebench.features.sieve import Sieve, SievedLoader

    x, y = torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50)
    base = TensorLoader(x, y, batch_size=4, shuffle=True, seed=3)
    sieve = Sieve(50, ratio=0.5, period=1, swap=1.0, seed=3)
    single = SievedLoader(base, sieve)
    for epoch in (0, 1, 2):
        shards = [ShardedLoader(single, r, 2, pad=True) for r in range(2)]
        for s in shards:
            s.set_epoch(epoch)  # the sieve updates once per epoch, however many loaders move to it
        single.set_epoch(epoch)
        order = single.indices().tolist()
        assert len(order) == sieve.m == 25 and set(order) == set(sieve.partial.tolist())
        padded = order + order[:1]
        assert [s.shard().tolist() for s in shards] == [padded[r::2] for r in range(2)]
        assert [len(s) for s in shards] == [4, 4]  # ceil(13 / 4)
        for s in shards:  # batches carry the samples of the indices they report
            got = [int(i) for xb, yb, idx in s for i in idx]
            assert got == s.shard().tolist()
    assert sieve.updates == 2


@pytest.mark.slow
def test_two_gloo_processes_sieve_the_same_samples(mlflow_uri, tiny_overrides, tmp_path):
    """Data sieving under DDP: every rank's sieve sees the global batch's losses, so the ranks keep one partial
    set, train on disjoint shards of it, and end with the same model."""
    over = [o for o in tiny_overrides if not o.startswith("trainer.max_steps_per_epoch")]
    args = [*over, "policy=autofreeze", "model.granularity=layer", "tracking.run_name=ddp-sieve",
            "data.sieve.enabled=true", "data.sieve.ratio=0.5"]
    proc = _torchrun(2, tmp_path, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    a, b = ranks
    assert a["sieve"]["updates"] == 2 and b["sieve"]["updates"] == 2  # at the starts of epochs 1 and 2
    assert all(torch.equal(a["sieve"][k], b["sieve"][k]) for k in ("partial", "removed", "loss"))
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["frozen"] == b["frozen"] and a["events"] == b["events"]
    # epoch 0's shards: disjoint halves of a partial set of 64 of the 128 training samples, 2 steps of 16 each
    assert set(a["shard"]).isdisjoint(b["shard"]) and len(a["shard"]) == len(b["shard"]) == 32
    assert [h["data/samples_per_epoch"] for h in a["history"]] == [64.0] * 3
