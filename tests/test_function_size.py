"""Small rooms (issue 17 step 5): no function or method in ``napari_e2enet/`` is longer than
``LIMIT`` lines, counted by ``ast`` (``end_lineno - lineno + 1``: the ``def`` line, docstring,
body and comments inside it, without decorators). Run as a script it lists the longest ones:
``python tests/test_function_size.py [N]``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "napari_e2enet"
LIMIT = 80


def _walk(node: ast.AST, prefix: str, rel: str, found: list[tuple[int, str]]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            found.append((child.end_lineno - child.lineno + 1, f"{rel}:{name}"))
            _walk(child, f"{name}.", rel, found)
        elif isinstance(child, ast.ClassDef):
            _walk(child, f"{prefix}{child.name}.", rel, found)
        else:
            _walk(child, prefix, rel, found)


def function_lengths(root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(lines, "path:qualified.name") for every function in ``root``, longest first."""
    found: list[tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _walk(tree, "", path.relative_to(root).as_posix(), found)
    return sorted(found, key=lambda item: -item[0])


def test_no_function_is_longer_than_the_limit():
    lengths = function_lengths()
    assert len(lengths) > 100, f"found only {len(lengths)} functions under {PACKAGE}"
    too_long = [f"{where} ({n} lines)" for n, where in lengths if n > LIMIT]
    assert not too_long, f"functions over {LIMIT} lines: " + ", ".join(too_long)


def test_the_counter_sees_nested_functions_and_methods(tmp_path):
    (tmp_path / "m.py").write_text(
        "class A:\n    def f(self):\n        def g():\n            pass\n        return g\n"
    )
    assert function_lengths(tmp_path) == [(4, "m.py:A.f"), (2, "m.py:A.f.g")]


if __name__ == "__main__":
    for n, where in function_lengths()[: int(sys.argv[1]) if len(sys.argv) > 1 else 15]:
        print(f"{n:5d}  {where}")
