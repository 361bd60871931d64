"""``pip install .`` / ``pipx install .`` give a working ``pyvirtio``: the package needs
nothing outside the standard library (tests/integration/test_install.py installs it)."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "pyvirtio"


def imported_top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_imports_only_the_standard_library_and_itself() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []  # so nothing only the dev extra has
    allowed = set(sys.stdlib_module_names) | {"pyvirtio"}
    outside = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in PACKAGE.rglob("*.py")
        for name in imported_top_level_names(path) - allowed
    }
    assert not outside, sorted(outside)


def test_the_console_script_and_the_package_data_are_declared() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["scripts"] == {"pyvirtio": "pyvirtio.cli:main"}
    data = set(config["tool"]["setuptools"]["package-data"]["pyvirtio"])
    files = {
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert files <= data, files - data  # a non-Python file pip would leave out
