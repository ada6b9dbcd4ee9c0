"""Checkpoint and resume: the whole training state in one file, written atomically.

    freezebench train policy=smartfrz trainer.epochs=30 resume=auto   # continue the newest unfinished
                                                                    # checkpoint of this config, else start
    freezebench train policy=smartfrz trainer.epochs=30 resume=outputs/<run id>/last.pt

Every ``trainer.checkpoint_every`` epochs, and at the next step boundary after SIGTERM or SIGINT, the trainer
writes ``<trainer.output_dir>/<MLflow run id, or the run name when untracked>/last.pt`` (a temporary file
renamed over the previous one, so a crash or a full disk never leaves a half-written checkpoint in place of
the last good one). It holds everything a resumed run needs to continue *exactly* (bit-for-bit on CPU with
``trainer.deterministic=true``):

* model weights and buffers, optimiser state (momentum buffers by param group), gradient-scaler state;
* the freezer (frozen units, freeze events) and the policy's own ``state_dict`` (e.g. SmartFRZ's weight
  histories, AutoFreeze's gradient accumulators), per-unit learning-rate overrides;
* the position: optimiser steps taken, epoch, batches of that epoch already consumed (the data order of an
  epoch is a seeded permutation, so skipping the consumed batches puts a resumed run on the same samples);
  the partial sums of an interrupted epoch (loss, accuracy, samples, FLOPs);
* Python, NumPy, torch and CUDA random states (of every rank under DDP);
* the cost accounting (TFLOPs spent, full-training TFLOPs), the per-epoch metric history, elapsed time;
* the MLflow run id, so a resumed run continues the same MLflow run (metrics of later epochs are logged at
  the same steps as an uninterrupted run would log them);
* the resolved config, checked against the resuming run's config (keys that cannot change the training,
  :data:`IGNORED_KEYS`, may differ).

``resume=auto`` picks, among ``<trainer.output_dir>/*/last.pt``, the newest checkpoint of an unfinished run
whose config matches this one, and starts a fresh run when there is none (so a job script can always pass
it). A finished run's checkpoint is marked ``finished`` and never trained from again; if the run was killed
after it but before its end was logged, resume closes the run instead (``reliability.py``).

Every file read is integrity-checked (each zip member's CRC32, :func:`freezebench.fileio.read_torch`),
and the checkpoint records the thread count, device type and torch version it was written with: a resume
under others says that bit-exactness is lost, and under ``trainer.deterministic=true`` refuses unless
``trainer.allow_inexact_resume=true`` (:func:`check_exactness`).

Composer's layer freezing cannot resume from a checkpoint (its freezing state is not saved); here every
policy's state round-trips (``tests/test_contract.py``).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import faults
from ..errors import CheckpointError
from ..fileio import atomic_torch_save, read_torch
from .reliability import is_closed

log = logging.getLogger(__name__)

FORMAT = "freezebench-checkpoint"
VERSION = 2  # 2: trainer hooks' states under "hooks" (1: "sparsity" and "sieve" at the top; still read)
LAST = "last.pt"

#: config keys that may differ between a checkpoint and the run resuming it: they do not change the training
IGNORED_KEYS = frozenset({
    "resume", "trainer.progress", "trainer.checkpoint_every", "trainer.output_dir", "trainer.save_checkpoint",
    "trainer.check_finite_every", "trainer.device", "data.num_workers", "data.root", "data.download",
    "data.eval_batch_size", "trainer.compile", "trainer.compile_backend", "trainer.compile_mode",
    "trainer.allow_inexact_resume",
})
IGNORED_PREFIXES = ("tracking.",)


@functools.lru_cache(maxsize=1)
def default_fingerprint() -> dict[str, str]:
    """The built-in default of every config key outside ``policy.*``, as :func:`config_fingerprint` strings.

    A key a checkpoint's config lacks was added to freezebench after it was written; it counts as having had
    its default there (a new key defaults to the behaviour before it existed), so older checkpoints resume.
    """
    from omegaconf import OmegaConf

    from ..config import Config, flatten

    return {k: v for k, v in config_fingerprint(flatten(OmegaConf.structured(Config))).items()
            if not k.startswith("policy.")}


def config_fingerprint(flat: Mapping[str, Any]) -> dict[str, str]:
    """The flattened config reduced to the keys that determine the training (values as ``repr`` strings)."""
    return {k: repr(v) for k, v in flat.items() if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)}


def config_differences(saved: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """``key: checkpoint X, this run Y`` for every key whose value differs (or exists on one side only)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, default_fingerprint().get(k, "<absent>")), now.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: checkpoint {a}, this run {b}")
    return out


# --- random states -----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (CPU) and CUDA random states, in types ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": np_state["state"]["key"].astype(np.int64).tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[: torch.cuda.device_count()]])


# --- files -------------------------------------------------------------------------------------------------
def write(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically; a failed write raises :class:`CheckpointError` and leaves the previous file."""
    epoch = int(payload.get("position", {}).get("epoch", 0)) if isinstance(payload, Mapping) else 0
    try:
        return atomic_torch_save(payload, path, before_replace=(
            (lambda: faults.at("mid_checkpoint_write", epoch)) if faults.ARMED else None))
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e}; the previous checkpoint there (if any) is intact. Free disk "
            f"space or point trainer.output_dir elsewhere"
        ) from e


def read(path: str | Path, *, lazy: bool = False) -> dict[str, Any]:
    """Load and check a freezebench training checkpoint (``lazy``: memory-map tensors, for a quick look).

    Every member's CRC32 is verified first (:func:`freezebench.fileio.read_torch`): a flipped byte in a
    weight is refused, not resumed from."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (or is not a file); resume=auto finds the "
                              f"latest checkpoint of this config under trainer.output_dir")
    payload = read_torch(p, what="checkpoint", error=CheckpointError, mmap=lazy,
                         fix="the file is corrupt or truncated (an interrupted copy?): resume from another "
                             "checkpoint or start afresh")
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        what = "final weights only (final.pt)" if isinstance(payload, Mapping) and "model_state" in payload else \
            "not a freezebench training checkpoint"
        raise CheckpointError(
            f"{str(p)!r} is {what}: resume needs the last.pt written during training (trainer.checkpoint_every); "
            f"to start from these weights instead pass model.checkpoint={p}"
        )
    if payload.get("version") not in (1, VERSION):
        raise CheckpointError(f"checkpoint {str(p)!r} has format version {payload.get('version')!r}; this "
                              f"freezebench reads versions 1 and {VERSION}")
    return upgrade(dict(payload))


def upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A version-1 payload in the current layout (its feature states moved under ``hooks``)."""
    if payload["version"] == 1:
        payload["hooks"] = {k: payload.pop(k) for k in ("sparsity", "sieve") if payload.get(k) is not None}
        payload.pop("sparsity", None)
        payload.pop("sieve", None)
        payload["version"] = VERSION
    return payload


def check_compatible(payload: Mapping[str, Any], path: str | Path, *, fingerprint: Mapping[str, str],
                     unit_names: list[str], world_size: int) -> None:
    """Raise :class:`CheckpointError` naming the difference when ``payload`` cannot resume this run."""
    diff = config_differences(payload["config"], fingerprint)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} in all)" if len(diff) > 6 else "")
        raise CheckpointError(f"checkpoint {str(path)!r} was written by a run with another config ({shown}); "
                              f"resume with the same command line plus resume=...")
    if list(payload["unit_names"]) != list(unit_names):
        raise CheckpointError(f"checkpoint {str(path)!r} has units {list(payload['unit_names'])[:4]}..., this model "
                              f"{list(unit_names)[:4]}...: it was written for another model or granularity")
    saved_world = int(payload["position"]["world_size"])
    if saved_world != world_size:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by {saved_world} process(es), this run has "
                              f"{world_size}: each process's data shard and random state differ, so resume with "
                              f"--nproc_per_node {saved_world}")
    if payload.get("finished") and is_closed(Path(path).parent):
        raise CheckpointError(f"checkpoint {str(path)!r} is the end of a finished run "
                              f"({payload['position']['epoch']} epochs): there is nothing left to resume")


def find_latest(output_dir: str | Path, fingerprint: Mapping[str, str]) -> Path | None:
    """The newest ``<output_dir>/*/last.pt`` of an unfinished run with this config (``None``: there is none)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for p in root.glob(f"*/{LAST}"):
        try:
            payload = read(p, lazy=True)
        except CheckpointError as e:
            log.warning("resume=auto skips %s: %s", p, e)
            continue
        if (payload.get("finished") and is_closed(p.parent)) or config_differences(payload["config"], fingerprint):
            continue  # a finished run whose end was not logged (no `closed` marker) is picked: resume closes it
        found.append((p.stat().st_mtime, int(payload["position"]["step"]), str(p)))
    return Path(max(found)[2]) if found else None


def resolve(resume: str | None, output_dir: str | Path, fingerprint: Mapping[str, str]) -> Path | None:
    """The checkpoint that ``resume`` (a path, ``auto`` or ``None``) names; ``None``: start afresh."""
    if resume is None:
        return None
    if str(resume) == "auto":
        path = find_latest(output_dir, fingerprint)
        if path is None:
            log.info("resume=auto: no unfinished checkpoint of this config under %s; starting afresh", output_dir)
        return path
    return Path(str(resume))


def build_payload(state: Mapping[str, Any], model: Mapping[str, Any], cfg: Any, *, rng: list[dict[str, Any]],
                  epoch_acc: list[dict[str, Any]] | None, world_size: int, mlflow: Mapping[str, Any],
                  finished: bool = False, device: Any = "cpu") -> dict[str, Any]:
    """The file's payload: ``state`` (:meth:`freezebench.trainer.Trainer.state_dict`), ``model`` (the weights
    and the model's description, so ``model.checkpoint=last.pt`` works too), the config, every rank's random
    states ``rng`` and partial epoch sums ``epoch_acc`` (``None``: between epochs), the MLflow run, and what
    bit-exactness depends on (:func:`exactness_record` of ``device``).
    """
    from ..config import flatten, to_yaml

    payload = dict(model)
    payload.update(state)
    payload.update({
        "format": FORMAT,
        "version": VERSION,
        "finished": finished,
        "config": config_fingerprint(flatten(cfg)),
        "config_yaml": to_yaml(cfg),
        "policy_name": str(cfg.policy.name),
        "position": {**state["position"], "world_size": int(world_size)},
        "epoch_acc": epoch_acc,
        "rng": rng,
        "mlflow": dict(mlflow),
        "exactness": exactness_record(device),
    })
    return payload


# --- exactness ---------------------------------------------------------------------------------------------
def exactness_record(device: Any) -> dict[str, Any]:
    """What bit-exact continuation depends on beyond the state: intra-op threads (CPU reductions split
    differently with another thread count), the device type and the torch version (kernels change)."""
    return {"threads": int(torch.get_num_threads()), "device": torch.device(device).type,
            "torch": str(torch.__version__)}


def check_exactness(payload: Mapping[str, Any], path: str | Path, device: Any, *, deterministic: bool,
                    allow: bool) -> str | None:
    """Compare the checkpoint's :func:`exactness_record` with this process's.

    Returns ``None`` when they match (the resumed run continues bit for bit), else one line saying why
    bit-exactness is lost. Under ``trainer.deterministic=true`` a mismatch raises :class:`CheckpointError`
    unless ``trainer.allow_inexact_resume=true`` (then the line is only printed). A checkpoint written
    before this record existed is reported as unknown exactness.
    """
    saved, now = payload.get("exactness"), exactness_record(device)
    if saved is None:
        diffs = ["the checkpoint does not record its threads, device and torch version"]
    else:
        diffs = [f"{k} {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in now.items() if saved.get(k) != v]
    if not diffs:
        return None
    line = (f"resuming {str(path)!r} is not bit-exact: {'; '.join(diffs)} (use the same threads "
            f"(OMP_NUM_THREADS / torch.set_num_threads), device and torch version to continue exactly)")
    if deterministic and not allow:
        raise CheckpointError(f"{line}; trainer.deterministic=true refuses this: pass "
                              f"trainer.allow_inexact_resume=true to resume anyway")
    return line


def hook_states(hooks: list[Any]) -> dict[str, Any]:
    """``{name: state}`` of every hook whose ``state_dict()`` is not ``None``."""
    out = {}
    for h in hooks:
        state = h.state_dict()
        if state is not None:
            out[h.name] = state
    return out


def load_hook_states(hooks: list[Any], states: Mapping[str, Any]) -> None:
    """Give every stateful hook its saved state; refuse saved states whose stateful hooks differ."""
    stateful = {h.name: h for h in hooks if h.state_dict() is not None}
    differ = sorted(set(stateful) ^ set(states))
    if differ:
        name = differ[0]
        raise CheckpointError(f"{name} is {'on' if name in states else 'off'} in the checkpoint but "
                              f"{'on' if name in stateful else 'off'} in this run's config")
    for name, h in stateful.items():
        h.load_state_dict(states[name])


def restore(tr: Any, payload: Mapping[str, Any], path: str | Path) -> None:
    """``tr.load_state_dict(payload)``, any failure turned into one :class:`CheckpointError` line naming the file."""
    from ..errors import FreezebenchError

    try:
        tr.load_state_dict(payload)
    except FreezebenchError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from e
    except Exception as e:  # shapes, keys, a policy refusing its state: the file does not fit this run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run ({type(e).__name__}: "
                              f"{first[:300]})") from e
