"""Result records shared by the worker, the launcher, reports and pytest (no torch import:
the launcher and ``harness diff`` stay light)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PASS, FAIL, ERROR, TIMEOUT, SKIP = "pass", "fail", "error", "timeout", "skip"
INVALID = "invalid"  # a layout the case file declares impossible: refused up front, never run
OK_STATUSES = (PASS, SKIP, INVALID)


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

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

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


def _preview(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", +{len(keys) - n} more" if len(keys) > n else "")


def tensor_set_summary(compared: int, bad_rows: list[dict[str, Any]], missing: list[str], extra: list[str],
                       duplicates: list[str] = (), *, missing_label: str = "missing",
                       extra_label: str = "extra") -> tuple[bool, str]:
    """(passed, one-line summary) of a key-by-key comparison; shared by checks and diff."""
    if not (missing or extra or duplicates or bad_rows):
        return True, f"{compared}/{compared} tensors bitwise equal"
    parts = []
    if missing:
        parts.append(f"{len(missing)} {missing_label} ({_preview(missing)})")
    if extra:
        parts.append(f"{len(extra)} {extra_label} ({_preview(extra)})")
    if duplicates:
        parts.append(f"{len(duplicates)} produced twice ({_preview(list(duplicates))})")
    if bad_rows:
        first = bad_rows[0]
        parts.append(f"{len(bad_rows)}/{compared} differ (first: {first['key']}: {first['status']})")
    return False, "; ".join(parts)
