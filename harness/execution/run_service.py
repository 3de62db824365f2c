"""Run a selection of cases into a run folder: the one service every entry point uses.

``harness run`` / ``matrix`` / ``gate`` / ``bisect-step`` / ``selftest`` and the pytest plugin all
call ``run_selection``, so every run has the same metadata (the installed versions golden/ records,
the source trees, the injected faults). It selects, executes and returns the results; the run's
reports (``results.json``, ``junit.xml``, ``summary.md``, ``index.html``, ``reports/latest``) are
written by the caller, a floor above (``harness.reporting.run_report.write_outcome``).

Cases that cannot run here are not launched: they come back as ``skip`` with the reason (a case
whose lane cannot build it, a GPU case needing more GPUs than this machine has); declared-invalid
layouts come back as ``invalid`` (``harness.execution.rank_launcher``).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

from harness.execution import provenance, rank_launcher
from harness.execution.run_dir import RunDir
from harness.matrix import lanes
from harness.matrix.cases import Case
from harness.results import SKIP, CaseResult
from harness.run_spec import RunSpec, SourceTree


@dataclass
class RunMeta:
    """What ``results.json`` carries as ``meta``: the document's view of a ``RunSpec`` (``of``, the
    one place it is built), with what this process saw (command, host, versions, wall time). Its
    keys and their order are the document's: golden/ and every run document read them."""

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

    @classmethod
    def of(cls, spec: RunSpec) -> "RunMeta":
        """``spec`` as the run document records it, started now, here."""
        return cls(
            label=spec.label,
            lane=spec.lane,
            command=" ".join(sys.argv),
            started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            host=platform.node(),
            python=platform.python_version(),
            injected_faults=list(spec.faults),
            source_trees=list(spec.source_trees),
            versions=provenance.package_versions(),
            cases_dir=str(spec.cases_dir),
            ranks_per_gpu=spec.placement.ranks_per_gpu,
            jobs=spec.jobs,
            not_tested=list(lanes.NOT_TESTED.get(spec.lane, ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def import_problem(spec: RunSpec) -> str:
    """Why a rank could not even start with ``spec``'s trees ('' if it can): the failing import
    or attribute, one line (``rank_launcher.import_probe``)."""
    return rank_launcher.import_probe(spec)


def run_selection(spec: RunSpec, *, stream: TextIO | None = sys.stderr,
                  on_result: Callable[[CaseResult], None] | None = None) -> RunOutcome:
    """Run ``spec.cases`` into a new run folder; progress (``[done/total] ... ETA``) goes to
    ``stream`` (None: silent). Returns the results in the order of the spec; the caller writes
    the run's reports (``run_report.write_outcome``)."""
    run = RunDir.create(spec.label)
    meta = RunMeta.of(spec)
    say = (lambda text: print(text, file=stream, flush=True)) if stream else (lambda text: None)
    say(f"harness: {len(spec.cases)} case(s) -> {run.path}")
    for tree in spec.source_trees:
        say(f"harness: using {tree.kind} {tree.path} @ {tree.sha[:12]}{' (dirty)' if tree.dirty else ''}")
    if spec.placement.ranks_per_gpu > 1:
        say(f"harness: {spec.placement.ranks_per_gpu} ranks per GPU: multi-rank cases use gloo with CUDA tensors "
            f"({lanes.NCCL_ONE_RANK_PER_GPU})")
    if spec.faults:
        say(f"harness: INJECTING seeded faults {spec.faults}: results do not describe the real stack")

    progress = rank_launcher.Progress(len(spec.cases), stream) if stream else None

    def record(result: CaseResult) -> None:
        if progress:
            progress.update(result)
        if on_result:
            on_result(result)

    started = time.monotonic()
    gpus = lanes.gpu_count() if spec.lane == lanes.GPU else None
    by_id: dict[str, CaseResult] = {}
    to_launch = []
    for case in spec.cases:
        reason = not_runnable_here(case, spec.lane, gpus, spec.placement)
        if reason:
            by_id[case.id] = CaseResult(case_id=case.id, status=SKIP, error=reason, lane=spec.lane,
                                        world_size=case.world_size)
            record(by_id[case.id])
        else:
            to_launch.append(case)
    for result in rank_launcher.run_cases(spec.with_cases(to_launch), run, on_result=record):
        by_id[result.case_id] = result
    meta.wall_s = round(time.monotonic() - started, 2)
    results = [by_id[c.id] for c in spec.cases]
    return RunOutcome(run=run, results=results, meta=meta)
