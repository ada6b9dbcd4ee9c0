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

__all__ = ["DEFAULT_WEIGHTS", "DOMAINS", "FAMILY", "TEXT_FAMILY", "TEXT_WEIGHTS", "family_of", "FORMAT_VERSION", "WEIGHTS_DIR", "family_file", "installed_family",
           "select_weights", "save_predictor", "load_predictor", "read_weights_file"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: the shipped family, (window, tailor_size): the paper's Table 4 windows at tailor 1024 and its Table 5
#: tailor sizes at window 30, all trained from one collection (``freezebench predictor build``)
FAMILY = ((20, 1024), (30, 1024), (40, 1024), (50, 1024), (30, 512), (30, 2048), (30, 4096))


#: the shipped text family (predictors trained on BERT runs of the embedded text task,
#: ``freezebench predictor build --corpus text``): the paper's defaults only
TEXT_FAMILY = ((30, 1024),)
#: the domains of the shipped predictors: the modality of the models a family was trained on
DOMAINS = ("image", "text")


def family_of(domain: str) -> tuple[tuple[int, int], ...]:
    """The (window, tailor_size) members shipped for ``domain`` (``image``: :data:`FAMILY`; ``text``:
    :data:`TEXT_FAMILY`)."""
    if domain not in DOMAINS:
        raise ConfigError(f"unknown SmartFRZ predictor domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return FAMILY if domain == "image" else TEXT_FAMILY


def family_file(window: int, tailor_size: int, folder: str | os.PathLike | None = None, domain: str = "image") -> Path:
    """The file name of the family member for ``(window, tailor_size)``: ``smartfrz_w<W>_t<T>.pt`` (image)
    or ``smartfrz_text_w<W>_t<T>.pt`` (text)."""
    tag = "" if domain == "image" else f"{domain}_"
    return Path(folder or WEIGHTS_DIR) / f"smartfrz_{tag}w{int(window)}_t{int(tailor_size)}.pt"


#: the shipped default predictor: the paper's defaults, window 30 and tailor 1024 (image family)
DEFAULT_WEIGHTS = family_file(30, 1024)
#: the shipped text predictor (window 30, tailor 1024)
TEXT_WEIGHTS = family_file(30, 1024, domain="text")


def installed_family(folder: str | os.PathLike | None = None, domain: str = "image") -> list[tuple[int, int]]:
    """The (window, tailor_size) pairs of ``domain``'s family whose file is present."""
    return [wt for wt in family_of(domain) if family_file(*wt, folder, domain).is_file()]


def select_weights(window: int, tailor_size: int, *, any_window: bool = False,
                   folder: str | os.PathLike | None = None, domain: str = "image") -> Path:
    """The shipped predictor for ``policy.window`` and ``policy.tailor_size`` in ``domain`` (the modality of
    the model: ``image`` or ``text``): the member of that domain's family trained at both; with
    ``any_window`` the member at the same tailor size trained at the nearest window (window 30 first).
    :class:`ConfigError` naming the installed members of that domain when none matches."""
    have = installed_family(folder, domain)
    if (int(window), int(tailor_size)) in have:
        return family_file(window, tailor_size, folder, domain)
    if any_window:
        same = sorted((abs(w - 30), w) for w, t in have if t == int(tailor_size))
        if same:
            return family_file(same[0][1], tailor_size, folder, domain)
    shown = ", ".join(f"window={w} tailor_size={t}" for w, t in have) or "none"
    where = "" if domain == "image" else f" {domain}"
    raise ConfigError(
        f"no shipped{where} SmartFRZ predictor for policy.window={window} and policy.tailor_size={tailor_size} "
        f"(shipped{where}: {shown}); use one of those, pass your own file with policy.weights=path/to/predictor.pt, "
        f"or set policy.any_window=true to read this window with a predictor trained at another one"
        + ("" if domain == "image" else "; policy.domain=image uses the image family (trained on CNNs)")
    )
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


def save_predictor(path: str | os.PathLike, model: SmartFRZPredictor, *, metadata: Mapping[str, Any],
                   half: bool = False) -> Path:
    """Write ``model`` and its metadata to ``path`` atomically; returns the path. ``half``: store the
    weights in float16 (half the file; :func:`load_predictor` computes in float32 either way).

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
    meta["storage_dtype"] = "float16" if half else "float32"
    dtype = torch.float16 if half else None
    payload = {"state_dict": {k: v.detach().cpu().to(dtype or v.dtype).clone() for k, v in model.state_dict().items()},
               "meta": meta}
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
        model.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    except Exception as e:
        raise ConfigError(
            f"SmartFRZ predictor weights {str(path)!r} do not match their metadata ({type(e).__name__}: {e}); "
            f"write the file again with save_predictor"
        ) from e
    model = model.to(device).eval().requires_grad_(False)
    return model, meta
