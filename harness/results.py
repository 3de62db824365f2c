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
