"""Run one case inside a rank and package the outcome as a ``CaseResult``.

The route (``harness.conversion.routes``) does the work; this module adds what every case needs
around it: a scratch folder, the environment restored afterwards (Megatron sets ``NVTE_*``
variables while building a model, which would leak into the next case of the same process), and
timing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

from harness.conversion import routes
from harness.conversion.routes import Hooks  # re-exported: tests inject faults through case_executor.Hooks
from harness.matrix.cases import Case
from harness.results import ERROR, FAIL, IMPORT_ERROR, PASS, CaseResult
from harness.runtimes.base import Runtime

__all__ = ["CaseResult", "Hooks", "run_case", "error_result", "PASS", "FAIL", "ERROR"]


def restored_environ() -> contextlib.AbstractContextManager:
    """``os.environ`` as it was before the block, on exit (what the block set or removed is undone)."""
    return mock.patch.dict(os.environ)


def run_case(case: Case, runtime: Runtime, hooks: Hooks | None = None, workdir: Path | None = None) -> CaseResult:
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
        lane=runtime.lane,
        fingerprint=ctx.fingerprint,
    )


def error_result(case: Case, exc: BaseException, started: float, lane: str) -> CaseResult:
    return CaseResult(
        case_id=case.id,
        status=ERROR,
        duration_s=round(time.monotonic() - started, 3),
        error="".join(traceback.format_exception(exc)),
        world_size=routes.world(),
        lane=lane,
        cause=IMPORT_ERROR if _raised_by_an_import(exc) else "",
    )


def _raised_by_an_import(exc: BaseException | None) -> bool:
    """``exc``, or an exception it was raised from or while handling, is an ImportError or a
    SyntaxError: the tree under test cannot be imported, whatever the case would have shown."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (ImportError, SyntaxError)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
