"""Name -> factory registries for policies, models and datasets.

Built-in models and datasets register themselves in :mod:`freezebench.zoo.models` and :mod:`freezebench.zoo.data`.
Policies are plug-ins found through the Python entry-point group ``freezebench.policies`` (this package's
own baselines and SmartFRZ included), so the core never imports the policy zoo and a third-party package
adds a policy by declaring, in its ``pyproject.toml``::

    [project.entry-points."freezebench.policies"]
    my_policy = "my_package.module:MyPolicy"

Entry-point groups ``freezebench.models`` and ``freezebench.datasets`` work the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from .errors import FreezebenchError, UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of named objects, filled by decorators, an entry-point group and built-in modules.

    ``builtin_modules`` are imported lazily on first look-up (their decorators register their contents);
    ``group`` is the entry-point group scanned on first look-up.
    """

    def __init__(self, kind: str, group: str | None = None, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._items: dict[str, T] = {}
        self._entry_points: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator: ``@REG.register("name")``."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise FreezebenchError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self._builtin_modules:
            importlib.import_module(mod)
        if self.group:
            for ep in entry_points(group=self.group):
                self._entry_points.setdefault(ep.name, ep)

    def names(self) -> list[str]:
        self._load()
        return sorted(set(self._items) | set(self._entry_points))

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            ep = self._entry_points.get(name)
            if ep is None:
                known = self.names()
                raise UnknownNameError(
                    f"unknown {self.kind} {name!r}.{did_you_mean(name, known)} Known {self.kind} names: {', '.join(known)}"
                )
            try:
                self._items[name] = ep.load()
            except Exception as e:  # a broken plug-in must not look like an unknown name
                raise FreezebenchError(f"{self.kind} {name!r} failed to load from {ep.value}: {e}") from e
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _policy_registry() -> Registry[Any]:
    return Registry("policy", group="freezebench.policies")


POLICIES: Registry[Any] = _policy_registry()
MODELS: Registry[Callable[..., Any]] = Registry(
    "model", group="freezebench.models", builtin_modules=("freezebench.zoo.models",)
)
DATASETS: Registry[Callable[..., Any]] = Registry(
    "dataset", group="freezebench.datasets", builtin_modules=("freezebench.zoo.data",)
)
