"""A launch that dies of the machine before any case starts is retried, then reported as an
infrastructure error, never as a case failure (the launcher's own logic; fake interpreters)."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from harness.cli import EXIT_FAIL, EXIT_INFRA, EXIT_OK, exit_code
from harness.execution import rank_launcher
from harness.execution.run_dir import RunDir
from harness.matrix.cases import load_cases
from harness.regression.bisect import EXIT_ABORT, EXIT_SKIP, step_exit_code
from harness.regression.gate import NOT_RUN, judge
from harness.results import ERROR, FAIL, IMPORT_ERROR, INFRA_ERROR, NO_CASE_STARTED, PASS, CaseResult
from harness.run_spec import RunSpec

pytestmark = pytest.mark.cpu

CASES = "matrix:\n  - families: [llama]\n    layouts: [tp1]\n    paths: [memory/roundtrip, torch_dist/roundtrip]\n"
PORT_TAKEN = "torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. port: 29500, useIpv6: false, code: -98, name: EADDRINUSE"


def fake_python(tmp_path, message: str, failures: int):
    """An interpreter that prints ``message`` and exits 1 for its first ``failures`` calls, then
    behaves like the real one: it stands in for a rank that lost a port race."""
    counter = tmp_path / "calls"
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/bash\n"
        f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}\n"
        f"if (( n < {failures} )); then echo '{message}'; exit 1; fi\n"
        f"exec {sys.executable} \"$@\"\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), counter


def cases(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "c.yaml").write_text(CASES)
    return folder, load_cases(folder).cases


def test_a_launch_that_keeps_failing_on_the_machine_is_an_infra_error_for_every_case(tmp_path):
    folder, selected = cases(tmp_path)
    python, counter = fake_python(tmp_path, PORT_TAKEN, failures=99)
    results = rank_launcher.run_cases(RunSpec(cases=selected, cases_dir=folder), RunDir(tmp_path / "run"), python=python)
    assert [r.status for r in results] == [INFRA_ERROR, INFRA_ERROR]
    assert int(counter.read_text()) == 1 + rank_launcher.INFRA_RETRIES, "retried, then given up"
    assert results[0].headline.startswith("infrastructure error, not a verdict on the case")
    assert "EADDRINUSE" in results[0].headline
    assert exit_code(results) == EXIT_INFRA


def test_an_early_death_that_is_not_the_machine_is_not_retried(tmp_path):
    folder, selected = cases(tmp_path)
    python, counter = fake_python(tmp_path, "ModuleNotFoundError: No module named 'megatron.core'", failures=99)
    results = rank_launcher.run_cases(RunSpec(cases=selected, cases_dir=folder), RunDir(tmp_path / "run"), python=python)
    assert [r.status for r in results] == [ERROR, ERROR] and int(counter.read_text()) == 1
    assert exit_code(results) == EXIT_FAIL


def test_an_early_death_is_recorded_as_such_and_bisect_skips_the_commit(tmp_path):
    """The launcher records why (``cause``); bisect reads that, not the error text."""
    folder, selected = cases(tmp_path)
    python, _ = fake_python(tmp_path, "ModuleNotFoundError: No module named 'megatron.core'", failures=99)
    results = rank_launcher.run_cases(RunSpec(cases=selected, cases_dir=folder), RunDir(tmp_path / "run"), python=python)
    assert [r.cause for r in results] == [NO_CASE_STARTED, NO_CASE_STARTED]
    assert step_exit_code(results[0].status, results[0].cause) == EXIT_SKIP


def test_each_case_is_reported_once_as_it_finishes(tmp_path):
    """on_result (the progress line) hears of every case exactly once, with its final result."""
    folder, selected = cases(tmp_path)
    python, _ = fake_python(tmp_path, "ModuleNotFoundError: No module named 'megatron.core'", failures=99)
    reported = []
    results = rank_launcher.run_cases(RunSpec(cases=selected, cases_dir=folder), RunDir(tmp_path / "run"), python=python,
                               on_result=reported.append)
    assert [r.case_id for r in reported] == [c.id for c in selected] and reported == results


def test_a_launch_that_lost_a_port_race_once_is_retried_and_the_cases_run(tmp_path):
    folder, selected = cases(tmp_path)
    python, counter = fake_python(tmp_path, PORT_TAKEN, failures=1)
    results = rank_launcher.run_cases(RunSpec(cases=selected[:1], cases_dir=folder), RunDir(tmp_path / "run"), python=python)
    assert [r.status for r in results] == [PASS] and int(counter.read_text()) == 2


@pytest.mark.parametrize("statuses,code", [
    ([PASS, PASS], EXIT_OK), ([PASS, INFRA_ERROR], EXIT_INFRA), ([FAIL, INFRA_ERROR], EXIT_FAIL), ([ERROR], EXIT_FAIL),
])
def test_exit_codes(statuses, code):
    assert exit_code([CaseResult(f"c{i}", s) for i, s in enumerate(statuses)]) == code


def test_gate_and_bisect_never_judge_an_infra_error():
    result = CaseResult("llama/tp1/memory/roundtrip", INFRA_ERROR, error="infrastructure error, not a verdict: EADDRINUSE")
    assert judge(result, {"status": "pass"}, None).verdict == NOT_RUN
    assert step_exit_code(INFRA_ERROR, result.cause) == EXIT_ABORT


@pytest.mark.parametrize("layout,torchrun", [("tp1", False), ("tp2", True)])
def test_no_port_is_chosen_before_the_process_that_listens_on_it(tmp_path, monkeypatch, layout, torchrun):
    """Binding port 0, closing it and handing the number on lets another process take it in
    between. A world of one needs no port; torchrun's --standalone rendezvous binds its own."""
    seen = {}

    class Captured(Exception):
        pass

    def popen(cmd, env, **_kwargs):
        seen.update(cmd=cmd, env=env)
        raise Captured

    monkeypatch.setattr(rank_launcher.subprocess, "Popen", popen)
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "c.yaml").write_text(f"matrix:\n  - families: [llama]\n    layouts: [{layout}]\n    paths: [memory/roundtrip]\n")
    with pytest.raises(Captured):
        rank_launcher.run_cases(RunSpec(cases=load_cases(folder).cases, cases_dir=folder), RunDir(tmp_path / "run"))
    assert not any("master_port" in arg for arg in seen["cmd"])
    assert ("--standalone" in seen["cmd"]) is torchrun
    if not torchrun:
        assert seen["env"].get("MASTER_PORT") == os.environ.get("MASTER_PORT"), "no port of the launcher's choosing"


def assert_gone(pid: int, where: str) -> None:
    """``pid`` exits within 5 s (killed by the launcher); if not, kill it and fail."""
    import time

    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"process {pid} {where} is still alive")


def test_a_launch_leaves_no_process_of_its_group_behind(tmp_path):
    """A rank that exits hard leaves its children (e.g. the async checkpoint writer's
    multiprocessing Manager, ~570 MB) reparented but in the launch's process group; the launcher
    kills them when the launch ends. The fake interpreter starts such a child, then dies."""
    folder, selected = cases(tmp_path)
    pid_file = tmp_path / "orphan.pid"
    script = tmp_path / "python"
    script.write_text(f"#!/bin/bash\nsleep 300 &\necho $! > {pid_file}\necho 'ModuleNotFoundError: x'\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    results = rank_launcher.run_cases(RunSpec(cases=selected, cases_dir=folder), RunDir(tmp_path / "run"), python=str(script))
    assert [r.status for r in results] == [ERROR, ERROR]
    assert_gone(int(pid_file.read_text()), "of the launch's group")


def test_a_launch_reaps_what_a_rank_left_in_its_own_session(tmp_path):
    """torchrun starts each rank in a session of its own, so a crashed rank's children are not in
    the launch's group. The worker records its group in the run folder; the launcher kills it. The
    fake interpreter stands in for a rank: a child in a new session, its group recorded, then it dies."""
    folder, selected = cases(tmp_path)
    pid_file, run = tmp_path / "orphan.pid", RunDir(tmp_path / "run")
    script = tmp_path / "python"
    script.write_text("#!/bin/bash\nsetsid sleep 300 &\n"
                      f"echo $! > {pid_file}\nmkdir -p {run.log_dir('ws1-1')}\n"
                      f"echo $! > {run.log_dir('ws1-1')}/rank1.pgid\necho 'ModuleNotFoundError: x'\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    rank_launcher.run_cases(RunSpec(cases=selected, cases_dir=folder), run, python=str(script))
    assert_gone(int(pid_file.read_text()), "in a rank's own session")


def _torchrun_summary(failures: list[tuple[int, int]], root: tuple[int, int]) -> str:
    """torchrun's ChildFailedError text, as it lands in launcher.log (format copied from a real run)."""
    def block(rank, code):
        return (f"[{rank}]:\n  time      : 2026-12-01_22:03:45\n  host      : localhost\n"
                f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {code} (pid: 1{rank}) \n"
                "  error_file: <N/A>\n  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n")
    others = "".join(block(*f) for f in failures) or "  <NO_OTHER_FAILURES>\n"
    return ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" + "=" * 60 +
            "\nharness.execution.rank_worker FAILED\n" + "-" * 60 + "\nFailures:\n" + others + "-" * 60 +
            "\nRoot Cause (first observed failure):\n" + block(*root) + "=" * 60 + "\n")


@pytest.mark.parametrize("failures, root, expected", [
    # The CI flake: rank 1 was SIGKILLed, rank 0 saw the connection drop, recorded its error and
    # exited on purpose in the same second; torchrun's "Root Cause" named rank 0.
    ([(1, -9)], (0, rank_launcher.EXIT_CASE_ERROR), "rank 1 was killed by signal 9 (SIGKILL)"),
    ([(0, rank_launcher.EXIT_CASE_ERROR)], (1, 9), "rank 1 exited with code 9"),
    # rank 0 recorded its error, then the agent stopped it (SIGTERM) after seeing rank 1 die.
    ([(0, -15)], (1, -9), "rank 1 was killed by signal 9 (SIGKILL)"),
    ([(0, -15), (2, -15)], (1, -9), "rank 1 was killed by signal 9 (SIGKILL)"),
    ([], (1, -9), "rank 1 was killed by signal 9 (SIGKILL)"),
    ([(1, rank_launcher.EXIT_CASE_ERROR)], (0, rank_launcher.EXIT_CASE_ERROR), "rank 0 exited with code 3"),
])
def test_the_dead_rank_is_the_one_that_died_on_its_own_not_torchruns_first_by_the_second(tmp_path, failures, root, expected):
    run = RunDir(tmp_path / "run")
    run.log_dir("g").mkdir(parents=True)
    stale = _torchrun_summary([], (0, -6))  # an earlier launch of the same group, appended above
    run.launcher_log("g").write_text(stale + "relaunch\n" + _torchrun_summary(failures, root))
    assert rank_launcher._root_cause(run, "g").reason == expected


GLOO_LOST = ("Traceback (most recent call last):\n  File \"worker.py\", line 74, in main\n"
             "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234\n")
RANK1_RAISED = ("Traceback (most recent call last):\n  File \"routes.py\", line 9, in f\n"
                "ValueError: Shape mismatch for megatron param x:\n  Expected (4, 2)\n")


def _run_with_rank1_error(tmp_path, rank0_error: str):
    run = RunDir(tmp_path / "run")
    run.log_dir("g").mkdir(parents=True)
    run.launcher_log("g").write_text(_torchrun_summary([(1, rank_launcher.EXIT_CASE_ERROR)], (0, rank_launcher.EXIT_CASE_ERROR)))
    (run.path / "cases").mkdir(parents=True, exist_ok=True)
    case = "llama/tp2/memory/roundtrip"
    run.write_rank_error(case, 1, RANK1_RAISED)
    result = CaseResult(case_id=case, status=ERROR, error=rank0_error, world_size=2)
    run.write_case_result(result)
    rank_launcher._attach_log_tails({case: result}, 1, run, "g")
    return run, case, result


def test_a_multi_rank_failure_is_headlined_by_the_exception_a_rank_raised(tmp_path):
    """Rank 0 only saw its peer vanish; rank 1 raised the real error: that is the headline, one
    line (the message's lines joined), with rank 0's side kept below."""
    _, _, result = _run_with_rank1_error(tmp_path, GLOO_LOST)
    assert result.headline == "rank1 raised: ValueError: Shape mismatch for megatron param x: Expected (4, 2)"
    assert "Connection closed by peer" in result.error, "rank 0's side is kept"


def test_rank_0s_own_exception_stays_the_headline(tmp_path):
    own = RANK1_RAISED.replace("Shape mismatch", "rank 0's own")
    _, _, result = _run_with_rank1_error(tmp_path, own)
    assert result.headline == "ValueError: rank 0's own for megatron param x: Expected (4, 2)"


def test_a_peers_import_error_is_rank_0s_cause_with_its_headline(tmp_path):
    """The cause a peer recorded travels with its exception to the case's result, on both paths:
    rank 0 finished the case (lost peer), or never did (the launcher's own failure)."""
    run = RunDir(tmp_path / "run")
    run.log_dir("g").mkdir(parents=True)
    run.launcher_log("g").write_text(_torchrun_summary([(1, rank_launcher.EXIT_CASE_ERROR)], (0, rank_launcher.EXIT_CASE_ERROR)))
    case = "llama/tp2/memory/roundtrip"
    run.write_rank_error(case, 1, RANK1_RAISED.replace("ValueError: Shape mismatch", "ImportError: cannot import"),
                         IMPORT_ERROR)
    result = CaseResult(case_id=case, status=ERROR, error=GLOO_LOST, world_size=2)
    rank_launcher._attach_log_tails({case: result}, 1, run, "g")
    assert result.headline.startswith("rank1 raised: ImportError") and result.cause == IMPORT_ERROR
    assert step_exit_code(result.status, result.cause) == EXIT_SKIP
    assert run.rank_error_cause(case, 1) == IMPORT_ERROR and run.rank_error_cause(case, 2) == ""
    assert run.rank_errors(case) == [(1, RANK1_RAISED.replace("ValueError: Shape mismatch", "ImportError: cannot import"))]


def test_a_case_rank_0_never_finished_names_the_rank_that_raised(tmp_path):
    run, case, _ = _run_with_rank1_error(tmp_path, GLOO_LOST)
    assert rank_launcher._exit_reason(1, run, "g", case) == (
        "rank1 raised: ValueError: Shape mismatch for megatron param x: Expected (4, 2)")
