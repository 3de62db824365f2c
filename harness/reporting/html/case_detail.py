"""A case's drill-down on the run page: every check with its numbers, the failing tensors, the
golden comparison, where each rank group imported Megatron from, and the rank log tails."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.execution.run_dir import RunDir
from harness.reporting.html.case_grid import Cell
from harness.reporting.html.looks import GoldenView
from harness.reporting.html.rendering import format_value
from harness.results import OK_STATUSES, CaseResult, CheckResult

LOG_TAIL_LINES = 40


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


def group_provenance(group: str, doc: dict[str, Any]) -> GroupProvenance:
    runtime = doc.get("runtime") or {}
    return GroupProvenance(group, str(doc.get("megatron.core", "")), dict(doc.get("imported_from_trees") or {}),
                           tuple(Number(k, format_value(v)) for k, v in runtime.items()))


def build_case_view(run: RunDir, result: CaseResult, cell: Cell, view: GoldenView, launches: dict[str, list[str]],
                    provenance: dict[str, dict[str, Any]]) -> CaseView:
    """A case's drill-down. Log tails are inlined for a case that did not pass (a passing case
    links its log files: a matrix run would otherwise repeat one group's tail 100 times)."""
    groups = [group for group, case_ids in launches.items() if result.case_id in case_ids]
    log_files = tuple(str(log.relative_to(run.path)) for g in groups for log in sorted(run.log_dir(g).glob("*.log")))
    tails = () if result.status in OK_STATUSES else tuple(
        LogTail(g, text) for g in groups if (text := run.log_tail(g, LOG_TAIL_LINES)))
    return CaseView(
        cell=cell, lane=result.lane, world_size=result.world_size, duration_s=result.duration_s,
        error=result.error, unchecked_line=result.unchecked_line,
        checks=tuple(check_view(c) for c in result.checks), tensor_problems=tuple(tensor_problems(result)),
        golden=view, groups=tuple(group_provenance(g, provenance[g]) for g in groups if g in provenance),
        log_files=log_files, log_tails=tails, rank_errors=tuple(run.rank_errors(result.case_id)))
