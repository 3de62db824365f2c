"""``<run>/index.html``: a gate run's root causes first (``harness.regression.root_causes``,
rendered, never recomputed), then the grid (``case_grid``), then every case's drill-down
(``case_detail``), red first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from harness import workspace
from harness.execution.run_dir import RunDir
from harness.matrix import case_classes
from harness.matrix.cases import CaseSet, UnknownCaseError, load_cases_once
from harness.regression.root_causes import RootCause
from harness.reporting.html.case_detail import LOG_TAIL_LINES, CaseView, build_case_view
from harness.reporting.html.case_grid import Grid, Tally, build_cell, build_grid, tally
from harness.reporting.html.looks import KNOWN_LOOK, STATUS_LOOKS, VERDICT_LOOKS, Look, golden_view
from harness.reporting.html.rendering import HISTORY_NAME, INDEX_NAME, templates
from harness.results import OK_STATUSES, PASS, CaseResult


@dataclass(frozen=True)
class SourceTreeView:
    kind: str
    path: str
    sha: str
    dirty: bool


@dataclass(frozen=True)
class ClassCell:
    """The run's cases of one family in one case class: how many, and how many passed."""

    cases: int
    passed: int

    @property
    def text(self) -> str:
        return f"{self.passed}/{self.cases}" if self.cases else ""

    @property
    def css(self) -> str:
        # Not red: a known upstream failure is no alarm here; the grid above says which case is news.
        return "pass" if self.cases and self.passed == self.cases else ""


@dataclass(frozen=True)
class ClassRow:
    family: str
    cells: tuple[ClassCell, ...]  # one per case_classes.CLASSES


def class_rows(results: Sequence[CaseResult], case_set: CaseSet) -> tuple[ClassRow, ...]:
    """Per family of the run, its cases in each issue-21 case class (``harness.matrix.case_classes``);
    a case the current ``cases/`` no longer declares is left out."""
    counts: dict[str, dict[str, list[int]]] = {}
    for r in results:
        try:
            case = case_set.get(r.case_id)
        except UnknownCaseError:
            continue
        for klass in case_classes.classes_of(case):
            tally = counts.setdefault(case.model.family, {}).setdefault(klass.key, [0, 0])
            tally[0] += 1
            tally[1] += r.status == PASS
    return tuple(ClassRow(family, tuple(ClassCell(*per.get(k.key, (0, 0))) for k in case_classes.CLASSES))
                 for family, per in sorted(counts.items()))


@dataclass(frozen=True)
class RunPage:
    name: str
    meta: dict[str, Any]
    source_trees: tuple[SourceTreeView, ...]
    grid: Grid
    cases: tuple[CaseView, ...]  # red first, then the other non-passing cases, then the rest
    legend: tuple[Look, ...]
    gate: bool
    history_href: str  # "" when there is no history page next to the run
    root_causes: tuple[RootCause, ...] = ()  # a gate run's REGRESSED cases, grouped (shown first)
    class_rows: tuple[ClassRow, ...] = ()  # per family, its cases in each case class

    @property
    def classes(self) -> tuple[case_classes.CaseClass, ...]:
        return case_classes.CLASSES

    @property
    def attention(self) -> list[CaseView]:
        return [c for c in self.cases if c.cell.needs_attention]

    @property
    def tallies(self) -> list[Tally]:
        return tally(self.grid.cells)


def source_tree_views(meta: dict[str, Any]) -> tuple[SourceTreeView, ...]:
    return tuple(SourceTreeView(t.get("kind", ""), t.get("path", ""), t.get("sha", ""), bool(t.get("dirty")))
                 for t in meta.get("source_trees") or [])


def build_run_page(run: RunDir, results: list[CaseResult], meta: dict[str, Any],
                   verdicts: dict[str, str] | None = None, root_causes: Sequence[RootCause] = ()) -> RunPage:
    launches, provenance = run.launches(), run.provenance()
    views = [golden_view(r) for r in results]
    cells = [build_cell(r, v, (verdicts or {}).get(r.case_id, "")) for r, v in zip(results, views)]
    cases = [build_case_view(run, r, c, v, launches, provenance) for r, c, v in zip(results, cells, views)]
    cases.sort(key=lambda c: (not c.cell.needs_attention, c.cell.status in OK_STATUSES))
    legend = tuple(VERDICT_LOOKS.values()) if verdicts else (*STATUS_LOOKS.values(), KNOWN_LOOK)
    history = run.path.parent / HISTORY_NAME
    return RunPage(run.name, meta, source_tree_views(meta), build_grid(cells), tuple(cases), legend,
                   gate=bool(verdicts), history_href=f"../{HISTORY_NAME}" if history.exists() else "",
                   root_causes=tuple(root_causes), class_rows=class_rows(results, load_cases_once()))


def render_run_page(page: RunPage) -> str:
    return templates().get_template("run.html.j2").render(page=page, log_tail_lines=LOG_TAIL_LINES)


def write_run_page(run: RunDir, results: list[CaseResult], meta: dict[str, Any],
                   verdicts: dict[str, str] | None = None, root_causes: Sequence[RootCause] = ()) -> Path:
    """``<run>/index.html`` (atomically); ``verdicts`` (case_id -> gate verdict) and
    ``root_causes`` (its REGRESSED cases grouped) for a gate run."""
    path = run / INDEX_NAME
    workspace.atomic_write_text(path, render_run_page(build_run_page(run, results, meta, verdicts, root_causes)))
    return path
