"""Registries: name -> builder, one per kind (pretrain methods, supcon losses, view recipes, samplers).

Each registry is declared here, at the bottom of the package, so configs can check a name when they
are built; its entries register themselves in their home package (`@PRETRAIN_METHODS.register("simclr")`
in finegrain/methods/), which is imported the first time the registry is asked for a name. So adding a
method is its own file (its options in it, as the `Options` dataclass of its class); nothing here, in
the config or in a stage changes.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import NamedTuple

from finegrain.errors import FinegrainError


class OptionSpec(NamedTuple):
    """One option an entry declares in its `Options` dataclass: its type ("float"), default and help."""

    type: str
    default: object
    help: str


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

    def options(self) -> dict[str, dict[str, OptionSpec]]:
        """name -> {option: OptionSpec} of every entry's `Options` (read from `home`'s source until loaded)."""
        declared = {}
        if self.declared_as is None or self._loaded:
            self._load()
        else:
            declared = declared_options(self.home, self.declared_as)
        return {**declared, **{name: live_options(entry) for name, entry in self._entries.items()}}

    def _catalogue(self) -> dict[str, str]:
        """name -> description: declared in `home`'s source (not imported yet) plus what is registered."""
        if self.declared_as is None or self._loaded:
            self._load()
            return dict(self._descriptions)
        return {**declared_entries(self.home, self.declared_as), **self._descriptions}


def live_options(entry) -> dict[str, OptionSpec]:
    """option -> OptionSpec of `entry.Options` (a dataclass; none if the entry has no Options)."""
    options = getattr(entry, "Options", None)
    if options is None:
        return {}
    return {f.name: OptionSpec(str(f.type), f.default, f.metadata.get("help", "")) for f in dataclasses.fields(options)}


def _source_trees(home: str) -> list[ast.Module]:
    """The parsed files of the module or package `home`, a package's in the order its `__init__.py` first
    names them (the order its import registers them in), then by file name."""
    spec = importlib.util.find_spec(home)
    if spec.submodule_search_locations:
        init = Path(spec.origin).read_text()
        files = sorted(Path(p) for d in spec.submodule_search_locations for p in Path(d).glob("*.py"))
        files.sort(key=lambda f: init.find(f.stem) if f.stem in init else len(init))
    else:
        files = [Path(spec.origin)]
    return [ast.parse(file.read_text(), str(file)) for file in files]


def _registered_classes(home: str, registry_name: str):
    """(name, ast node) of each class or function decorated `@registry_name.register("name")` in `home`."""
    for tree in _source_trees(home):
        for node in ast.walk(tree):
            for decorator in getattr(node, "decorator_list", ()):
                name = _registered_name(decorator, registry_name)
                if name is not None:
                    yield name, node


def declared_entries(home: str, registry_name: str) -> dict[str, str]:
    """name -> first docstring line of each entry registered in `home`'s source, read with `ast` (nothing is
    imported but `home`'s parent packages)."""
    return {name: (ast.get_docstring(node) or "").split("\n", 1)[0].rstrip(".")
            for name, node in _registered_classes(home, registry_name)}


def declared_options(home: str, registry_name: str) -> dict[str, dict[str, OptionSpec]]:
    """name -> {option: OptionSpec} of each entry registered in `home`'s source, read with `ast`.

    An entry's options are the fields of the `Options` class in its body (or `Options = SomeOptions`),
    else its base classes' in `home`; an Options class inherits the fields of its bases defined at the top
    of a file in `home`. Fields are `name: type = option(default, "help", ...)` with literal values.
    """
    classes = {node.name: node for tree in _source_trees(home) for node in tree.body if isinstance(node, ast.ClassDef)}
    return {name: _option_fields(_options_class(node, classes), classes)
            for name, node in _registered_classes(home, registry_name)}


def _options_class(node, classes: dict) -> ast.ClassDef | None:
    """The `Options` class of class `node` (in its body, or inherited from a base class in `classes`)."""
    for stmt in getattr(node, "body", ()):
        if isinstance(stmt, ast.ClassDef) and stmt.name == "Options":
            return stmt
        if (isinstance(stmt, ast.Assign) and [ast.unparse(t) for t in stmt.targets] == ["Options"]
                and isinstance(stmt.value, ast.Name)):
            return classes.get(stmt.value.id)
    for base in getattr(node, "bases", ()):
        found = _options_class(classes.get(ast.unparse(base)), classes)
        if found is not None:
            return found
    return None


def _option_fields(node: ast.ClassDef | None, classes: dict) -> dict[str, OptionSpec]:
    """The option fields of Options class `node`, its bases' first (in dataclass order)."""
    if node is None:
        return {}
    fields: dict[str, OptionSpec] = {}
    for base in reversed(node.bases):
        fields.update(_option_fields(classes.get(ast.unparse(base)), classes))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.value, ast.Call) and stmt.value.args:
            args = [ast.literal_eval(a) for a in stmt.value.args[:2]]
            fields[stmt.target.id] = OptionSpec(ast.unparse(stmt.annotation), args[0], args[1] if len(args) > 1 else "")
    return fields


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
