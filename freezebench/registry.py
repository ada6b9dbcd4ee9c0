"""Name -> factory registries for policies, models and datasets.

Built-in models and datasets register themselves in :mod:`freezebench.zoo.models` and :mod:`freezebench.zoo.data`.
Policies are plug-ins found through the Python entry-point group ``freezebench.policies`` (this package's
own baselines and SmartFRZ included), so the core never imports the policy zoo and a third-party package
adds a policy by declaring, in its ``pyproject.toml``::

    [project.entry-points."freezebench.policies"]
    my_policy = "my_package.module:MyPolicy"

Entry-point groups ``freezebench.models`` and ``freezebench.datasets`` work the same way.

Listing names imports nothing: policies come from entry-point metadata, and the built-in models and datasets
from the name manifests below (``BUILTIN_MODELS``, ``BUILTIN_DATASETS``), so ``freezebench list`` and
``freezebench --help`` start without torch, torchvision or the zoo. Only :meth:`Registry.get` imports the
module that defines a name. ``tests/test_startup.py`` checks that the manifests match what the zoo registers.
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

    ``builtin_modules`` are imported lazily on first :meth:`get` (their decorators register their contents);
    ``builtin_names`` is the manifest of the names they register, so that :meth:`names` needs no import;
    ``group`` is the entry-point group, read (metadata only, nothing imported) on first look-up.
    """

    def __init__(self, kind: str, group: str | None = None, builtin_modules: tuple[str, ...] = (),
                 builtin_names: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._builtin_names = builtin_names
        self._items: dict[str, T] = {}
        self._entry_points: dict[str, Any] = {}
        self._scanned = False
        self._loaded = False

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator: ``@REG.register("name")``."""

        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise FreezebenchError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    def _scan(self) -> None:
        """Read the entry-point group's metadata (imports nothing)."""
        if self._scanned:
            return
        self._scanned = True
        if self.group:
            for ep in entry_points(group=self.group):
                self._entry_points.setdefault(ep.name, ep)

    def _load(self) -> None:
        self._scan()
        if self._loaded:
            return
        self._loaded = True
        for mod in self._builtin_modules:
            importlib.import_module(mod)

    def names(self) -> list[str]:
        """Every known name, sorted; imports no module when the built-in modules come with a manifest."""
        if self._builtin_names or not self._builtin_modules:
            self._scan()
            builtin: set[str] = set(self._builtin_names)
        else:
            self._load()
            builtin = set()
        return sorted(builtin | set(self._items) | set(self._entry_points))

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            ep = self._entry_points.get(name)
            if ep is None:
                known = sorted(set(self._builtin_names) | set(self._items) | set(self._entry_points))
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


#: the names :mod:`freezebench.zoo.models` registers (kept in step by tests/test_startup.py)
BUILTIN_MODELS = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "vgg11_bn", "mobilenet_v2",
                  "deit_tiny", "tiny", "mlp")
#: the names :mod:`freezebench.zoo.data` registers
BUILTIN_DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder", "glue", "text_demo")
#: the names :mod:`freezebench.zoo.text` registers (text classifiers; the ``nlp`` extra)
BUILTIN_TEXT_MODELS = ("bert_tiny", "bert_mini", "bert_small", "hf")

POLICIES: Registry[Any] = _policy_registry()
MODELS: Registry[Callable[..., Any]] = Registry(
    "model", group="freezebench.models", builtin_modules=("freezebench.zoo.models",), builtin_names=BUILTIN_MODELS
)
DATASETS: Registry[Callable[..., Any]] = Registry(
    "dataset", group="freezebench.datasets", builtin_modules=("freezebench.zoo.data",),
    builtin_names=BUILTIN_DATASETS,
)
#: text classifiers (``model.name`` on text data): a registry of their own, since their factories take a text
#: specification instead of image sizes (:func:`freezebench.zoo.text.build_text_model`)
TEXT_MODELS: Registry[Callable[..., Any]] = Registry(
    "text model", group="freezebench.text_models", builtin_modules=("freezebench.zoo.text",),
    builtin_names=BUILTIN_TEXT_MODELS,
)
