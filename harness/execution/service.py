"""Run a selection of cases into a run folder: the one service every entry point uses.

``harness run`` / ``matrix`` / ``gate`` / ``bisect-step`` / ``selftest`` and the pytest plugin all
call ``run_selection``, so every run has the same metadata (the installed versions golden/ records,
the source trees, the injected faults). It selects, executes and returns the results; the run's
reports (``results.json``, ``junit.xml``, ``summary.md``, ``index.html``, ``reports/latest``) are
written by the caller, a floor above (``harness.reporting.run_report.write_outcome``).

Cases that cannot run here are not launched: they come back as ``skip`` with the reason (a case
whose lane cannot build it, a GPU case needing more GPUs than this machine has); declared-invalid
layouts come back as ``invalid`` (``harness.execution.launch``).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from harness import workspace
from harness.execution import launch, provenance
from harness.execution.run_dir import RunDir
from harness.execution.source_trees import SourceTree
from harness.matrix.cases import Case
from harness.results import SKIP, CaseResult
from harness.matrix import lanes


@dataclass
class RunMeta:
    """What a run was asked to do and on what; ``results.json`` carries it as ``meta``."""

    label: str
    lane: str
    command: str = ""
    started_utc: str = ""
    host: str = ""
    python: str = ""
    injected_faults: list[str] = field(default_factory=list)
    source_trees: list[SourceTree] = field(default_factory=list)
    ranks_per_gpu: int = 1  # GPU lane: ranks sharing one GPU (over gloo when > 1; lanes.Placement)
    jobs: int = 1  # concurrent launches per world size
    versions: dict[str, str] = field(default_factory=dict)
    cases_dir: str = ""  # the case files the run was selected from (its summary's coverage section)
    wall_s: float = 0.0
    not_tested: list[str] = field(default_factory=list)  # what a pass on this lane does not vouch for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunRequest:
    cases: list[Case]
    lane: str = lanes.CPU
    label: str = "run"
    faults: list[str] = field(default_factory=list)  # seeded regressions, applied by fault_provider
    fault_provider: str = ""  # the module that applies them in the ranks, by name (run_dir.Plan.fault_provider)
    source_trees: list[SourceTree] = field(default_factory=list)
    cases_dir: Path = workspace.CASES_DIR
    placement: lanes.Placement = field(default_factory=lanes.Placement)
    jobs: int = 1  # concurrent launches per world size (harness.execution.launch)


@dataclass
class RunOutcome:
    run: RunDir
    results: list[CaseResult]
    meta: RunMeta


def not_runnable_here(case: Case, lane: str, gpus: int | None = None,
                      placement: lanes.Placement = lanes.Placement()) -> str:
    """Why ``case`` will not be launched on ``lane`` on this machine ('' if it will)."""
    if case.invalid_reason:
        return ""  # reported as invalid by the launcher, never run
    return (lanes.case_blocker(case, lane)
            or lanes.capacity_blocker(case.world_size, lane, gpus, placement.ranks_per_gpu))


def _launch_options(request: RunRequest) -> launch.LaunchOptions:
    return launch.LaunchOptions(lane=request.lane, cases_dir=request.cases_dir, faults=list(request.faults),
                                fault_provider=request.fault_provider, source_trees=list(request.source_trees), placement=request.placement,
                                jobs=request.jobs)


def import_problem(request: RunRequest) -> str:
    """Why a rank could not even start with ``request``'s trees ('' if it can): the failing import
    or attribute, one line (``launch.import_probe``)."""
    return launch.import_probe(_launch_options(request))


def run_selection(request: RunRequest, *, stream: TextIO | None = sys.stderr,
                  on_result: Callable[[CaseResult], None] | None = None) -> RunOutcome:
    """Run ``request.cases`` into a new run folder; progress (``[done/total] ... ETA``) goes to
    ``stream`` (None: silent). Returns the results in the order of the request; the caller writes
    the run's reports (``run_report.write_outcome``)."""
    run = RunDir.create(request.label)
    meta = RunMeta(
        label=request.label,
        lane=request.lane,
        command=" ".join(sys.argv),
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        host=platform.node(),
        python=platform.python_version(),
        injected_faults=list(request.faults),
        source_trees=list(request.source_trees),
        versions=provenance.package_versions(),
        cases_dir=str(request.cases_dir),
        ranks_per_gpu=request.placement.ranks_per_gpu,
        jobs=request.jobs,
        not_tested=list(lanes.NOT_TESTED.get(request.lane, ())),
    )
    say = (lambda text: print(text, file=stream, flush=True)) if stream else (lambda text: None)
    say(f"harness: {len(request.cases)} case(s) -> {run.path}")
    for tree in request.source_trees:
        say(f"harness: using {tree.kind} {tree.path} @ {tree.sha[:12]}{' (dirty)' if tree.dirty else ''}")
    if request.placement.ranks_per_gpu > 1:
        say(f"harness: {request.placement.ranks_per_gpu} ranks per GPU: multi-rank cases use gloo with CUDA tensors "
            f"({lanes.NCCL_ONE_RANK_PER_GPU})")
    if request.faults:
        say(f"harness: INJECTING seeded faults {request.faults}: results do not describe the real stack")

    progress = launch.Progress(len(request.cases), stream) if stream else None

    def record(result: CaseResult) -> None:
        if progress:
            progress.update(result)
        if on_result:
            on_result(result)

    started = time.monotonic()
    gpus = lanes.gpu_count() if request.lane == lanes.GPU else None
    by_id: dict[str, CaseResult] = {}
    to_launch = []
    for case in request.cases:
        reason = not_runnable_here(case, request.lane, gpus, request.placement)
        if reason:
            by_id[case.id] = CaseResult(case_id=case.id, status=SKIP, error=reason, lane=request.lane,
                                        world_size=case.world_size)
            record(by_id[case.id])
        else:
            to_launch.append(case)
    for result in launch.run_cases(to_launch, run, _launch_options(request), on_result=record):
        by_id[result.case_id] = result
    meta.wall_s = round(time.monotonic() - started, 2)
    results = [by_id[c.id] for c in request.cases]
    return RunOutcome(run=run, results=results, meta=meta)
