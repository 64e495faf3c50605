"""The import rules of the architecture, read from the code.

`api/` and `worker/` are peers that meet only through Redis and the contracts in `shared/`;
`forklift/` is the library and command users install, talking to the API over HTTP. An arrow
against these rules fails here with the file, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.stack import REPO

# importer package -> packages it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "shared": frozenset({"api", "worker", "forklift"}),
    "api": frozenset({"worker", "forklift"}),
    "worker": frozenset({"api", "forklift"}),
    "forklift": frozenset({"api", "worker"}),
    "bench": frozenset({"tests"}),
}


@dataclass(frozen=True)
class Arrow:
    path: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def imports_of(source: str) -> list[tuple[int, str]]:
    """Every module named by an import statement, at any depth (function-level imports
    count: they are arrows too), and every literal `import_module("...")`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def forbidden_arrows(root: Path) -> list[Arrow]:
    arrows: list[Arrow] = []
    for package, banned in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, target in imports_of(path.read_text()):
                if target.split(".")[0] in banned:
                    arrows.append(Arrow(rel, line, target))
    return arrows


def test_no_forbidden_import() -> None:
    arrows = forbidden_arrows(REPO)
    rules = "; ".join(
        f"{src}/ must not import {', '.join(sorted(b))}" for src, b in FORBIDDEN.items()
    )
    assert not arrows, f"{rules}:\n" + "\n".join(map(str, arrows))


@pytest.mark.parametrize(
    ("package", "source", "expected"),
    [
        ("shared", "from api.errors import x\n", ["shared/m.py:1 imports api.errors"]),
        ("api", "def f():\n    import worker.app\n", ["api/m.py:2 imports worker.app"]),
        (
            "forklift",
            "import importlib\nimportlib.import_module('worker.tasks')\n",
            ["forklift/m.py:2 imports worker.tasks"],
        ),
        ("bench", "from tests import stack\n", ["bench/m.py:1 imports tests"]),
        ("api", "from shared.keys import Keys\nfrom . import deps\n", []),
        ("worker", "from shared.settings import Settings\n", []),
    ],
)
def test_the_check_sees_an_arrow(
    tmp_path: Path, package: str, source: str, expected: list[str]
) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / "m.py").write_text(source)
    assert [str(a) for a in forbidden_arrows(tmp_path)] == expected
