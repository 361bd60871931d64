"""The README's interop matrix names tests that exist: a cell cannot point at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: ``e2e/test_x.py``, ``test_x.py::test_name…`` or ``integration/test_x.py::…[param]``.
_CELL = re.compile(r"`(?:(e2e|integration)/)?(test_\w+\.py)(?:::(\w*)…?)?[^`]*`")


def _matrix() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Interop matrix")
    return text[start : text.index("\n## ", start + 1)]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
            and n.name.startswith("test_")}


def test_every_test_the_interop_matrix_names_exists() -> None:
    cells = _CELL.findall(_matrix())
    assert len(cells) >= 15, cells
    folder = "integration"
    for group, name, prefix in cells:
        folder = group or folder  # a bare file name is in the folder named before it
        path = ROOT / "tests" / folder / name
        if not path.exists():
            path = next((ROOT / "tests").glob(f"*/{name}"))
        tests = _tests_in(path)
        assert tests, path
        if prefix:
            assert any(t.startswith(prefix) for t in tests), (name, prefix)
