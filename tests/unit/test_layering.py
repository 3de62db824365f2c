"""Floors: no module of ``harness`` imports from a floor above its own (issue 22).

    floor 3  entry points         harness.cli, harness.__main__, harness.pytest_plugin, harness.pytest_matrix
    floor 2  judging, reporting   harness.regression (golden, gate, root_causes, bisect, selftest, faults),
                                  harness.reporting (run_document, run_report, html/, architecture_table)
    floor 1  execution            harness.execution (run_service, rank_launcher, rank_worker, ...), harness.conversion,
                                  harness.runtimes, harness.checks, harness.formats
    floor 0  shared vocabulary    harness.results, harness.errors, harness.workspace, the harness package itself,
                                  harness.matrix (cases, layouts, lanes, family_registry, model_spec, ...),
                                  harness.run_spec (RunSpec: what one run is, from the entry point to the ranks)

A module may import from its own floor and any floor below. Execution selects, runs and returns
results; whoever runs a selection writes its run folder (``run_report.write_outcome``), and seeded
faults reach the ranks by module name in the run plan (``RunSpec.fault_provider``), never by import.

Every import counts: module-level, inside functions, and under ``TYPE_CHECKING`` (a type from a
floor above is still a dependency on it). Imports are read with ``ast``; a module named only in a
string (``importlib.import_module(spec.fault_provider)``) is the hook mechanism and is not an import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu

PACKAGE = "harness"
PACKAGE_DIR = workspace.REPO_ROOT / PACKAGE

# A name covers the module and, if it is a package, every module under it; the root package
# ``harness`` covers only its own __init__ (every other module must be placed explicitly).
FLOORS: dict[int, tuple[str, ...]] = {
    0: ("harness", "harness.results", "harness.errors", "harness.workspace", "harness.matrix", "harness.run_spec"),
    1: ("harness.formats", "harness.checks", "harness.runtimes", "harness.conversion", "harness.execution"),
    2: ("harness.regression", "harness.reporting"),
    3: ("harness.cli", "harness.__main__", "harness.pytest_plugin", "harness.pytest_matrix"),
}

# Upward imports that are known and accepted for now, each with its reason: (importer, imported).
# Empty: every upward import issue 22 listed has been removed. Anything added here needs a comment
# saying why it cannot go yet; the test fails on any upward import not listed, and on a listed one
# that no longer exists (so the list only shrinks).
ALLOWED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str
    floor: int
    imported_floor: int

    def __str__(self) -> str:
        return (f"{self.module}:{self.line} (floor {self.floor}) imports {self.imported} "
                f"(floor {self.imported_floor})")


def floor_of(module: str) -> int | None:
    """The floor of ``module`` (None: not placed on any floor)."""
    for floor, names in FLOORS.items():
        for name in names:
            if module == name or (name != PACKAGE and module.startswith(name + ".")):
                return floor
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports(module: str, source: str, known: set[str], is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every ``harness`` module ``source`` imports, at any depth. ``from X import
    name`` counts as importing ``X.name`` where that is a module (``from harness import cli``)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return [(line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def upward_imports(module: str, source: str, known: set[str], is_package: bool = False) -> list[Violation]:
    """The imports of ``source`` (the text of ``module``) from a floor above ``module``'s."""
    floor = floor_of(module)
    assert floor is not None, f"{module} is on no floor: add it to FLOORS"
    out = []
    for line, imported in imports(module, source, known, is_package):
        target = floor_of(imported)
        assert target is not None, f"{module}:{line} imports {imported}, which is on no floor: add it to FLOORS"
        if target > floor:
            out.append(Violation(module, line, imported, floor, target))
    return out


def violations() -> list[Violation]:
    modules = all_modules()
    known = set(modules)
    return [v for name, path in modules.items()
            for v in upward_imports(name, path.read_text(), known, path.name == "__init__.py")]


# ---------------------------------------------------------------------------------- the tree


def test_every_module_is_on_a_floor():
    assert [m for m in all_modules() if floor_of(m) is None] == []


def test_no_module_imports_from_a_floor_above_its_own():
    new = [str(v) for v in violations() if (v.module, v.imported) not in ALLOWED]
    assert new == [], "upward imports (see this test's docstring for the floors):\n" + "\n".join(new)


def test_every_allowed_upward_import_still_exists():
    """An entry of ALLOWED that was fixed must leave the list, so it cannot come back unnoticed."""
    found = {(v.module, v.imported) for v in violations()}
    assert sorted(ALLOWED - found) == []


def test_execution_imports_neither_reporting_nor_regression():
    """The two ties issue 22 cut: execution neither writes reports nor imports the fault registry."""
    modules = all_modules()
    imported = {name for m, p in modules.items() if m.startswith("harness.execution")
                for _, name in imports(m, p.read_text(), set(modules), p.name == "__init__.py")}
    assert not {n for n in imported if n.startswith(("harness.reporting", "harness.regression"))}


# ------------------------------------------------------------------------------ the checker

KNOWN = {"harness", "harness.cli", "harness.results", "harness.reporting", "harness.reporting.run_report",
         "harness.execution", "harness.execution.run_service", "harness.matrix", "harness.matrix.cases"}


def test_a_seeded_function_level_upward_import_is_a_violation():
    source = "def write(outcome):\n    from harness.reporting import run_report\n    run_report.write_outcome(outcome)\n"
    found = upward_imports("harness.execution.run_service", source, KNOWN)
    assert [(v.line, v.imported, v.floor, v.imported_floor) for v in found] == [
        (2, "harness.reporting.run_report", 1, 2)]


def test_a_seeded_module_level_upward_import_is_a_violation():
    for source in ("import harness.cli\n", "from harness import cli\n", "from harness.execution.run_service import run_selection\n"):
        found = upward_imports("harness.matrix.cases", source, KNOWN)
        assert len(found) == 1 and found[0].floor == 0, source


def test_a_seeded_type_checking_and_relative_upward_import_is_a_violation():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..reporting import run_report\n"
    found = upward_imports("harness.execution.run_service", source, KNOWN)
    assert [(v.imported, v.imported_floor) for v in found] == [("harness.reporting.run_report", 2)]


def test_imports_from_the_same_floor_or_below_are_not_violations():
    source = ("from harness import results\nfrom harness.matrix.cases import Case\nimport harness.execution.run_service\n"
              "from . import service\nimport os\n")
    assert upward_imports("harness.execution.rank_launcher", source, KNOWN) == []


def test_a_module_on_no_floor_is_refused():
    with pytest.raises(AssertionError, match="on no floor"):
        upward_imports("harness.newpackage.thing", "", KNOWN)
