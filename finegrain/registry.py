"""Registries: name -> builder, one per kind (pretrain methods, supcon losses, view recipes, samplers).

Each registry is declared here, at the bottom of the package, so configs can check a name when they
are built; its entries register themselves in their home package (`@PRETRAIN_METHODS.register("simclr")`
in finegrain/methods/), which is imported the first time the registry is asked for a name. So adding a
method is its own file plus a config field; nothing here or in a stage changes.
"""

from __future__ import annotations

import importlib
import inspect

from finegrain.errors import FinegrainError


class Registry:
    """A name -> entry table of one kind, filled by the modules of its `home` package.

    Args:
        kind: what an entry is, for messages ("pretrain method").
        home: the module whose import registers the built-in entries.
    """

    def __init__(self, kind: str, home: str):
        self.kind, self.home = kind, home
        self._entries: dict[str, object] = {}
        self._descriptions: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str):
        """Decorator: `@REGISTRY.register("name")` on a class or function adds it under `name`."""

        def add(entry):
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry, description: str | None = None) -> None:
        """Add `entry` under `name` (described by `description`, default its docstring's first line)."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        if description is None and (inspect.isclass(entry) or inspect.isroutine(entry)):
            description = (inspect.getdoc(entry) or "").split("\n", 1)[0].rstrip(".")
        self._descriptions[name] = description or ""

    def remove(self, name: str) -> None:
        """Forget `name` (tests that register their own entries clean up with this)."""
        self._entries.pop(name, None)
        self._descriptions.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.home)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._load()
        return list(self._entries)

    def get(self, name: str):
        """The entry registered as `name`; FinegrainError listing the choices otherwise."""
        self._load()
        if name not in self._entries:
            raise FinegrainError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def describe(self) -> str:
        """'name: description; ...' for help text."""
        return "; ".join(f"{n}: {self._descriptions[n]}" if self._descriptions[n] else n for n in self.names())


PRETRAIN_METHODS = Registry("pretrain method", home="finegrain.methods")
SUPCON_LOSSES = Registry("supcon loss", home="finegrain.methods")
VIEW_RECIPES = Registry("view recipe", home="finegrain.data.views")
SAMPLERS = Registry("sampler", home="finegrain.engine.sampler")
