"""Run cases in process groups, one group per world size, and never hang.

Cases that need the same number of ranks share one launch (``torch.distributed.run`` for more than
one rank, a plain subprocess for one), so the ~12 s import of megatron.bridge is paid once per
group. The launcher itself imports neither torch nor Megatron: it watches the files the ranks
write (``harness.execution.run_dir``) and enforces per-case timeouts from outside:

* a case that runs past its timeout, or a rank that dies, fails *that* case with the tail of the
  rank logs; the group is killed and relaunched for the cases it had not reached;
* a launch that dies before starting any case fails all its cases with the log tail (an import
  error would otherwise be retried forever).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from harness import workspace
from harness.execution.run_dir import Plan, ProgressEvent, RunDir
from harness.execution.source_trees import SourceTree, pythonpath
from harness.matrix.cases import Case
from harness.results import ERROR, INVALID, TIMEOUT, CaseResult

STARTUP_ALLOWANCE_S = 180.0  # interpreter start + imports, on top of the first case's timeout
POLL_S = 0.5
LOG_TAIL_LINES = 40


@dataclass
class LaunchOptions:
    lane: str = "cpu"
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every rank
    faults: list[str] = field(default_factory=list)  # seeded regressions (harness.regression.faults)
    source_trees: list[SourceTree] = field(default_factory=list)  # ahead of the installed wheels
    cases_dir: Path = workspace.CASES_DIR


class Progress:
    """One line per finished case: ``[ 3/12] PASS id (4.2s)  ETA 0:45``."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.stream = stream

    def update(self, result: CaseResult) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = self.total - self.done
        eta = elapsed / self.done * left if self.done else 0.0
        width = len(str(self.total))
        print(
            f"[{self.done:>{width}}/{self.total}] {result.status.upper():7} {result.case_id} "
            f"({result.duration_s:.1f}s)  elapsed {_clock(elapsed)}  ETA {_clock(eta)}",
            file=self.stream,
            flush=True,
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_by_world_size(cases: Iterable[Case]) -> dict[int, list[Case]]:
    groups: dict[int, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.world_size, []).append(case)
    return dict(sorted(groups.items()))


def run_cases(
    cases: list[Case],
    run: RunDir,
    options: LaunchOptions,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run every case; returns results in the order given. Declared-invalid cases are not run:
    their result says which layout rule they break."""
    by_id: dict[str, CaseResult] = {}
    for case in cases:
        if case.invalid_reason:
            by_id[case.id] = CaseResult(case_id=case.id, status=INVALID, error=case.invalid_reason, lane=options.lane)
            if on_result:
                on_result(by_id[case.id])
    runnable = [c for c in cases if not c.invalid_reason]
    for ws, group in group_by_world_size(runnable).items():
        for result in _run_group(group, ws, run, options, on_result):
            by_id[result.case_id] = result
    return [by_id[c.id] for c in cases]


def _run_group(cases, ws, run: RunDir, options, on_result) -> list[CaseResult]:
    pending = list(cases)
    results: list[CaseResult] = []
    attempt = 0
    while pending:
        attempt += 1
        group = f"ws{ws}-{attempt}"
        finished = _launch_once(pending, ws, group, run, options, on_result)
        results.extend(finished)
        done_ids = {r.case_id for r in finished}
        pending = [c for c in pending if c.id not in done_ids]
    return results


def _launch_once(cases: list[Case], ws: int, group: str, run: RunDir, options: LaunchOptions,
                 on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    plan_file = run.write_plan(Plan(
        run_dir=str(run.path),
        group=group,
        lane=options.lane,
        cases=[c.id for c in cases],
        cases_dir=str(options.cases_dir),
        faults=list(options.faults),
        source_trees=list(options.source_trees),
        # Gloo/NCCL collectives give up a little after the longest case would be killed.
        collective_timeout_s=max(c.timeout_s for c in cases) + 60,
    ))
    worker = ["-m", "harness.execution.worker", "--plan", str(plan_file)]
    if ws == 1:
        cmd = [options.python, *worker]
    else:
        cmd = [
            options.python, "-m", "torch.distributed.run",
            f"--nproc_per_node={ws}", "--nnodes=1", "--max_restarts=0",
            f"--master_addr=127.0.0.1", f"--master_port={free_port()}",
            *worker,
        ]
    env = dict(os.environ)
    env.update(options.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = pythonpath(options.source_trees, os.pathsep.join(filter(None, [str(workspace.REPO_ROOT), env.get("PYTHONPATH", "")])))
    if ws == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    run.log_dir(group).mkdir(parents=True, exist_ok=True)
    with open(run.launcher_log(group), "ab") as launcher_log:
        proc = subprocess.Popen(cmd, env=env, stdout=launcher_log, stderr=subprocess.STDOUT, start_new_session=True)
        return _watch(proc, cases, ws, group, run, options.lane, on_result)


class _Finished(dict):
    """Results by case ID; reports each one (progress line) the moment it is first recorded."""

    def __init__(self, on_result):
        super().__init__()
        self.on_result = on_result

    def __setitem__(self, key, value):
        first = key not in self
        super().__setitem__(key, value)
        if first and self.on_result:
            self.on_result(value)


def _watch(proc: subprocess.Popen, cases: list[Case], ws: int, group: str, run: RunDir, lane: str,
           on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    finished: dict[str, CaseResult] = _Finished(on_result)
    launched = time.monotonic()
    by_id = {c.id: c for c in cases}
    while True:
        for case in cases:
            if case.id not in finished:
                result = run.read_case_result(case.id)
                if result is not None:
                    finished[case.id] = result
        current, since = _current_case(run, ws, by_id, finished)
        code = proc.poll()
        if code is not None:
            # Pick up results written in the last instant before exit.
            for case in cases:
                if case.id not in finished and (r := run.read_case_result(case.id)):
                    finished[case.id] = r
            if code != 0:
                _attach_log_tails(finished, code, run, group)
            if len(finished) == len(cases):
                break
            if current is not None:
                # A rank died (or exited after recording an error) inside this case.
                if current not in finished:
                    finished[current] = _failure(
                        by_id[current], ERROR, _exit_reason(code, run, current), run.log_tail(group, LOG_TAIL_LINES), ws, lane
                    )
                break
            if not finished:
                # Died before starting anything: every remaining case gets the same error.
                tail = run.log_tail(group, LOG_TAIL_LINES)
                for case in cases:
                    finished[case.id] = _failure(
                        case, ERROR, f"process group exited with code {code} before running any case", tail, ws, lane
                    )
            break  # otherwise: some cases finished, none in flight -> relaunch for the rest
        deadline_case = by_id.get(current) if current else None
        if deadline_case is not None and since is not None:
            if time.time() - since > deadline_case.timeout_s:
                _kill(proc)
                finished[current] = _failure(
                    deadline_case, TIMEOUT, f"case ran past its {deadline_case.timeout_s:.0f}s timeout; process group killed",
                    run.log_tail(group, LOG_TAIL_LINES), ws, lane,
                )
                break
        elif current is None and not finished and time.monotonic() - launched > STARTUP_ALLOWANCE_S + max(c.timeout_s for c in cases):
            _kill(proc)
            tail = run.log_tail(group, LOG_TAIL_LINES)
            for case in cases:
                finished[case.id] = _failure(case, TIMEOUT, "process group did not start any case in time", tail, ws, lane)
            break
        time.sleep(POLL_S)
    if proc.poll() is None:
        _kill(proc)
    return [finished[c.id] for c in cases if c.id in finished]


def _attach_log_tails(finished: dict[str, CaseResult], code: int, run: RunDir, group: str) -> None:
    """A rank that saw a peer die records only its own side ("connection closed"); the cause is
    in the other ranks' logs and torchrun's summary, so append them to that error result."""
    tail = None
    for result in finished.values():
        if result.status == ERROR and "--- log tail ---" not in result.error:
            tail = tail if tail is not None else run.log_tail(group, LOG_TAIL_LINES)
            result.error += f"\n--- process group exited with code {code}; log tail ---\n{tail}"
            run.write_case_result(result)


def _current_case(run: RunDir, ws: int, by_id: dict, finished: dict) -> tuple[str | None, float | None]:
    """The earliest-started unfinished case (the one the slowest rank is in), and when it began."""
    current, since = None, None
    for event in run.progress(ws):
        if event.case in by_id and event.event == ProgressEvent.START and event.case not in finished:
            if since is None or event.t < since:
                current, since = event.case, event.t
    return current, since


def _exit_reason(code: int, run: RunDir, case_id: str) -> str:
    errors = run.rank_errors(case_id)
    if errors:
        rank, text = errors[0]
        last = text.strip().splitlines()
        return f"rank{rank} raised: {last[-1] if last else '?'}"
    if code < 0:
        return f"a rank was killed by signal {-code}"
    return f"a rank exited with code {code} during the case"


def _failure(case: Case, status: str, reason: str, tail: str, ws: int, lane: str) -> CaseResult:
    return CaseResult(case_id=case.id, status=status, error=f"{reason}\n--- log tail ---\n{tail}", world_size=ws, lane=lane)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the whole process group (torchrun and every rank it spawned)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
