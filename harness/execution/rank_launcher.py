"""Run cases in process groups, one group per world size, and never hang.

Cases that need the same number of ranks share one launch (``torch.distributed.run`` for more than
one rank, a plain subprocess for one), so the ~12 s import of megatron.bridge is paid once per
group. With ``jobs`` > 1 a group is split round-robin over that many concurrent launches: a
machine with cores (and GPU memory) to spare runs several rank groups at once, each paying the
import once. The launcher itself imports neither torch nor Megatron: it watches the files the ranks
write (``harness.execution.run_dir``) and enforces per-case timeouts from outside:

* a case that runs past its timeout, or a rank that dies, fails *that* case with the tail of the
  rank logs (a rank killed by a signal is named, with the signal); the group is killed and
  relaunched for the cases it had not reached;
* a launch that dies before starting any case because of the machine (a rendezvous or network
  error) is retried; if it keeps failing its cases are reported as ``infra-error``, never as a
  case failure. Any other early death (an import error) fails all its cases with the log tail.

Rendezvous is race-free: a world of one needs no TCP at all (the worker uses an in-memory
store), and torchrun's ``--standalone`` c10d rendezvous binds port 0 in the process that then
listens on it, so two harness runs on one machine never fight over a port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from harness import workspace
from harness.execution.run_dir import EXIT_CASE_ERROR, Plan, ProgressEvent, RunDir
from harness.execution.source_trees import pythonpath
from harness.matrix.cases import Case
from harness.matrix.lanes import rank_environment
from harness.results import (ERROR, INFRA_ERROR, INVALID, LOG_TAIL, NO_CASE_STARTED, TIMEOUT, CaseResult,
                             error_headline, error_section)
from harness.run_spec import RunSpec

STARTUP_ALLOWANCE_S = 180.0  # interpreter start + imports, on top of the first case's timeout
POLL_S = 0.5
LOG_TAIL_LINES = 40
INFRA_RETRIES = 2  # extra launches after a launch died of an infrastructure error before any case
# What a launch that died of the machine, not of the code under test, leaves in its logs.
INFRA_SIGNATURES = re.compile(
    r"DistNetworkError|RendezvousError|RendezvousConnectionError|RendezvousTimeoutError|EADDRINUSE|"
    r"Address already in use|failed to listen|Connection refused|No space left on device"
)


class Progress:
    """One line per finished case: ``[ 3/12] PASS id (4.2s)  ETA 0:45``."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.stream = stream

    def update(self, result: CaseResult) -> None:
        """Called from one thread at a time (``run_cases`` serialises its callbacks)."""
        self.done += 1
        elapsed = time.monotonic() - self.started
        left = self.total - self.done
        eta = elapsed / self.done * left if self.done else 0.0
        width = len(str(self.total))
        print(
            f"[{self.done:>{width}}/{self.total}] {result.label:7} {result.case_id} "
            f"({result.duration_s:.1f}s)  elapsed {_clock(elapsed)}  ETA {_clock(eta)}",
            file=self.stream,
            flush=True,
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"



def group_by_world_size(cases: Iterable[Case]) -> dict[int, list[Case]]:
    groups: dict[int, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.world_size, []).append(case)
    return dict(sorted(groups.items()))


def split_round_robin(cases: list[Case], jobs: int) -> list[list[Case]]:
    """``cases`` dealt over at most ``jobs`` launches, none empty (neighbouring cases, often of
    one family and so of similar cost, go to different launches)."""
    return [chunk for chunk in (cases[j::jobs] for j in range(max(1, jobs))) if chunk]


def run_cases(
    spec: RunSpec,
    run: RunDir,
    on_result: Callable[[CaseResult], None] | None = None,
    *,
    python: str = sys.executable,
) -> list[CaseResult]:
    """Run every case of ``spec``; returns results in its order. Declared-invalid cases are not
    run: their result says which layout rule they break. ``on_result`` is never called from two
    threads at once. ``python``: the ranks' interpreter."""
    if on_result is not None:
        lock, report = threading.Lock(), on_result

        def on_result(result: CaseResult) -> None:
            with lock:
                report(result)

    by_id: dict[str, CaseResult] = {}
    for case in spec.cases:
        if case.invalid_reason:
            by_id[case.id] = CaseResult(case_id=case.id, status=INVALID, error=case.invalid_reason, lane=spec.lane)
            if on_result:
                on_result(by_id[case.id])
    runnable = [c for c in spec.cases if not c.invalid_reason]
    for ws, group in group_by_world_size(runnable).items():
        chunks = split_round_robin(group, spec.jobs)
        if len(chunks) == 1:
            outcomes = [_run_group(spec.with_cases(group), ws, f"ws{ws}", run, python, on_result)]
        else:
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                outcomes = list(pool.map(lambda job: _run_group(spec.with_cases(chunks[job]), ws, f"ws{ws}j{job}",
                                                                run, python, on_result), range(len(chunks))))
        for result in (r for outcome in outcomes for r in outcome):
            by_id[result.case_id] = result
    return [by_id[c.id] for c in spec.cases]


class _InfraFailure(Exception):
    """A launch died of the machine before starting any case; ``reason`` says how."""

    def __init__(self, reason: str, tail: str):
        super().__init__(reason)
        self.reason, self.tail = reason, tail


def _run_group(spec: RunSpec, ws: int, name: str, run: RunDir, python: str, on_result) -> list[CaseResult]:
    """Launch ``spec``'s cases (one rank group of ``ws``), relaunching for the rest after a crash;
    the launches are ``<name>-<attempt>``."""
    pending = list(spec.cases)
    results: list[CaseResult] = []
    attempt, infra_failures = 0, 0
    while pending:
        attempt += 1
        group = f"{name}-{attempt}"
        try:
            finished = _launch_once(spec.with_cases(pending), ws, group, run, python, on_result)
        except _InfraFailure as failure:
            infra_failures += 1
            if infra_failures <= INFRA_RETRIES:
                continue
            for case in pending:
                result = _failure(case, INFRA_ERROR, f"infrastructure error, not a verdict on the case "
                                  f"({infra_failures} launches failed before any case started): {failure.reason}",
                                  failure.tail, ws, spec.lane)
                results.append(result)
                if on_result:
                    on_result(result)
            break
        results.extend(finished)
        done_ids = {r.case_id for r in finished}
        pending = [c for c in pending if c.id not in done_ids]
    return results


def import_probe(spec: RunSpec, timeout_s: float = 600, python: str = sys.executable) -> str:
    """Import the stack as a rank would with ``spec.source_trees`` (``rank_worker.import_stack``), in a
    fresh process: '' if it imports, else the exception's one line (``ImportError: cannot import
    name 'X' from 'megatron.core.Y'``). The gate asks this before it runs any case."""
    import json

    trees = json.dumps([t.to_dict() for t in spec.source_trees])
    cmd = [python, "-m", "harness.execution.rank_worker", "--probe", trees, "--lane", spec.lane]
    try:
        proc = subprocess.run(cmd, env=launch_environment(spec, 1), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"importing the stack took over {timeout_s:.0f} s"
    if proc.returncode == 0:
        return ""
    return error_headline(proc.stderr) or f"the import probe exited with code {proc.returncode}"


def launch_environment(spec: RunSpec, ws: int) -> dict[str, str]:
    """The environment a launch starts with: lane variables that must precede CUDA (TF32 off),
    the harness on ``PYTHONPATH`` behind any source trees, and a thread budget per launch when
    several run at once (torchrun already gives each of its ranks one thread; a world of one
    would otherwise take every core, ``jobs`` times over)."""
    env = dict(os.environ)
    env.update(rank_environment(spec.lane))  # before CUDA starts in the rank (e.g. TF32 off)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = pythonpath(spec.source_trees, os.pathsep.join(filter(None, [str(workspace.REPO_ROOT), env.get("PYTHONPATH", "")])))
    if ws == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        if spec.jobs > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.jobs)))
    return env


def _launch_once(spec: RunSpec, ws: int, group: str, run: RunDir, python: str,
                 on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """One launch of ``spec``'s cases: its plan (the spec, whole cases included), then the ranks."""
    plan_file = run.write_plan(Plan(
        spec=spec,
        run_dir=str(run.path),
        group=group,
        # Gloo/NCCL collectives give up a little after the longest case would be killed.
        collective_timeout_s=max(c.timeout_s for c in spec.cases) + 60,
    ))
    worker = ["-m", "harness.execution.rank_worker", "--plan", str(plan_file)]
    if ws == 1:
        cmd = [python, *worker]
    else:
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ws}",
               "--max_restarts=0", *worker]
    env = launch_environment(spec, ws)
    run.log_dir(group).mkdir(parents=True, exist_ok=True)
    with open(run.launcher_log(group), "ab") as launcher_log:
        proc = subprocess.Popen(cmd, env=env, stdout=launcher_log, stderr=subprocess.STDOUT, start_new_session=True)
        return _watch(proc, spec.cases, ws, group, run, spec.lane, on_result)


def _watch(proc: subprocess.Popen, cases: list[Case], ws: int, group: str, run: RunDir, lane: str,
           on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    finished: dict[str, CaseResult] = {}  # by case ID; only record() adds to it

    def record(case_id: str, result: CaseResult) -> None:
        """Keep ``result`` as ``case_id``'s, and report it (``on_result``: the progress line) the
        first time that case finishes."""
        first = case_id not in finished
        finished[case_id] = result
        if first and on_result:
            on_result(result)

    launched = time.monotonic()
    by_id = {c.id: c for c in cases}
    try:
        while True:
            for case in cases:
                if case.id not in finished:
                    result = run.read_case_result(case.id)
                    if result is not None:
                        record(case.id, result)
            current, since = _current_case(run, group, ws, by_id, finished)
            code = proc.poll()
            if code is not None:
                # Pick up results written in the last instant before exit.
                for case in cases:
                    if case.id not in finished and (r := run.read_case_result(case.id)):
                        record(case.id, r)
                if code != 0:
                    _attach_log_tails(finished, code, run, group)
                if len(finished) == len(cases):
                    break
                if current is not None:
                    # A rank died (or exited after recording an error) inside this case.
                    if current not in finished:
                        raised = _raised(run, current)
                        failure = _failure(by_id[current], ERROR, _exit_reason(code, run, group, current),
                                           run.log_tail(group, LOG_TAIL_LINES), ws, lane,
                                           cause=run.rank_error_cause(current, raised[0]) if raised else "")
                        failure.duration_s = round(time.time() - since, 3) if since is not None else 0.0
                        record(current, failure)
                    break
                if not finished:
                    tail = run.log_tail(group, LOG_TAIL_LINES)
                    infra = INFRA_SIGNATURES.search(tail)
                    if infra:
                        raise _InfraFailure(_line_of(tail, infra.start()), tail)
                    # Died before starting anything (e.g. an import error): every remaining case gets the same error.
                    for case in cases:
                        record(case.id, _failure(
                            case, ERROR, f"process group exited with code {code} before running any case", tail, ws, lane,
                            cause=NO_CASE_STARTED,
                        ))
                break  # otherwise: some cases finished, none in flight -> relaunch for the rest
            deadline_case = by_id.get(current) if current else None
            if deadline_case is not None and since is not None:
                if time.time() - since > deadline_case.timeout_s:
                    _kill(proc)
                    failure = _failure(
                        deadline_case, TIMEOUT, f"case ran past its {deadline_case.timeout_s:.0f}s timeout; process group killed",
                        run.log_tail(group, LOG_TAIL_LINES), ws, lane,
                    )
                    failure.duration_s = round(time.time() - since, 3)
                    record(current, failure)
                    break
            elif current is None and not finished and time.monotonic() - launched > STARTUP_ALLOWANCE_S + max(c.timeout_s for c in cases):
                _kill(proc)
                tail = run.log_tail(group, LOG_TAIL_LINES)
                for case in cases:
                    record(case.id, _failure(case, TIMEOUT, "process group did not start any case in time", tail, ws, lane))
                break
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            _kill(proc)
        _reap_leftovers(proc, run, group)
    return [finished[c.id] for c in cases if c.id in finished]


def _line_of(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start: end if end >= 0 else len(text)].strip()


def _attach_log_tails(finished: dict[str, CaseResult], code: int, run: RunDir, group: str) -> None:
    """A rank that saw a peer die records only its own side ("connection closed"); the cause is
    in torchrun's summary and the other ranks' logs. Put the dead rank (and its signal) first, so
    it is the headline, and append the log tails."""
    tail = None
    for result in finished.values():
        if result.status == ERROR and LOG_TAIL not in result.error:
            tail = tail if tail is not None else run.log_tail(group, LOG_TAIL_LINES)
            raised = _first_exception(run, result.case_id) if PEER_LOST.search(result.headline) else None
            if raised is not None:
                # Rank 0 only lost a peer; the peer's own exception is what went wrong.
                result.error = f"rank{raised[0]} raised: {raised[1]}{error_section('rank 0 traceback')}{result.error}"
                result.cause = run.rank_error_cause(result.case_id, raised[0]) or result.cause
            elif (died := _root_cause(run, group)) is not None and died.rank != 0 and died.died_on_its_own:
                # Died without raising (a signal, os._exit): that death is the headline. A rank that
                # exited with EXIT_CASE_ERROR raised, and rank 0's own exception stays the headline.
                result.error = f"{died.reason} during the case{error_section('rank 0 traceback')}{result.error}"
            result.error += error_section(f"process group exited with code {code}; log tail") + tail
            run.write_case_result(result)


def _current_case(run: RunDir, group: str, ws: int, by_id: dict, finished: dict) -> tuple[str | None, float | None]:
    """The earliest-started unfinished case (the one the slowest rank is in), and when it began."""
    current, since = None, None
    for event in run.progress(group, ws):
        if event.case in by_id and event.event == ProgressEvent.START and event.case not in finished:
            if since is None or event.t < since:
                current, since = event.case, event.t
    return current, since


# torchrun's failure summary (torch/distributed/elastic/multiprocessing/errors/error_handler.py
# via ChildFailedError.format_msg): one block per failed rank, then the "Root Cause" block.
_SUMMARY_START = "Failures:"
_FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(?P<rank>\d+).*?^\s*exitcode\s*:\s*(?P<code>-?\d+)", re.S | re.M)


@dataclass(frozen=True)
class _DeadRank:
    rank: int
    exit_code: int  # negative: killed by signal -exit_code

    @property
    def died_on_its_own(self) -> bool:
        """Not a rank that exited on purpose after recording its error, nor one torchrun's agent
        stopped (SIGTERM) once a peer had failed."""
        return self.exit_code not in (EXIT_CASE_ERROR, -signal.SIGTERM)

    @property
    def reason(self) -> str:
        if self.exit_code < 0:
            number = -self.exit_code
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = "unknown signal"
            return f"rank {self.rank} was killed by signal {number} ({name})"
        return f"rank {self.rank} exited with code {self.exit_code}"


def _root_cause(run: RunDir, group: str, code: int | None = None) -> _DeadRank | None:
    """The rank whose death ended a launch. torchrun lists every failed rank, but its "Root Cause"
    is only the earliest by a one-second timestamp, so a rank that exited on purpose after a peer
    vanished (``EXIT_CASE_ERROR``), or one the agent then stopped (SIGTERM), can tie with and win
    over the peer that was killed. Prefer the rank that died on its own. The launcher log is
    appended to by every relaunch of the group: only its last summary is this launch's. A world
    of one is its own process (``code``)."""
    launcher = run.launcher_log(group)
    text = launcher.read_text(errors="replace") if launcher.exists() else ""
    start = text.rfind(_SUMMARY_START)
    failed = [_DeadRank(int(m["rank"]), int(m["code"])) for m in _FAILED_RANK.finditer(text[start:])] if start >= 0 else []
    if failed:
        root, others = failed[-1], failed[:-1]  # the "Root Cause" block comes last
        return next((d for d in [root, *others] if d.died_on_its_own), root)
    if code is not None and code < 0:
        return _DeadRank(0, code)
    return None


# What a rank raises when a peer is gone or stuck, rather than what went wrong: gloo's and NCCL's
# transport errors (c10d ProcessGroupGloo/NCCL), the collective timeout, torch's DistError family.
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|DistBackendError|"
                       r"DistNetworkError|DistStoreError|[Tt]imed out|ProcessGroupGloo|NCCL (?:error|communicator)")


def _first_exception(run: RunDir, case_id: str) -> tuple[int, str] | None:
    """The first non-zero rank that raised something other than a lost peer: (rank, headline)."""
    for rank, text in run.rank_errors(case_id):
        headline = error_headline(text)
        if headline and not PEER_LOST.search(headline):
            return rank, headline
    return None


def _raised(run: RunDir, case_id: str) -> tuple[int, str] | None:
    """The non-zero rank whose own error explains ``case_id`` (rather than a lost peer, if any
    has one), with its headline."""
    return _first_exception(run, case_id) or next(
        ((rank, error_headline(text)) for rank, text in run.rank_errors(case_id)), None)


def _exit_reason(code: int, run: RunDir, group: str, case_id: str) -> str:
    """Why a launch ended inside ``case_id``: the rank that raised (its exception line), or the
    rank that died without raising and how."""
    raised = _raised(run, case_id)
    if raised:
        return f"rank{raised[0]} raised: {raised[1] or '?'}"
    died = _root_cause(run, group, code)
    if died is not None:
        return f"{died.reason} during the case"
    return f"a rank exited with code {code} during the case"


def _failure(case: Case, status: str, reason: str, tail: str, ws: int, lane: str, cause: str = "") -> CaseResult:
    return CaseResult(case_id=case.id, status=status, error=f"{reason}{LOG_TAIL}{tail}", world_size=ws, lane=lane,
                      cause=cause)


def _reap_leftovers(proc: subprocess.Popen, run: RunDir, group: str) -> None:
    """Kill what is left of a finished launch. A rank that exits hard (a crash, ``os._exit`` after
    a case error, a SIGKILL) leaves its own children behind, e.g. the ``multiprocessing.Manager``
    of megatron-core's async checkpoint writer (filesystem_async.py, ~570 MB each), reparented but
    still in its process group: the launch's own (one rank, started here in a new session), or the
    rank's (torchrun starts every rank in a session of its own; each worker records its group).
    Never this process's own group."""
    own = os.getpgrp()
    for pgid in {proc.pid, *run.rank_process_groups(group)} - {own}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


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
