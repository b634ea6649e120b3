"""What a source file imports, read from its syntax tree (for the tests that keep the packages' layout)."""

from __future__ import annotations

import ast
from pathlib import Path


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (under ``TYPE_CHECKING`` and in functions too);
    ``from package import name`` counts as importing ``package.name`` as well, since ``name`` may be a
    submodule."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found
