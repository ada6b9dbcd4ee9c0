"""Search spaces: a YAML file naming config keys and the values to try (format: the package docstring).

A space is data (:class:`Space`); :func:`load_space` reads one by name (``sweeps/spaces/<name>.yaml``) or from
a path, validates it and expands registry references (``{registry: policies}``). Nothing here runs training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezebench.errors import FreezebenchError, did_you_mean

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
SAMPLERS = ("grid", "tpe")
OBJECTIVES = {"accuracy": ("maximize",), "accuracy+tflops": ("maximize", "minimize")}
SPACE_KEYS = ("name", "description", "overrides", "params", "sampler", "n_trials", "objective", "seeds")
RANGE_KEYS = ("type", "low", "high", "step", "log", "choices", "registry", "exclude")
MAX_GRID = 10_000  # grid points (before seeds) a space may expand to


class SweepError(FreezebenchError):
    """A search space, study or storage the user has to fix."""


Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Param:
    """One config key and the values it takes: a list (categorical) or an int/float range."""

    key: str
    kind: str  # categorical | int | float
    choices: tuple[Scalar, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_grid(self) -> bool:
        """Can the values be enumerated? Lists, int ranges and float ranges with a step."""
        return self.kind != "float" or self.step is not None

    def grid_values(self) -> list[Scalar]:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            raise SweepError(f"param {self.key!r}: a float range without a step has no grid; use sampler: tpe")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 10) for i in range(n)]

    def distribution(self) -> Any:
        import optuna.distributions as d

        if self.kind == "categorical":
            return d.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def suggest(self, trial: Any) -> Scalar:
        """The trial's value (an enqueued grid trial returns its fixed value)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        return {"type": self.kind, "low": self.low, "high": self.high, "step": self.step, "log": self.log}


@dataclass(frozen=True)
class Space:
    name: str
    params: tuple[Param, ...]
    description: str = ""
    overrides: tuple[str, ...] = ()
    sampler: str = "grid"
    n_trials: int | None = None
    objective: str = "accuracy"
    seeds: tuple[int, ...] = (0,)
    source: str = ""  # the file it came from
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def directions(self) -> list[str]:
        return list(OBJECTIVES[self.objective])

    def grid(self) -> list[dict[str, Scalar]]:
        """Every point of a grid space, in order (the last param varies fastest)."""
        import itertools

        keys = [p.key for p in self.params]
        return [dict(zip(keys, vals)) for vals in itertools.product(*(p.grid_values() for p in self.params))]

    def trial_overrides(self, point: dict[str, Scalar]) -> list[str]:
        """The config overrides of one trial: the space's (with ``{key}`` replaced by the point's value of
        the swept ``key``, e.g. ``policy.weights=preds/w{policy.window}.pt``), then the point's own."""
        return [expand(o, point) for o in self.overrides] + [override(k, v) for k, v in point.items()]

    def spec(self) -> dict[str, Any]:
        """What defines the sweep's results (stored on the study; a re-run must match it)."""
        return {"params": {p.key: p.to_dict() for p in self.params}, "overrides": list(self.overrides),
                "sampler": self.sampler, "n_trials": self.n_trials, "objective": self.objective,
                "seeds": list(self.seeds)}

    def with_(self, *, overrides: list[str] | None = None, seeds: list[int] | None = None) -> Space:
        from dataclasses import replace

        s = replace(self, overrides=tuple(self.overrides) + tuple(overrides or ()))
        if seeds is not None:
            if not seeds:
                raise SweepError("--seeds needs at least one seed")
            s = replace(s, seeds=tuple(int(x) for x in seeds))
        s._check_seeds()
        return s

    def _check_seeds(self) -> None:
        if self.sampler == "tpe" and len(self.seeds) != 1:
            raise SweepError(
                f"space {self.name!r}: sampler tpe runs each sampled point once, with one seed; got seeds "
                f"{list(self.seeds)}. Give one seed (--seeds 0) or put trainer.seed in params"
            )


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def spec_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def _find(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise SweepError(f"space file {name_or_path!r} not found")
        return p
    c = SPACES_DIR / f"{name_or_path}.yaml"
    if c.is_file():
        return c
    known = available_spaces()
    raise SweepError(f"unknown space {name_or_path!r}.{did_you_mean(name_or_path, known)} "
                     f"Spaces: {', '.join(known)}; or give the path of a YAML file")


def _registry_names(key: str, spec: dict[str, Any]) -> list[str]:
    from freezebench.registry import DATASETS, MODELS, POLICIES

    regs = {"policies": POLICIES, "models": MODELS, "datasets": DATASETS}
    reg = spec["registry"]
    if reg not in regs:
        raise SweepError(f"param {key!r}: registry must be one of {', '.join(regs)}, got {reg!r}")
    names = regs[reg].names()
    exclude = list(spec.get("exclude") or [])
    for x in exclude:
        if x not in names:
            raise SweepError(f"param {key!r}: exclude names {x!r}, which is not in the {reg} registry "
                             f"({', '.join(names)})")
    return [n for n in names if n not in exclude]


def _number(key: str, what: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SweepError(f"param {key!r}: {what} must be a number, got {v!r}")
    return v


def parse_param(key: str, spec: Any) -> Param:
    if not isinstance(key, str) or not key:
        raise SweepError(f"param names must be config keys such as policy.window, got {key!r}")
    scalar = (str, int, float, bool, type(None))
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"param {key!r}: empty list of values")
        bad = [v for v in spec if not isinstance(v, scalar)]
        if bad:
            raise SweepError(f"param {key!r}: values must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, spec))) != len(spec):
            raise SweepError(f"param {key!r}: values repeat: {spec}")
        return Param(key, "categorical", tuple(spec))
    if not isinstance(spec, dict):
        raise SweepError(f"param {key!r}: give a list of values or a mapping {{type, low, high[, step, log]}}, "
                         f"got {spec!r}")
    unknown = [k for k in spec if k not in RANGE_KEYS]
    if unknown:
        raise SweepError(f"param {key!r}: unknown key {unknown[0]!r}.{did_you_mean(str(unknown[0]), RANGE_KEYS)} "
                         f"Allowed: {', '.join(RANGE_KEYS)}")
    if "registry" in spec:
        return Param(key, "categorical", tuple(_registry_names(key, spec)))
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind == "categorical":
        return parse_param(key, list(spec.get("choices") or []))
    if kind not in ("int", "float"):
        raise SweepError(f"param {key!r}: type must be int, float or categorical, got {kind!r}")
    for k in ("low", "high"):
        if k not in spec:
            raise SweepError(f"param {key!r}: a {kind} range needs {k}")
    low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
    step = spec.get("step")
    log = bool(spec.get("log", False))
    if step is not None:
        step = _number(key, "step", step)
        if step <= 0:
            raise SweepError(f"param {key!r}: step must be positive, got {step}")
    if kind == "int":
        if int(low) != low or int(high) != high or (step is not None and int(step) != step):
            raise SweepError(f"param {key!r}: an int range needs whole numbers for low, high and step")
        low, high, step = int(low), int(high), (int(step) if step is not None else None)
    else:
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    if low > high:
        raise SweepError(f"param {key!r}: low ({low}) is above high ({high})")
    if log:
        if low <= 0:
            raise SweepError(f"param {key!r}: a log range needs low > 0, got {low}")
        if step is not None and not (kind == "int" and step == 1):
            raise SweepError(f"param {key!r}: log and step cannot be combined")
    return Param(key, kind, low=low, high=high, step=step, log=log)


def parse_space(data: Any, name: str, source: str = "") -> Space:
    if not isinstance(data, dict):
        raise SweepError(f"space {source or name}: the file must be a mapping with at least 'params'")
    unknown = [k for k in data if k not in SPACE_KEYS]
    if unknown:
        raise SweepError(f"space {source or name}: unknown key {unknown[0]!r}."
                         f"{did_you_mean(str(unknown[0]), SPACE_KEYS)} Allowed: {', '.join(SPACE_KEYS)}")
    name = str(data.get("name") or name)
    params_spec = data.get("params")
    if not isinstance(params_spec, dict) or not params_spec:
        raise SweepError(f"space {name!r}: 'params' must map config keys to values (e.g. policy.window: [20, 30])")
    params = tuple(parse_param(k, v) for k, v in params_spec.items())
    sampler = data.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise SweepError(f"space {name!r}: sampler must be grid or tpe, got {sampler!r}")
    objective = data.get("objective", "accuracy")
    if objective not in OBJECTIVES:
        raise SweepError(f"space {name!r}: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}."
                         f"{did_you_mean(str(objective), OBJECTIVES)}")
    overrides = data.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepError(f"space {name!r}: overrides must be a list of key=value strings, got {overrides!r}")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise SweepError(f"space {name!r}: seeds must be a list of integers, got {seeds!r}")
    n_trials = data.get("n_trials")
    if sampler == "grid":
        not_grid = [p.key for p in params if not p.is_grid]
        if not_grid:
            raise SweepError(f"space {name!r}: param {not_grid[0]!r} is a float range without a step, which has no "
                             f"grid: give it a step, or use sampler: tpe with n_trials")
        if n_trials is not None:
            raise SweepError(f"space {name!r}: n_trials is for sampler tpe; a grid runs every point once")
        size = math.prod(len(p.grid_values()) for p in params)
        if size > MAX_GRID:
            raise SweepError(f"space {name!r}: the grid has {size} points (limit {MAX_GRID}); use sampler: tpe")
    else:
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            raise SweepError(f"space {name!r}: sampler tpe needs n_trials (a positive integer), got {n_trials!r}")
    space = Space(name=name, params=params, description=str(data.get("description") or ""),
                  overrides=tuple(overrides), sampler=sampler, n_trials=n_trials, objective=objective,
                  seeds=tuple(seeds), source=source)
    space._check_seeds()
    return space


def load_space(name_or_path: str | Space) -> Space:
    """A space by name (``sweeps/spaces/<name>.yaml``) or YAML path; :class:`SweepError` on bad input."""
    if isinstance(name_or_path, Space):
        return name_or_path
    import yaml

    path = _find(str(name_or_path))
    try:
        from freezebench.fileio import read_text_file

        data = yaml.safe_load(read_text_file(path, what="space file", error=SweepError))
    except yaml.YAMLError as e:
        raise SweepError(f"space file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_space(data, path.stem, str(path))


def expand(text: str, point: dict[str, Scalar]) -> str:
    """``{key}`` -> the point's value of ``key`` (swept keys only; OmegaConf's ``${...}`` is left alone)."""
    import re

    return re.sub(r"(?<!\$)\{([^{}]+)\}", lambda m: str(point.get(m.group(1), m.group(0))), text)


def override(key: str, value: Scalar) -> str:
    """``key=value`` in OmegaConf dot-list syntax."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    return f"{key}={value}"
