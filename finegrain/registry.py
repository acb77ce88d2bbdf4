"""Registries: name -> builder, one per kind (pretrain methods, supcon losses, view recipes, samplers).

Each registry is declared here, at the bottom of the package, so configs can check a name when they
are built; its entries register themselves in their home package (`@PRETRAIN_METHODS.register("simclr")`
in finegrain/methods/), which is imported the first time the registry is asked for a name. So adding a
method is its own file plus a config field; nothing here or in a stage changes.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

from finegrain.errors import FinegrainError


class Registry:
    """A name -> entry table of one kind, filled by the modules of its `home` package.

    Args:
        kind: what an entry is, for messages ("pretrain method").
        home: the module whose import registers the built-in entries.
        declared_as: this registry's name in `home`'s `@NAME.register("entry")` decorators: `names()` and
            `describe()` then read the entries from `home`'s source instead of importing it (help text
            needs no torch); `get()` imports it.
    """

    def __init__(self, kind: str, home: str, declared_as: str | None = None):
        self.kind, self.home, self.declared_as = kind, home, declared_as
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
        """Registered names, in registration order (declared ones first while `home` is not imported)."""
        return list(self._catalogue())

    def get(self, name: str):
        """The entry registered as `name`; FinegrainError listing the choices otherwise."""
        self._load()
        if name not in self._entries:
            raise FinegrainError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def describe(self) -> str:
        """'name: description; ...' for help text."""
        return "; ".join(f"{n}: {d}" if d else n for n, d in self._catalogue().items())

    def _catalogue(self) -> dict[str, str]:
        """name -> description: declared in `home`'s source (not imported yet) plus what is registered."""
        if self.declared_as is None or self._loaded:
            self._load()
            return dict(self._descriptions)
        return {**declared_entries(self.home, self.declared_as), **self._descriptions}


def declared_entries(home: str, registry_name: str) -> dict[str, str]:
    """name -> first docstring line of each class or function decorated `@registry_name.register("name")`
    in the module or package `home`, read with `ast` (nothing is imported but `home`'s parent packages).

    A package's modules are read in the order its `__init__.py` first names them (the order its import
    registers them in), then by file name.
    """
    spec = importlib.util.find_spec(home)
    if spec.submodule_search_locations:
        init = Path(spec.origin).read_text()
        files = sorted(Path(p) for d in spec.submodule_search_locations for p in Path(d).glob("*.py"))
        files.sort(key=lambda f: init.find(f.stem) if f.stem in init else len(init))
    else:
        files = [Path(spec.origin)]
    found: dict[str, str] = {}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            for decorator in getattr(node, "decorator_list", ()):
                name = _registered_name(decorator, registry_name)
                if name is not None:
                    found[name] = (ast.get_docstring(node) or "").split("\n", 1)[0].rstrip(".")
    return found


def _registered_name(decorator: ast.expr, registry_name: str) -> str | None:
    """"x" for a decorator `registry_name.register("x")`, else None."""
    if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "register" and isinstance(decorator.func.value, ast.Name)
            and decorator.func.value.id == registry_name and decorator.args
            and isinstance(decorator.args[0], ast.Constant)):
        return decorator.args[0].value
    return None


PRETRAIN_METHODS = Registry("pretrain method", home="finegrain.methods", declared_as="PRETRAIN_METHODS")
SUPCON_LOSSES = Registry("supcon loss", home="finegrain.methods", declared_as="SUPCON_LOSSES")
VIEW_RECIPES = Registry("view recipe", home="finegrain.data.views")
SAMPLERS = Registry("sampler", home="finegrain.engine.sampler", declared_as="SAMPLERS")
