"""Optional dependencies: one clear error naming the extra, and extras that match pyproject.toml."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from permsparse._optional import _DISTRIBUTIONS, MissingExtra, require

ROOT = Path(__file__).resolve().parent.parent
BASE = {"torch", "numpy", "scipy", "safetensors", "transformers", "tqdm"}


def test_a_missing_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mwparserfromhell", None)  # makes the import fail
    with pytest.raises(MissingExtra) as err:
        require("mwparserfromhell", "wikipedia", "cleaning the dump")
    assert str(err.value) == ("cleaning the dump needs the optional package mwparserfromhell: "
                              "pip install 'permsparse[wikipedia]'")
    assert err.value.extra == "wikipedia" and isinstance(err.value, ImportError)


def test_a_submodule_of_a_missing_package_names_the_distribution(monkeypatch):
    for name in ("PIL", "PIL.Image"):  # an earlier test may have imported it
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtra, match=r"^PIL.Image needs the optional package pillow: "):
        require("PIL.Image", "vision")


def test_an_installed_package_failing_on_its_own_import_is_not_disguised(tmp_path, monkeypatch):
    (tmp_path / "half_installed_pkg.py").write_text("import some_dependency_that_is_not_there_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("half_installed_pkg", "plots")
    assert not isinstance(err.value, MissingExtra) and err.value.name == "some_dependency_that_is_not_there_xyz"


def test_an_installed_package_is_returned():
    assert require("json", "dev").dumps([1]) == "[1]"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def _requires_in_source() -> set[tuple[str, str]]:
    """Every ``require("module", "extra", ...)`` call under src/ (both arguments literal)."""
    found = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require"
                    and len(node.args) >= 2 and all(isinstance(a, ast.Constant) for a in node.args[:2])):
                found.add((node.args[0].value, node.args[1].value))
    return found


def test_base_dependencies_and_the_all_extra():
    project = _pyproject()
    assert {_name(r) for r in project["dependencies"]} == BASE
    extras = project["optional-dependencies"]
    (everything,) = extras["all"]
    assert set(re.search(r"\[(.*)\]", everything).group(1).split(",")) == set(extras) - {"all", "dev"}


def test_every_required_package_is_in_the_extra_it_names():
    extras = {k: {_name(r) for r in v} for k, v in _pyproject()["optional-dependencies"].items()}
    calls = _requires_in_source()
    assert {extra for _, extra in calls} >= {"plots", "wikipedia", "gguf", "eval", "hub", "vision"}
    for module, extra in calls:
        top = module.split(".")[0]
        assert _DISTRIBUTIONS.get(top, top).lower() in extras.get(extra, set()), (module, extra)
