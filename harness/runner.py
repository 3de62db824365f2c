"""Run one case inside a rank and package the outcome as a ``CaseResult``.

The route (``harness.routes``) does the work; this module adds what every case needs around it:
a scratch folder, the environment restored afterwards (Megatron sets ``NVTE_*`` variables while
building a model, which would leak into the next case of the same process), and timing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from harness import routes
from harness.cases import Case
from harness.checks import CheckResult
from harness.routes import Hooks  # re-exported: tests inject faults through runner.Hooks

PASS, FAIL, ERROR, TIMEOUT, SKIP = "pass", "fail", "error", "timeout", "skip"

__all__ = ["CaseResult", "Hooks", "run_case", "error_result", "PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP"]


@dataclass
class CaseResult:
    case_id: str
    status: str
    checks: list[CheckResult] = field(default_factory=list)
    duration_s: float = 0.0
    error: str = ""
    world_size: int = 1
    lane: str = "cpu"

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


@contextlib.contextmanager
def restored_environ() -> Iterator[None]:
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_case(case: Case, runtime, hooks: Hooks | None = None, workdir: Path | None = None, lane: str | None = None) -> CaseResult:
    """Run ``case`` on this rank. Exceptions propagate (the worker decides what to do).

    ``workdir`` holds the case's scratch checkpoints; it is removed when the case passes and kept
    for debugging when it fails. Without one, a temporary folder is used.
    """
    start = time.monotonic()
    own_tmp = workdir is None
    if own_tmp:
        if routes.world() > 1:
            raise ValueError("run_case needs a shared workdir when there is more than one rank")
        workdir = Path(tempfile.mkdtemp(prefix="harness-case-"))
    ctx = routes.Context(runtime=runtime, workdir=workdir, hooks=hooks or Hooks())
    with restored_environ():
        results = routes.ROUTES[case.path](case, ctx)
    status = PASS if all(r.passed for r in results) else FAIL
    routes.barrier()
    if routes.rank() == 0 and (status == PASS or own_tmp):
        shutil.rmtree(workdir, ignore_errors=True)
    return CaseResult(
        case_id=case.id,
        status=status,
        checks=results,
        duration_s=round(time.monotonic() - start, 3),
        world_size=routes.world(),
        lane=lane or ("cpu" if runtime.backend == "gloo" else "gpu"),
    )


def error_result(case: Case, exc: BaseException, started: float, lane: str = "cpu") -> CaseResult:
    return CaseResult(
        case_id=case.id,
        status=ERROR,
        duration_s=round(time.monotonic() - started, 3),
        error="".join(traceback.format_exception(exc)),
        world_size=routes.world(),
        lane=lane,
    )
