"""The layers of shared/ARCHITECTURE.md hold: every `finegrain` import (function-level ones too) points down.

    cli.py, __main__  ->  pipeline.py  ->  stages/, export/  ->  engine/, eval/, curation/, report/, features/, methods/,
                                                        tracking.py, artifacts.py, lineage.py
                      ->  models/, losses/, data/  ->  config.py, registry.py, dist.py, errors.py, fsutil.py, runtime/

eval/ (measurement), curation/ and report/ share features/; none of them imports engine/, and features/
imports none of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import finegrain

PACKAGE = Path(finegrain.__file__).parent
LEVELS = {
    "errors": 0, "fsutil": 0, "progress": 0, "dist": 0, "registry": 0, "config": 0, "__init__": 0, "runtime": 0,
    "models": 1, "losses": 1, "data": 1,
    "engine": 2, "eval": 2, "curation": 2, "report": 2, "features": 2, "methods": 2, "tracking": 2, "artifacts": 2,
    "lineage": 2,
    "stages": 3, "review": 3, "export": 3,
    "pipeline": 4,
    "cli": 5, "__main__": 5,
}
# Pairs on the same or a lower level that must still not meet (importer part -> imported part).
FORBIDDEN = {("data", "models"), ("models", "data"), ("eval", "engine"), ("engine", "methods"), ("engine", "eval"),
             ("methods", "engine"), ("methods", "eval"), ("methods", "data"),
             ("curation", "engine"), ("report", "engine"), ("features", "engine"),
             ("features", "eval"), ("features", "curation"), ("features", "report"),
             ("eval", "curation"), ("eval", "report"), ("report", "eval"), ("report", "curation"),
             ("curation", "report"), ("review", "engine"), ("review", "stages")}
LOSSES_MAY_IMPORT = {"losses", "dist", "errors"}
RUNTIME_MAY_IMPORT = {"runtime"}  # the runner is copied into export folders as it is: it needs no finegrain


def _part(module: str) -> str:
    """finegrain.data.views -> data; finegrain.config -> config; finegrain -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, set[str]]]:
    """(finegrain module, imported names) for every import in the file; the names matter for `from finegrain import x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, set()) for a in node.names if a.name.split(".")[0] == "finegrain"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "finegrain":
            found.append((node.module, {a.name for a in node.names}))
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield path, ".".join(rel.parts)


@pytest.mark.parametrize("path,module", list(_modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_point_down(path, module):
    me = _part(module) if module != "finegrain.__init__" else "__init__"
    assert me in LEVELS, f"{module}: add its package to LEVELS (and to shared/ARCHITECTURE.md)"
    for imported, names in _imports(path):
        targets = {f"{imported}.{n}" for n in names if imported == "finegrain"} or {imported}
        for target in targets:
            other = _part(target)
            if other == me or other not in LEVELS and imported == "finegrain":
                continue
            assert LEVELS[other] <= LEVELS[me], f"{module} imports {target}: an import running up the layers"
            assert (me, other) not in FORBIDDEN, f"{module} imports {target}: {me}/ and {other}/ must not meet"
            if me == "losses":
                assert other in LOSSES_MAY_IMPORT, f"{module} imports {target}: a loss knows no model, data or config"
            if me == "runtime":
                assert other in RUNTIME_MAY_IMPORT, f"{module} imports {target}: the runtime stands alone (no torch)"
            if LEVELS[other] == LEVELS[me] and me != other and LEVELS[me] == 1:
                raise AssertionError(f"{module} imports {target}: data/, models/ and losses/ stand side by side")


@pytest.mark.parametrize("library,owner", [("typer", "cli"), ("wandb", "tracking")])
def test_only_one_module_imports(library, owner):
    for path, module in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == library for n in names):
                assert _part(module) == owner, f"{module} imports {library}; only {owner} may"
