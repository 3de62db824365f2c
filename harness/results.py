"""The result vocabulary every part of the harness speaks: statuses, check and case results.

No torch import: the launcher, reports, golden, gate and ``harness diff`` stay light. These
dataclasses cross the process boundary as JSON (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

# Case statuses. A case PASSes when every check passed; FAIL when a check failed; ERROR when it
# crashed; TIMEOUT when the launcher killed it; SKIP when it could not run here (the reason is in
# ``error``); INVALID when its layout is declared impossible (refused up front, never run);
# INFRA_ERROR when the machine, not the code under test, kept it from running (e.g. rendezvous).
PASS, FAIL, ERROR, TIMEOUT, SKIP = "pass", "fail", "error", "timeout", "skip"
INVALID = "invalid"
INFRA_ERROR = "infra-error"
OK_STATUSES = (PASS, SKIP, INVALID)
CRASHED = (ERROR, TIMEOUT)
FAILED = (FAIL, *CRASHED)  # ran and did not pass: what golden/ can pin as a known upstream failure
# This machine, not the stack, decided the outcome (too few GPUs, a rendezvous that failed): no
# verdict on the code under test, and never something golden/ pins.
NOT_RUN_HERE = (SKIP, INFRA_ERROR)

# What kind of crash an ERROR was (``CaseResult.cause``), recorded by the code that saw it, so no
# reader has to guess it from the error text. NO_CASE_STARTED: the ranks died before running any
# case (the stack did not import, or came from the wrong tree: ``rank_worker.import_stack``);
# IMPORT_ERROR: the case raised ImportError or SyntaxError on a rank (e.g. an API its code path imports
# lazily); a peer's is carried to rank 0's result with its exception (``rank_launcher``).
NO_CASE_STARTED, IMPORT_ERROR = "no-case-started", "import-error"

# Gate verdicts (``harness.regression.gate`` decides them; reports render them): a case judged
# against golden/ and a baseline, and INCOMPATIBLE for a candidate that cannot even start.
V_PASS, REGRESSED, FIXED, STILL_FAILING, NOT_RUN = "PASS", "REGRESSED", "FIXED", "STILL-FAILING", "NOT-RUN"
INCOMPATIBLE = "INCOMPATIBLE"
VERDICT_ORDER = {INCOMPATIBLE: -1, REGRESSED: 0, STILL_FAILING: 1, FIXED: 2, NOT_RUN: 3, V_PASS: 4}  # worst first

# The launcher appends sections to a case's error text (rank 0's traceback under a peer's
# exception, the rank log tails), each opened by ``error_section(title)``. What precedes the first
# one is the error itself: the only part ``error_headline`` reads.
_SECTION_MARK = "\n--- "


def error_section(title: str) -> str:
    """The header line that opens a section the launcher appends to an error text."""
    return f"{_SECTION_MARK}{title} ---\n"


LOG_TAIL = error_section("log tail")  # the launcher's own failures: its reason, then the log tail


@dataclass
class CheckResult:
    """Outcome of one check on one case. ``summary`` is the one line a human reads first."""

    name: str
    passed: bool
    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def skip(cls, name: str, reason: str) -> "CheckResult":
        return cls(name=name, passed=True, summary=f"skipped: {reason}", skipped=True)


def error_headline(error: str) -> str:
    """The line of an error text that says what went wrong.

    For a Python traceback that is the exception (the last one, after any chained ones, with a
    message over several lines joined), not ``Traceback (most recent call last):`` nor the last
    line of a long message; for the launcher's own messages the first line. Rank log tails the
    launcher appends are never the headline.
    """
    block = error.split(_SECTION_MARK, 1)[0]
    lines = [line.rstrip() for line in block.strip("\n").splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.strip().startswith("Traceback (most recent call last)") for line in lines):
        # The exception starts at column 0 (frames and code are indented); a message that spans
        # lines (``Shape mismatch ...:\n  Expected ...``) is joined into one.
        starts = [i for i, line in enumerate(lines)
                  if not line[:1].isspace() and not line.startswith(_TRACEBACK_FRAMING)]
        return " ".join(line.strip() for line in lines[starts[-1]:]) if starts else lines[-1].strip()
    return lines[0].strip()


_TRACEBACK_FRAMING = ("Traceback (most recent call last)", "During handling of the above exception",
                      "The above exception was the direct cause")


@dataclass
class CaseResult:
    case_id: str
    status: str
    checks: list[CheckResult] = field(default_factory=list)
    duration_s: float = 0.0
    error: str = ""
    world_size: int = 1
    lane: str = "cpu"
    # format -> {key: [shape, dtype, sha256 of the bytes]}, plus "logits" -> metrics; for golden/
    fingerprint: dict[str, Any] = field(default_factory=dict)
    cause: str = ""  # an ERROR's kind where known: NO_CASE_STARTED, IMPORT_ERROR; else ''

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    @property
    def first_failing_check(self) -> CheckResult | None:
        return next((c for c in self.checks if not c.passed), None)

    @property
    def unchecked(self) -> list[CheckResult]:
        """Checks that could not run for this case (each says why): a pass with these is partial."""
        return [c for c in self.checks if c.skipped]

    @property
    def label(self) -> str:
        """The status as people read it: ``PASS*`` is a pass with checks that could not run."""
        return f"{self.status.upper()}*" if self.status == PASS and self.unchecked else self.status.upper()

    @property
    def unchecked_line(self) -> str:
        """``not checked: <check> (<why>)``, for a partial pass."""
        return "; ".join(f"not checked: {c.name} ({c.summary.removeprefix('skipped: ')})" for c in self.unchecked)

    @property
    def headline(self) -> str:
        """Why this case did not pass, in one line: the first failing check, else the error's
        headline (the exception line of a crash, the launcher's reason, a skip's reason)."""
        bad = self.first_failing_check
        if bad is not None:
            return f"{bad.name}: {bad.summary}"
        return error_headline(self.error)

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"{self.case_id}: no check named {name!r} (have {[c.name for c in self.checks]})")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [c.to_dict() for c in self.checks]
        out["failed_checks"] = self.failed_checks
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CaseResult":
        data = dict(data)
        data.pop("failed_checks", None)
        data["checks"] = [CheckResult(**c) for c in data.get("checks", [])]
        return cls(**data)


def status_counts(results: Iterable[CaseResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


# ----------------------------------------------------------------------- tensor-set comparisons


def _preview(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", +{len(keys) - n} more" if len(keys) > n else "")


@dataclass
class TensorSetComparison:
    """A key-by-key comparison of a reference tensor set with a candidate one: the one result
    shape of the ``tensors`` check and of ``harness diff``.

    ``missing`` keys are in the reference only, ``extra`` keys in the candidate only; ``rows`` hold
    one dict per compared tensor (``key``, ``shape``, ``dtype``, ``status`` = ``ok`` or what is
    wrong, ``max_abs_diff``), the problem rows always and the ``ok`` rows up to a limit.
    """

    compared: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    missing_label: str = "missing"
    extra_label: str = "extra"

    @property
    def bad_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]

    @property
    def passed(self) -> bool:
        return not (self.missing or self.extra or self.duplicates or self.bad_rows)

    @property
    def max_abs_diff(self) -> float:
        worst = 0.0
        for row in self.rows:
            diff = row.get("max_abs_diff")
            if diff is not None:
                worst = max(worst, diff if diff == diff else float("inf"))  # NaN counts as worst
        return worst

    @property
    def summary(self) -> str:
        if self.passed:
            return f"{self.compared}/{self.compared} tensors bitwise equal"
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} {self.missing_label} ({_preview(self.missing)})")
        if self.extra:
            parts.append(f"{len(self.extra)} {self.extra_label} ({_preview(self.extra)})")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} produced twice ({_preview(self.duplicates)})")
        bad = self.bad_rows
        if bad:
            parts.append(f"{len(bad)}/{self.compared} differ (first: {bad[0]['key']}: {bad[0]['status']})")
        return "; ".join(parts)

    def check(self, name: str, **metrics: Any) -> CheckResult:
        return CheckResult(
            name=name,
            passed=self.passed,
            summary=self.summary,
            metrics={
                "compared": self.compared,
                "mismatched": len(self.bad_rows),
                "missing": self.missing,
                "extra": self.extra,
                "duplicates": self.duplicates,
                "max_abs_diff": self.max_abs_diff,
                **metrics,
            },
            details=self.rows,
        )
