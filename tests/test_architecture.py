"""The package's shape: layers, no import cycles, core free of transformers, small modules.

Every module under ``src/permsparse`` is parsed with :mod:`ast`; every import counts,
function-local ones included (a late import is still a dependency). What each layer may
import from the package (:data:`ALLOWED`), bottom up:

* ``_optional``, ``_version``, ``io.atomic`` (and ``io/__init__``): nothing (stdlib only)
* ``core``: core, ``_optional``;  ``config``: core
* ``data``: core, config, io.atomic;  ``models``: and data;  ``train``: and models
* ``io`` (plan, export): core, config, data, models, io.atomic
* ``pipeline``, ``experimental``: all of the above
* ``api``, ``evaluate``, ``report``, ``demo``: all of the above and one another
* ``permsparse/__init__`` (the public names): all but the CLI;  ``cli``: anything

Nothing imports ``cli``. ``_optional`` (the one place an optional import fails) is open to all.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "permsparse"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

_BASE = {"core", "optional"}
_BELOW_PIPELINE = _BASE | {"config", "data", "models", "train", "io", "atomic"}
#: layer -> the layers its modules may import (besides the standard library and third parties).
ALLOWED: dict[str, set[str]] = {
    "optional": set(),
    "atomic": {"atomic"},
    "core": _BASE,
    "config": _BASE | {"config"},
    "data": _BASE | {"data", "config", "atomic"},
    "models": _BASE | {"models", "config", "data", "atomic"},
    "train": _BASE | {"train", "config", "models", "data", "atomic"},
    "io": _BASE | {"io", "config", "models", "data", "atomic"},
    "pipeline": _BELOW_PIPELINE | {"pipeline"},
    "experimental": _BELOW_PIPELINE | {"experimental"},
    "app": _BELOW_PIPELINE | {"pipeline", "experimental", "app"},
    "facade": _BELOW_PIPELINE | {"pipeline", "experimental", "app"},
    "cli": _BELOW_PIPELINE | {"pipeline", "experimental", "app", "facade", "cli"},
}
#: The first name below ``permsparse`` -> its layer (``io`` is split in :func:`layer_of`).
_TOP = {"_optional": "optional", "_version": "optional", "core": "core", "config": "config", "data": "data",
        "models": "models", "train": "train", "pipeline": "pipeline", "experimental": "experimental",
        "api": "app", "evaluate": "app", "report": "app", "demo": "app", "cli": "cli", "__main__": "cli"}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (``None``: not classified yet)."""
    parts = module.split(".")[1:]
    if not parts:
        return "facade"
    if parts[0] == "io":
        # Importing io.atomic runs io/__init__ first: it must stay as bare as io.atomic.
        return "atomic" if parts[1:] in ([], ["atomic"]) else "io"
    return _TOP.get(parts[0])


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@lru_cache(maxsize=None)
def tree(module: str) -> ast.Module:
    return ast.parse(modules()[module].read_text(encoding="utf-8"), filename=str(modules()[module]))


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    is_package = modules()[module].name == "__init__.py"
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attribute``) lies in."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


@lru_cache(maxsize=None)
def imports(module: str) -> dict[str, int]:
    """The package's modules that ``module`` imports anywhere (function-local included),
    with the line of the first such import."""
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        target = _owner(name)
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "permsparse":
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if source.split(".")[0] != "permsparse":
                continue
            if source not in modules():
                found.setdefault(f"{source} (missing)", node.lineno)
                continue
            for alias in node.names:  # ``from permsparse.train import distributed`` names a module
                add(f"{source}.{alias.name}", node.lineno)
    return found


def third_party(module: str) -> set[str]:
    """Top-level names of the non-package modules that ``module`` imports anywhere."""
    out = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {"permsparse"}


# -- the analysis itself is right -------------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """``write({relative path: source})`` builds a package the checks then read instead."""
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "SRC", tmp_path)
    monkeypatch.setattr(here, "PACKAGE", tmp_path / "permsparse")

    def write(files: dict[str, str]) -> None:
        for rel, source in files.items():
            path = tmp_path / "permsparse" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source)
        for cached in (modules, tree, imports):
            cached.cache_clear()

    yield write
    for cached in (modules, tree, imports):
        cached.cache_clear()


def test_the_parser_sees_late_relative_and_submodule_imports(fake_package):
    fake_package({"__init__.py": "", "core/__init__.py": "", "train/__init__.py": "", "train/distributed.py": "",
                  "api.py": "", "core/pattern.py": "def f():\n    from ..api import prune\n",
                  "models/__init__.py": "from permsparse.train import distributed as dist\nfrom . import sites\n",
                  "models/sites.py": ""})
    assert imports("permsparse.core.pattern") == {"permsparse.api": 2}
    assert set(imports("permsparse.models")) == {"permsparse.train.distributed", "permsparse.models.sites"}
    assert layer_violations() == ["permsparse.core.pattern:2 (core) imports permsparse.api (app)",
                                  "permsparse.models:1 (models) imports permsparse.train.distributed (train)"]
    found = cycles()
    assert not found, "\n".join(map(str, found))
    fake_package({"api.py": "import permsparse.core.pattern\n"})
    assert cycles() == [["permsparse.api", "permsparse.core.pattern", "permsparse.api"]]


def test_the_size_checks_see_long_modules_and_functions(fake_package):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    fake_package({"__init__.py": "", "short.py": f"def f():\n{body[: body.rindex(chr(10))]}\n",
                  "long.py": f"def g():\n{body}\n" + "\n" * MAX_MODULE_LINES})
    assert long_functions() == [f"permsparse.long:1 g: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_modules() == [f"permsparse.long: {MAX_MODULE_LINES + MAX_FUNCTION_LINES + 1} lines"]


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_every_import_names_a_module_that_exists():
    missing = [f"{m}:{line} imports {target}" for m in modules() for target, line in imports(m).items()
               if target.endswith("(missing)")]
    assert not missing, "\n".join(missing)


# -- (a) no cycles ----------------------------------------------------------------------------


def cycles() -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected group of modules."""
    graph = {m: sorted(t for t in imports(m) if t in modules()) for m in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(_closed_path(graph, set(group)))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _closed_path(graph: dict[str, list[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module, for the message."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    return paths[v] + [start]
                if w in group and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - Tarjan said there is one


def test_no_import_cycles():
    found = cycles()
    assert not found, "\n".join(map(str, found))


# -- (b) the layers -----------------------------------------------------------------------------


def layer_violations() -> list[str]:
    out = []
    for module in modules():
        layer = layer_of(module)
        for target, line in sorted(imports(module).items()):
            if target in modules() and layer_of(target) not in ALLOWED.get(layer, set()):
                out.append(f"{module}:{line} ({layer}) imports {target} ({layer_of(target)})")
    return out


def test_layers():
    found = layer_violations()
    assert not found, "\n".join(map(str, found))


def test_core_and_the_stdlib_layers_import_no_model_library():
    heavy = {"transformers", "accelerate", "datasets", "gguf", "matplotlib", "mwparserfromhell", "yaml"}
    bad = {m: sorted(third_party(m) & heavy) for m in modules() if layer_of(m) == "core"}
    assert {m: names for m, names in bad.items() if names} == {}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bare = {m: sorted(third_party(m) - stdlib) for m in modules() if layer_of(m) in ("optional", "atomic")}
    assert {m: names for m, names in bare.items() if names} == {}


def test_only_the_cli_reads_argv():
    readers = []
    for module in modules():
        if layer_of(module) == "cli":
            continue
        if "argparse" in third_party(module):
            readers.append(f"{module} imports argparse")
        readers += [f"{module}:{node.lineno} reads argv" for node in ast.walk(tree(module))
                    if isinstance(node, ast.Attribute) and node.attr == "argv"]
    assert readers == []


# -- (c) core is light ----------------------------------------------------------------------------


def test_importing_core_does_not_import_transformers():
    core = sorted(m for m in modules() if layer_of(m) == "core")
    code = (f"import sys\nimport {', '.join(core)}\n"
            "heavy = sorted(m for m in ('transformers', 'accelerate', 'datasets') if m in sys.modules)\n"
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing permsparse.core loads {done.stdout.strip()}"


# -- (d) small modules, short functions -------------------------------------------------------------


def long_modules() -> list[str]:
    out = []
    for module, path in modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{module}: {n} lines")
    return out


def long_functions() -> list[str]:
    out = []
    for module in modules():
        for node in ast.walk(tree(module)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{module}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_module_over_400_lines():
    found = long_modules()
    assert not found, "\n".join(map(str, found))


def test_no_function_over_80_lines():
    found = long_functions()
    assert not found, "\n".join(map(str, found))
