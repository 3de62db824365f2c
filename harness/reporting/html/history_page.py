"""``<reports>/history.html``: a case x run matrix over the last N runs, marking where each case
went red, and an inline-SVG plot of the logit max|d| per case, so drift shows before it crosses a
tolerance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from harness import workspace
from harness.execution.run_dir import LATEST, RESULTS_NAME
from harness.reporting import run_document
from harness.reporting.html.looks import KNOWN_LOOK, STATUS_LOOKS, Look, golden_view, result_look
from harness.reporting.html.rendering import HISTORY_NAME, INDEX_NAME, case_anchor, format_value, templates
from harness.results import CaseResult

LOGIT_CHECK = "logits-hf-vs-megatron"  # whose max|d| the history plots (named in conversion.routes.logits_vs_hf)


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
    case_ids = list(dict.fromkeys(case_id for per_run in results for case_id in per_run))  # first seen first
    rows = []
    for case_id in case_ids:
        cells: list[HistoryCell | None] = []
        streak_start: int | None = None
        for i, (run, per_run) in enumerate(zip(runs, results)):
            result = per_run.get(case_id)
            if result is None:
                cells.append(None)
                continue
            look = result_look(result, golden_view(result))
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
    return templates().get_template("history.html.j2").render(history=history)


def write_history(root: Path, history: History) -> Path:
    """``<root>/history.html`` (atomically)."""
    path = Path(root) / HISTORY_NAME
    workspace.atomic_write_text(path, render_history_page(history))
    return path


def write_history_page(root: Path, last: int = 20) -> Path:
    """``<root>/history.html`` over the last ``last`` runs under ``root``."""
    return write_history(root, build_history(Path(root), last))
