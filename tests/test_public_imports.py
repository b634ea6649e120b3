"""Each package is used through its public surface: no module imports a private module (``_name``) of
another of the project's packages. The exceptions are named with their reason."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests._imports import imported_modules

ROOT = Path(__file__).resolve().parent.parent
# The project's packages, as pyproject.toml has setuptools find them: a new package is checked too.
_FIND = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
PACKAGES: tuple[str, ...] = tuple(sorted(pattern.rstrip("*") for pattern in _FIND["include"]))
WHITE_BOX: dict[str, frozenset[str]] = {
    # Benchmarks that time a package's internals at scale, statement by statement: the ingestor's batch
    # transaction (its statements, batch merge, connection codecs) and the audit's query at 0.5-50 M rows,
    # and the console's overview reading, which no page calls directly (its background renewal does).
    "bench/_bigmeasure.py": frozenset({"ingestor", "producer"}),
    "bench/_console.py": frozenset({"console"}),
}


def _private_of_others(path: Path, own: str) -> list[str]:
    """The private modules of other project packages that ``path`` (in package ``own``) imports."""
    found = []
    for module in imported_modules(path):
        parts = module.split(".")
        if parts[0] in PACKAGES and parts[0] != own and any(p.startswith("_") for p in parts[1:]):
            found.append(module)
    return sorted(found)


def test_no_package_imports_another_packages_private_modules() -> None:
    """Over every source file of the project's packages: another package's ``_private`` module is never
    imported (``__main__`` aside: a CLI entry point is how one service starts another's command)."""
    offences: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            allowed = WHITE_BOX.get(name, frozenset())
            bad = [
                m
                for m in _private_of_others(path, package)
                if "__main__" not in m.split(".") and m.split(".")[0] not in allowed
            ]
            if bad:
                offences[name] = bad
    assert offences == {}


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    """The check itself: a file importing another package's private module is reported, its own is not."""
    source = tmp_path / "x.py"
    source.write_text("from ingestor._prune import prune_sessions\nfrom bench._report import Result\n")
    assert _private_of_others(source, "bench") == ["ingestor._prune", "ingestor._prune.prune_sessions"]
