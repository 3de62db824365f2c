"""The run page's grid: a panel per format/kind (rows: model families, their ``@variant`` rows
under them; columns: layouts), one coloured cell per case linking to its drill-down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from harness.matrix.cases import CaseKey, parse_case_id  # the grid is laid out by a case ID's parts
from harness.reporting.html.looks import GoldenView, Look, golden_view, result_look
from harness.reporting.html.rendering import case_anchor
from harness.results import CaseResult


@dataclass(frozen=True)
class Cell:
    """One case in the grid."""

    key: CaseKey
    status: str
    look: Look
    headline: str
    verdict: str = ""  # gate runs only

    @property
    def label(self) -> str:
        return self.look.label

    @property
    def needs_attention(self) -> bool:
        return self.look.needs_attention

    @property
    def anchor(self) -> str:
        return case_anchor(self.key.case_id)

    @property
    def tooltip(self) -> str:
        return " | ".join(p for p in (self.key.case_id, self.status.upper(), self.headline) if p)


def build_cell(result: CaseResult, view: GoldenView, verdict: str = "") -> Cell:
    return Cell(parse_case_id(result.case_id), result.status, result_look(result, view, verdict), result.headline,
                verdict)


def build_cells(results: Iterable[CaseResult], verdicts: dict[str, str] | None = None) -> list[Cell]:
    """One cell per case, known upstream failures looked up in golden/ (``HARNESS_GOLDEN``)."""
    return [build_cell(r, golden_view(r), (verdicts or {}).get(r.case_id, "")) for r in results]


@dataclass(frozen=True)
class Column:
    layout: str
    fault: str = ""  # a selftest's seeded regression gets its own column


@dataclass(frozen=True)
class Row:
    """One model (family, or family@variant) across the columns of a panel."""

    family: str
    variant: str
    cells: tuple[Cell | None, ...]  # aligned with the panel's columns; None: no such case
    first_of_family: bool

    @property
    def model(self) -> str:
        return f"{self.family}@{self.variant}" if self.variant else self.family


@dataclass(frozen=True)
class Panel:
    """The grid for one format/kind (e.g. ``torch_dist/reshard``): models x layouts."""

    path: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Grid:
    panels: tuple[Panel, ...]

    @property
    def cells(self) -> list[Cell]:
        return [c for p in self.panels for r in p.rows for c in r.cells if c is not None]

    @property
    def red_count(self) -> int:
        return sum(c.needs_attention for c in self.cells)


def _in_order(values: Iterable[str]) -> list[str]:
    """Distinct values, in first-seen order (results follow cases/*.yaml: a stable, familiar order)."""
    return list(dict.fromkeys(values))


def build_grid(cells: list[Cell]) -> Grid:
    """Panels per format/kind; in each, families in first-seen order with the plain family row
    first and its variants under it."""
    panels = []
    for path in _in_order(c.key.path for c in cells):
        mine = [c for c in cells if c.key.path == path]
        columns = tuple(Column(layout, fault) for layout, fault in _in_order((c.key.layout, c.key.fault) for c in mine))
        families = _in_order(c.key.family for c in mine)
        models = sorted(_in_order((c.key.family, c.key.variant) for c in mine),
                        key=lambda m: (families.index(m[0]), m[1] != ""))
        by_place = {(c.key.family, c.key.variant, c.key.layout, c.key.fault): c for c in mine}
        rows = tuple(
            Row(family, variant, tuple(by_place.get((family, variant, col.layout, col.fault)) for col in columns),
                first_of_family=i == 0 or models[i - 1][0] != family)
            for i, (family, variant) in enumerate(models))
        panels.append(Panel(path, columns, rows))
    return Grid(tuple(panels))


@dataclass(frozen=True)
class Tally:
    look: Look
    count: int


def tally(cells: list[Cell]) -> list[Tally]:
    """Cells per look, red first: the one line at the top of the page."""
    counts: dict[Look, int] = {}
    for c in cells:
        counts[c.look] = counts.get(c.look, 0) + 1
    return sorted((Tally(look, n) for look, n in counts.items()),
                  key=lambda t: (not t.look.needs_attention, t.look.label))
