"""Saving and loading SmartFRZ predictor weights: one ``torch.save`` file per trained predictor.

File layout (format version 1), plain types only so that ``torch.load(path, weights_only=True)`` reads it::

    {"state_dict": {name: tensor, ...},            # SmartFRZPredictor.state_dict(), on the CPU
     "meta": {"format_version": 1,
              "tailor_size": int, "window": int,    # the snapshot length and window it was trained with
              "norm": str, "scale": float,          # input normalisation and attention scale (see model.py)
              "hidden": int, "key_dim": int, "z_hidden": int,   # layer sizes (read from the weights)
              "provenance": {...},                  # where it came from: data, runs, commit, date ...
              ...}}                                 # any further plain metadata given by the caller

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so a reader never
sees half a file. Loading checks everything a user can get wrong and raises :class:`ConfigError` with the
fix: a missing or unreadable file, missing keys, an unknown format version, and a tailor size or window
other than the caller expects (a predictor only makes sense on the windows it was trained on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from freezebench.fileio import atomic_torch_save, read_torch

from freezebench.errors import ConfigError

from .model import NORM_MODES, SmartFRZPredictor

__all__ = ["DEFAULT_WEIGHTS", "FORMAT_VERSION", "save_predictor", "load_predictor", "read_weights_file"]

#: the predictor shipped with the package (not shipped yet: a later issue trains and adds it)
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "smartfrz_default.pt"
FORMAT_VERSION = 1
REQUIRED_META = ("format_version", "tailor_size", "window", "norm")
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` unless ``value`` is made of str/int/float/bool/None, lists, tuples and str-keyed dicts."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"metadata key {where}.{k!r} must be a str (weights_only loading)")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"metadata {where} is a {type(value).__name__}; only plain types can be stored")


def _sizes(model: SmartFRZPredictor) -> dict[str, int]:
    """Layer sizes read from the weights (``mlp`` puts the Linear layers at 0, 2, 4)."""
    return {
        "hidden": int(model.mlp_k[0].out_features),
        "key_dim": int(model.mlp_k[4].out_features),
        "z_hidden": int(model.mlp_z[0].out_features),
    }


def save_predictor(path: str | os.PathLike, model: SmartFRZPredictor, *, metadata: Mapping[str, Any]) -> Path:
    """Write ``model`` and its metadata to ``path`` atomically; returns the path.

    ``metadata`` must give ``window`` (the model does not know it) and may give ``provenance`` (a dict) and
    any other plain values. ``tailor_size`` and ``norm`` are taken from the model (a conflicting value in
    ``metadata`` is an error).
    """
    meta = dict(metadata)
    if "window" not in meta:
        raise ValueError("metadata must give 'window': the number of snapshots the predictor was trained on")
    for key, value in (("tailor_size", int(model.tailor_size)), ("norm", model.norm)):
        if key in meta and meta[key] != value:
            raise ValueError(f"metadata {key}={meta[key]!r} differs from the model's {key}={value!r}")
        meta[key] = value
    meta["window"] = int(meta["window"])
    meta["scale"] = float(model.scale)
    meta.update(_sizes(model))
    meta["format_version"] = FORMAT_VERSION
    meta["provenance"] = dict(meta.get("provenance") or {})
    _check_plain(meta, "meta")
    payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, "meta": meta}
    return atomic_torch_save(payload, path)


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the payload of a predictor file (no model built); :class:`ConfigError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"SmartFRZ predictor weights {str(path)!r} do not exist (or are not a file); pass a file written by "
            f"freezebench.predictors.weights.save_predictor, e.g. policy.weights=path/to/predictor.pt"
        )
    payload = read_torch(path, what="SmartFRZ predictor weights", error=ConfigError,  # CRC32-checked
                         fix="the file is corrupt or not a predictor file: write it again with save_predictor")
    if not isinstance(payload, Mapping) or "state_dict" not in payload or "meta" not in payload:
        have = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise ConfigError(
            f"SmartFRZ predictor weights {str(path)!r} are not a predictor file: expected the keys 'state_dict' "
            f"and 'meta', found {have}; write the file with freezebench.predictors.weights.save_predictor"
        )
    meta = payload["meta"]
    missing = [k for k in REQUIRED_META if not isinstance(meta, Mapping) or k not in meta]
    if missing:
        raise ConfigError(
            f"SmartFRZ predictor weights {str(path)!r}: metadata lacks {', '.join(missing)}; write the file with "
            f"freezebench.predictors.weights.save_predictor"
        )
    if meta["format_version"] != FORMAT_VERSION:
        raise ConfigError(
            f"SmartFRZ predictor weights {str(path)!r} have format version {meta['format_version']!r}; this "
            f"freezebench reads version {FORMAT_VERSION} only: save the predictor again with this version"
        )
    if meta["norm"] not in NORM_MODES:
        raise ConfigError(
            f"SmartFRZ predictor weights {str(path)!r}: unknown normalisation {meta['norm']!r} "
            f"(known: {', '.join(NORM_MODES)})"
        )
    return {"state_dict": payload["state_dict"], "meta": dict(meta)}


def load_predictor(
    path: str | os.PathLike,
    *,
    tailor_size: int | None = None,  # expected tailor size (None: accept the file's)
    window: int | None = None,  # expected window (None: accept the file's)
    device: torch.device | str = "cpu",
) -> tuple[SmartFRZPredictor, dict[str, Any]]:
    """Build the predictor stored in ``path`` on ``device`` (in eval mode, no gradients) and return it with its
    metadata. Raises :class:`ConfigError` if the file is missing, unreadable or incomplete, or if its tailor
    size or window differ from the expected ones."""
    payload = read_weights_file(path)
    meta = payload["meta"]
    for key, want, fix in (
        ("tailor_size", tailor_size, "policy.tailor_size"),
        ("window", window, "policy.window"),
    ):
        if want is not None and int(meta[key]) != int(want):
            raise ConfigError(
                f"SmartFRZ predictor weights {str(path)!r} were trained with {key}={meta[key]}, but {key}={want} "
                f"was asked for: set {fix}={meta[key]}, or pass a predictor trained with {key}={want}"
            )
    try:
        model = SmartFRZPredictor(
            tailor_size=int(meta["tailor_size"]),
            hidden=int(meta.get("hidden", 256)),
            key_dim=int(meta.get("key_dim", 64)),
            z_hidden=int(meta.get("z_hidden", 32)),
            norm=str(meta["norm"]),
            scale=float(meta.get("scale", 1.0)),
        )
        model.load_state_dict(payload["state_dict"])
    except Exception as e:
        raise ConfigError(
            f"SmartFRZ predictor weights {str(path)!r} do not match their metadata ({type(e).__name__}: {e}); "
            f"write the file again with save_predictor"
        ) from e
    model = model.to(device).eval().requires_grad_(False)
    return model, meta
