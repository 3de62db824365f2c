"""The run report people open in the morning: ``<run>/index.html`` and ``<reports>/history.html``.

One static file each: no server, no network, no script, no external asset, so it works as a CI
artifact opened from disk and renders with JavaScript off (drill-down is anchors + ``<details>``).

``index.html``: a gate run's root causes first (``harness.regression.root_causes``, rendered, never
recomputed), then a grid per format/kind (rows: model families, their ``@variant`` rows under them;
columns: layouts), one coloured cell per case linking to its drill-down (every check with its
numbers, the failing tensors, golden comparison, provenance, rank log tails). ``history.html``: a
case x run matrix over the last N runs, marking where each case went red, and an inline-SVG plot
of the logit max|d| per case, so drift shows before it crosses a tolerance.

Data flows one way: results -> a small typed model (``Cell``, ``Row``, ``Panel``, ``Grid``,
``CaseView``, ``History``...) built by pure functions tests can check -> Jinja2 templates (in
``templates/``, autoescaped). No torch import.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2

from harness import workspace
from harness.execution.run_dir import LATEST, RESULTS_NAME, Plan, RunDir
from harness.matrix.cases import CaseKey, parse_case_id  # noqa: F401 - the grid is laid out by its parts
from harness.regression import golden
from harness.regression.root_causes import RootCause
from harness.reporting import run_document
from harness.results import (ERROR, FAIL, FIXED, INCOMPATIBLE, INFRA_ERROR, INVALID, NOT_RUN, OK_STATUSES, PASS,
                             REGRESSED, SKIP, STILL_FAILING, TIMEOUT, V_PASS, CaseResult, CheckResult)

INDEX_NAME = "index.html"
HISTORY_NAME = "history.html"
LOGIT_CHECK = "logits-hf-vs-megatron"  # whose max|d| the history plots (named in conversion.routes.logits_vs_hf)
LOG_TAIL_LINES = 40


# ------------------------------------------------------------------------------- case IDs


def case_anchor(case_id: str) -> str:
    """The ``id`` of a case's drill-down in ``index.html`` (also linked from history.html)."""
    return f"case-{workspace.slug(case_id)}"


# --------------------------------------------------------------------------------- looks


@dataclass(frozen=True)
class Look:
    """How a cell shows an outcome: CSS class (colour), label, and whether it is red (needs
    attention now)."""

    css: str
    label: str
    needs_attention: bool
    meaning: str


STATUS_LOOKS = {
    PASS: Look("pass", "PASS", False, "every check passed (PASS* = passed, but a check could not run here)"),
    FAIL: Look("fail", "FAIL", True, "a check failed"),
    ERROR: Look("error", "ERROR", True, "the case crashed"),
    TIMEOUT: Look("timeout", "TIMEOUT", True, "the launcher killed it at its time limit"),
    SKIP: Look("skip", "SKIP", False, "could not run on this machine (the case says why)"),
    INVALID: Look("invalid", "INVALID", False, "expected-invalid: the layout is declared impossible and was refused"),
    INFRA_ERROR: Look("infra", "INFRA", False, "the machine, not the code under test, kept it from running"),
}
KNOWN_LOOK = Look("known", "KNOWN", False,
                  "known upstream failure: fails exactly as golden/ pins it (see golden/known_failures.yaml)")
# Gate verdicts: the names are harness.results' (harness.regression.gate decides them).
VERDICT_LOOKS = {
    V_PASS: Look("pass", V_PASS, False, "passes now and in golden/ and the baseline"),
    REGRESSED: Look("fail", REGRESSED, True, "fails now, but passed in golden/ or in the baseline"),
    FIXED: Look("fixed", FIXED, False, "passes now, failed in every reference"),
    STILL_FAILING: Look("known", STILL_FAILING, False, "fails now, and failed in every reference"),
    NOT_RUN: Look("skip", NOT_RUN, False, "not run here: invalid layout, not runnable here, or infrastructure"),
    INCOMPATIBLE: Look("error", INCOMPATIBLE, True, "the candidate cannot start: a rank cannot import the stack"),
}


def status_look(status: str) -> Look:
    """A status this module does not know yet is shown red: better a false alarm than silence."""
    return STATUS_LOOKS.get(status) or Look("error", status.upper(), True, "unknown status")


# -------------------------------------------------------------------------------- golden


@dataclass(frozen=True)
class GoldenView:
    """A case against its ``golden/<lane>/<case>.json``."""

    path: str  # "" when there is no golden file
    golden_status: str
    differences: tuple[str, ...]
    known_failure: dict[str, Any]  # the pinned {upstream, diagnosis, headline}, if any
    fails_as_pinned: bool = False  # golden.fails_as_pinned: a known failure, not red

    @property
    def exists(self) -> bool:
        return bool(self.path)


def golden_view(result: CaseResult) -> GoldenView:
    entry = golden.load(result.lane, result.case_id)
    if entry is None:
        return GoldenView("", "", (), {})
    differences = golden.compare(entry.doc, result)
    return GoldenView(str(entry.path), entry.doc.get("status", ""), tuple(differences),
                      entry.doc.get("known_failure") or {}, golden.fails_as_pinned(entry.doc, result, differences))


# ---------------------------------------------------------------------------------- grid


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
    if verdict:
        look = VERDICT_LOOKS.get(verdict) or Look("error", verdict, True, "unknown verdict")
    elif view.fails_as_pinned:
        look = KNOWN_LOOK
    else:
        look = status_look(result.status)
    if look.css == "pass" and result.unchecked:
        look = Look(look.css, f"{look.label}*", look.needs_attention, look.meaning)
    return Cell(parse_case_id(result.case_id), result.status, look, result.headline, verdict)


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


# ----------------------------------------------------------------------------- drill-down


@dataclass(frozen=True)
class Number:
    label: str
    value: str


@dataclass(frozen=True)
class CheckView:
    name: str
    outcome: str  # PASS | FAIL | SKIP
    summary: str
    numbers: tuple[Number, ...]

    @property
    def css(self) -> str:
        return self.outcome.lower()


@dataclass(frozen=True)
class TensorProblem:
    check: str
    key: str
    problem: str
    shape: str = ""
    dtype: str = ""
    max_abs_diff: str = ""


@dataclass(frozen=True)
class LogTail:
    group: str
    text: str


@dataclass(frozen=True)
class SourceTreeView:
    kind: str
    path: str
    sha: str
    dirty: bool


@dataclass(frozen=True)
class GroupProvenance:
    """Where one rank group imported Megatron from (``provenance/<group>.json``)."""

    group: str
    megatron_core: str
    imported_from_trees: dict[str, Any]
    runtime: tuple[Number, ...]


@dataclass(frozen=True)
class CaseView:
    """Everything the drill-down of one case shows."""

    cell: Cell
    lane: str
    world_size: int
    duration_s: float
    error: str
    unchecked_line: str
    checks: tuple[CheckView, ...]
    tensor_problems: tuple[TensorProblem, ...]
    golden: GoldenView
    groups: tuple[GroupProvenance, ...]
    log_files: tuple[str, ...]  # relative to the run folder, so links work from disk
    log_tails: tuple[LogTail, ...]
    rank_errors: tuple[tuple[int, str], ...]

    @property
    def opened(self) -> bool:
        """Open at load: anything but a plain pass, skip or expected-invalid."""
        return self.cell.needs_attention or self.cell.status not in OK_STATUSES


METRIC_LABELS = {
    "max_abs_diff": "max|d|", "mean_abs_diff": "mean|d|", "top1_agreement": "top-1 agreement", "kl": "KL",
    "tolerance": "tolerance", "compared": "tensors compared", "mismatched": "tensors differ",
    "missing": "missing keys", "extra": "extra keys", "duplicates": "produced twice", "params": "params",
    "unloaded": "unloaded params",
}


def format_value(value: Any) -> str:
    """A metric as text, whole: floats as their shortest exact ``repr``, never rounded to fit."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        return ", ".join(f"[{format_value(v)}]" if isinstance(v, (list, tuple)) else format_value(v) for v in value)
    return str(value)


def check_numbers(metrics: dict[str, Any]) -> tuple[Number, ...]:
    """Every metric of a check, labelled; for a tensor comparison also how many were equal."""
    numbers = [Number(METRIC_LABELS.get(k, k), format_value(v)) for k, v in metrics.items()]
    if isinstance(metrics.get("compared"), int) and isinstance(metrics.get("mismatched"), int):
        numbers.insert(0, Number("tensors equal", str(metrics["compared"] - metrics["mismatched"])))
    return tuple(numbers)


def check_view(check: CheckResult) -> CheckView:
    outcome = "SKIP" if check.skipped else ("PASS" if check.passed else "FAIL")
    return CheckView(check.name, outcome, check.summary, check_numbers(check.metrics))


KEY_LISTS = {"missing": "missing: in the reference only", "extra": "extra: in the candidate only",
             "duplicates": "produced twice"}


def tensor_problems(result: CaseResult) -> list[TensorProblem]:
    """The tensors a failing check names: its problem rows, then its missing / extra / twice-
    produced keys."""
    out = []
    for check in result.checks:
        if check.passed:
            continue
        for row in check.details:
            if "key" in row and row.get("status", "ok") != "ok":
                diff = row.get("max_abs_diff")
                out.append(TensorProblem(check.name, row["key"], str(row["status"]), str(row.get("shape", "")),
                                         str(row.get("dtype", "")), "" if diff is None else format_value(diff)))
        for metric, problem in KEY_LISTS.items():
            keys = check.metrics.get(metric)
            if isinstance(keys, list):
                out.extend(TensorProblem(check.name, str(k), problem) for k in keys)
    return out


def launch_plans(run: RunDir) -> list[Plan]:
    """Every launch (rank group) of the run, from its plan file."""
    pattern = run.plan_file("*")
    return [RunDir.read_plan(p) for p in sorted(pattern.parent.glob(pattern.name))]


def group_provenance(group: str, doc: dict[str, Any]) -> GroupProvenance:
    runtime = doc.get("runtime") or {}
    return GroupProvenance(group, str(doc.get("megatron.core", "")), dict(doc.get("imported_from_trees") or {}),
                           tuple(Number(k, format_value(v)) for k, v in runtime.items()))


def build_case_view(run: RunDir, result: CaseResult, cell: Cell, view: GoldenView, plans: list[Plan],
                    provenance: dict[str, dict[str, Any]]) -> CaseView:
    """A case's drill-down. Log tails are inlined for a case that did not pass (a passing case
    links its log files: a matrix run would otherwise repeat one group's tail 100 times)."""
    groups = [p.group for p in plans if result.case_id in p.cases]
    log_files = tuple(str(log.relative_to(run.path)) for g in groups for log in sorted(run.log_dir(g).glob("*.log")))
    tails = () if result.status in OK_STATUSES else tuple(
        LogTail(g, text) for g in groups if (text := run.log_tail(g, LOG_TAIL_LINES)))
    return CaseView(
        cell=cell, lane=result.lane, world_size=result.world_size, duration_s=result.duration_s,
        error=result.error, unchecked_line=result.unchecked_line,
        checks=tuple(check_view(c) for c in result.checks), tensor_problems=tuple(tensor_problems(result)),
        golden=view, groups=tuple(group_provenance(g, provenance[g]) for g in groups if g in provenance),
        log_files=log_files, log_tails=tails, rank_errors=tuple(run.rank_errors(result.case_id)))


# ------------------------------------------------------------------------------ run page


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
    plans, provenance = launch_plans(run), run.provenance()
    views = [golden_view(r) for r in results]
    cells = [build_cell(r, v, (verdicts or {}).get(r.case_id, "")) for r, v in zip(results, views)]
    cases = [build_case_view(run, r, c, v, plans, provenance) for r, c, v in zip(results, cells, views)]
    cases.sort(key=lambda c: (not c.cell.needs_attention, c.cell.status in OK_STATUSES))
    legend = tuple(VERDICT_LOOKS.values()) if verdicts else (*STATUS_LOOKS.values(), KNOWN_LOOK)
    history = run.path.parent / HISTORY_NAME
    return RunPage(run.name, meta, source_tree_views(meta), build_grid(cells), tuple(cases), legend,
                   gate=bool(verdicts), history_href=f"../{HISTORY_NAME}" if history.exists() else "",
                   root_causes=tuple(root_causes))


@functools.cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["case_anchor"] = case_anchor
    return env


def render_run_page(page: RunPage) -> str:
    return _templates().get_template("run.html.j2").render(page=page, log_tail_lines=LOG_TAIL_LINES)


def write_run_page(run: RunDir, results: list[CaseResult], meta: dict[str, Any],
                   verdicts: dict[str, str] | None = None, root_causes: Sequence[RootCause] = ()) -> Path:
    """``<run>/index.html`` (atomically); ``verdicts`` (case_id -> gate verdict) and
    ``root_causes`` (its REGRESSED cases grouped) for a gate run."""
    path = run / INDEX_NAME
    workspace.atomic_write_text(path, render_run_page(build_run_page(run, results, meta, verdicts, root_causes)))
    return path


# ------------------------------------------------------------------------------- history


@dataclass(frozen=True)
class RunColumn:
    """One run of the history, oldest left."""

    name: str
    started_utc: str
    label: str
    lane: str
    injected_faults: tuple[str, ...]
    has_page: bool  # its index.html exists, so cells can link into its drill-down

    @property
    def _stamp(self) -> str:
        """The UTC stamp the folder name starts with (``YYYYmmddTHHMMSSZ-label``), or ""."""
        stamp = self.name.split("-", 1)[0]
        return stamp if len(stamp) == 16 and stamp[8] == "T" and stamp.endswith("Z") else ""

    @property
    def day(self) -> str:
        """``MM-DD`` of the stamp (the whole folder name if it has none)."""
        return f"{s[4:6]}-{s[6:8]}" if (s := self._stamp) else self.name

    @property
    def time(self) -> str:
        """``HH:MM`` UTC of the stamp."""
        return f"{s[9:11]}:{s[11:13]}" if (s := self._stamp) else ""

    @property
    def short_time(self) -> str:
        return f"{self.day} {self.time}".strip()


@dataclass(frozen=True)
class HistoryCell:
    run: RunColumn
    look: Look
    went_red: bool  # red here, and not red the previous time this case ran (in the window)
    logit_max_abs: float | None
    logit_tolerance: float | None

    @property
    def tooltip(self) -> str:
        logit = "" if self.logit_max_abs is None else f" | logit max|d|={format_value(self.logit_max_abs)}"
        return f"{self.run.name}: {self.look.label}{logit}"


@dataclass(frozen=True)
class HistoryRow:
    case_id: str
    cells: tuple[HistoryCell | None, ...]  # aligned with History.runs; None: not run then
    red_since: RunColumn | None  # start of the red streak the case is in now (None: not red now)
    red_before_window: bool  # that streak reaches back to the oldest run shown (it may be older)

    @property
    def anchor(self) -> str:
        return case_anchor(self.case_id)


@dataclass(frozen=True)
class PlotPoint:
    x: float
    y: float
    run: str
    value: str


@dataclass(frozen=True)
class PlotSeries:
    case_id: str
    colour: str
    points: tuple[PlotPoint, ...]

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class LogitPlot:
    """The logit max|d| of every case over the runs, on a log scale; exact zeros sit on their
    own ``0`` line at the bottom, NaN/inf on a line at the top."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    series: tuple[PlotSeries, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    tolerances: tuple[Tick, ...]


@dataclass(frozen=True)
class History:
    runs: tuple[RunColumn, ...]
    rows: tuple[HistoryRow, ...]
    plot: LogitPlot
    unreadable: tuple[tuple[str, str], ...]  # (folder, why) of run folders that could not be read
    legend: tuple[Look, ...] = (*STATUS_LOOKS.values(), KNOWN_LOOK)


def logit_numbers(result: CaseResult) -> tuple[float, float | None] | None:
    """(max|d|, its max_abs tolerance) of the HF-vs-Megatron logit check, if it ran."""
    try:
        check = result.check(LOGIT_CHECK)
    except KeyError:
        return None
    if check.skipped or not isinstance(check.metrics.get("max_abs_diff"), (int, float)):
        return None
    return float(check.metrics["max_abs_diff"]), (check.metrics.get("tolerance") or {}).get("max_abs")


def history_rows(runs: list[RunColumn], results: list[dict[str, CaseResult]]) -> list[HistoryRow]:
    """Case x run, red now first. A case that did not run in some run keeps its streak."""
    case_ids = _in_order(case_id for per_run in results for case_id in per_run)
    rows = []
    for case_id in case_ids:
        cells: list[HistoryCell | None] = []
        streak_start: int | None = None
        for i, (run, per_run) in enumerate(zip(runs, results)):
            result = per_run.get(case_id)
            if result is None:
                cells.append(None)
                continue
            look = build_cell(result, golden_view(result)).look
            went_red = look.needs_attention and streak_start is None
            if went_red:
                streak_start = i
            elif not look.needs_attention:
                streak_start = None
            logit_max_abs, logit_tolerance = logit_numbers(result) or (None, None)
            cells.append(HistoryCell(run, look, went_red, logit_max_abs, logit_tolerance))
        rows.append(HistoryRow(case_id, tuple(cells), runs[streak_start] if streak_start is not None else None,
                               red_before_window=streak_start == 0))
    rows.sort(key=lambda r: (r.red_since is None, r.case_id))
    return rows


# No red among them: red is the tolerance line.
SERIES_COLOURS = ("#0969da", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#4d2d00", "#6e7781",
                  "#9a6700", "#0550ae", "#116329", "#7d4e00")
PLOT_WIDTH, PLOT_HEIGHT, PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 1180, 300, 80, 110, 12, 60


def build_logit_plot(runs: list[RunColumn], rows: list[HistoryRow]) -> LogitPlot:
    """One series per case with logit numbers; x: the runs, evenly spaced; y: log10 of max|d|,
    spanning every value and every tolerance seen (so the distance to a tolerance is visible)."""
    values = [c.logit_max_abs for r in rows for c in r.cells if c is not None and c.logit_max_abs is not None]
    tolerances = sorted({c.logit_tolerance for r in rows for c in r.cells if c is not None and c.logit_tolerance})
    decades = [math.log10(v) for v in [*values, *tolerances] if math.isfinite(v) and v > 0]
    lo = math.floor(min(decades)) if decades else -8
    hi = max(math.ceil(max(decades)) if decades else 0, lo + 1)
    zero_at, non_finite_at = lo - 1, hi + 1  # the "0" line and the "nan/inf" line, in decade units
    inner_w = PLOT_WIDTH - PLOT_LEFT - PLOT_RIGHT
    inner_h = PLOT_HEIGHT - PLOT_TOP - PLOT_BOTTOM

    def x_of(i: int) -> float:
        return PLOT_LEFT + (i + 0.5) * inner_w / max(len(runs), 1)

    def y_of(decade: float) -> float:
        return PLOT_TOP + (non_finite_at - decade) / (non_finite_at - zero_at) * inner_h

    def y_of_value(v: float) -> float:
        if not math.isfinite(v):
            return y_of(non_finite_at)
        return y_of(zero_at) if v <= 0 else y_of(math.log10(v))

    series = []
    for row in rows:
        points = tuple(PlotPoint(x_of(i), y_of_value(c.logit_max_abs), c.run.name, format_value(c.logit_max_abs))
                       for i, c in enumerate(row.cells) if c is not None and c.logit_max_abs is not None)
        if points:
            series.append(PlotSeries(row.case_id, SERIES_COLOURS[len(series) % len(SERIES_COLOURS)], points))
    step = max(1, math.ceil((hi - lo + 1) / 8))  # at most ~8 decade labels
    y_ticks = [Tick(y_of(zero_at), "0"), *(Tick(y_of(d), f"1e{d}") for d in range(lo, hi + 1, step))]
    if any(not math.isfinite(v) for v in values):
        y_ticks.append(Tick(y_of(non_finite_at), "nan/inf"))
    return LogitPlot(PLOT_WIDTH, PLOT_HEIGHT, PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM, tuple(series),
                     tuple(y_ticks), tuple(Tick(x_of(i), r.short_time) for i, r in enumerate(runs)),
                     tuple(Tick(y_of(math.log10(t)), f"tol {format_value(t)}") for t in tolerances))


def read_runs(root: Path, last: int) -> tuple[list[RunColumn], list[dict[str, CaseResult]], list[tuple[str, str]]]:
    """The last ``last`` run folders under ``root`` with a results.json, oldest first (folder
    names start with a UTC stamp), skipping the ``latest`` link; plus those that could not be read."""
    if last < 1:
        raise ValueError(f"last={last}: the history needs at least one run")
    folders = sorted(p for p in root.iterdir()
                     if p.name != LATEST and not p.is_symlink() and (p / RESULTS_NAME).is_file())[-last:]
    runs, results, unreadable = [], [], []
    for folder in folders:
        try:
            doc, per_run = run_document.load_run(folder)
        except (ValueError, KeyError, TypeError) as err:  # bad JSON, another schema, a malformed case
            unreadable.append((folder.name, f"{type(err).__name__}: {err}"))
            continue
        meta = doc.get("meta") or {}
        runs.append(RunColumn(folder.name, str(meta.get("started_utc", "")), str(meta.get("label", "")),
                              str(meta.get("lane", "")), tuple(meta.get("injected_faults") or ()),
                              has_page=(folder / INDEX_NAME).is_file()))
        results.append(per_run)
    return runs, results, unreadable


def build_history(root: Path, last: int = 20) -> History:
    runs, results, unreadable = read_runs(root, last)
    rows = history_rows(runs, results)
    return History(tuple(runs), tuple(rows), build_logit_plot(runs, rows), tuple(unreadable))


def render_history_page(history: History) -> str:
    return _templates().get_template("history.html.j2").render(history=history)


def write_history(root: Path, history: History) -> Path:
    """``<root>/history.html`` (atomically)."""
    path = Path(root) / HISTORY_NAME
    workspace.atomic_write_text(path, render_history_page(history))
    return path


def write_history_page(root: Path, last: int = 20) -> Path:
    """``<root>/history.html`` over the last ``last`` runs under ``root``."""
    return write_history(root, build_history(Path(root), last))
