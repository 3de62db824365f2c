"""The bisection driver (``harness.regression.bisect.bisect``) on a tiny git history, with a step
that reads the tree instead of running a case: which commit it names, what it skips, when the
budget stops it, and that the user's checkout is left as it was. The real case runs through the
same driver in tests/integration/test_bisect.py."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from harness.execution import source_trees
from harness.regression import bisect
from harness.regression.bisect import EXIT_ABORT, EXIT_BAD, EXIT_GOOD, EXIT_SKIP, Step
from harness.regression.root_causes import Bisection


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[source_trees.History, list[str]]:
    """Ten commits of a 'Megatron-LM' whose state file says how a case would go at each."""
    repo = tmp_path_factory.mktemp("mlm")
    (repo / "megatron" / "core").mkdir(parents=True)
    (repo / "megatron" / "core" / "package_info.py").write_text("MAJOR = 0\n")
    git(repo, "init", "-q", "-b", "main")
    shas = []
    for i in range(10):
        (repo / "state").write_text(f"{i}\n")
        (repo / f"file{i}.py").write_text("x = 1\n")
        git(repo, "add", "-A")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"commit {i}")
        shas.append(git(repo, "rev-parse", "HEAD"))
    tree = source_trees.validate("megatron-lm", repo)
    return source_trees.history([tree]), shas


def step_by_state(outcome):
    """A step whose exit code is ``outcome(i)`` for the commit whose state file says ``i``."""
    def step(trees):
        i = int((Path(trees[0].path) / "state").read_text())
        code = outcome(i)
        return Step(sha="", status={EXIT_GOOD: "pass", EXIT_SKIP: "skip"}.get(code, "fail"), exit=code,
                    failing=f"state {i}", seconds=0.0)
    return step


def test_names_the_first_bad_commit_with_its_subject_and_files(history, tmp_path):
    walked, shas = history
    before = (git(walked.repo, "rev-parse", "HEAD"), git(walked.repo, "branch", "--show-current"))
    log = tmp_path / "steps.jsonl"
    found = bisect.bisect(walked, shas[0], shas[9], step_by_state(lambda i: EXIT_BAD if i >= 6 else EXIT_GOOD), log=log)
    assert found.status == Bisection.FOUND and found.term == "first bad"
    assert found.commit.sha == shas[6] and found.commit.subject == "commit 6"
    assert set(found.commit.files) == {"state", "file6.py"}
    assert 1 <= found.steps <= 4 and len(Step.read_all(log)) == found.steps
    assert found.text.startswith(f"{shas[6][:12]} commit 6 (files: ")
    assert (git(walked.repo, "rev-parse", "HEAD"), git(walked.repo, "branch", "--show-current")) == before
    assert git(walked.repo, "worktree", "list").count("\n") == 0  # the bisection's worktree is gone


def test_a_fix_is_found_with_the_terms_reversed(history):
    walked, shas = history
    found = bisect.bisect(walked, shas[0], shas[9], step_by_state(lambda i: EXIT_GOOD if i >= 3 else EXIT_BAD),
                          terms=bisect.FIX)
    assert (found.status, found.term, found.commit.sha) == (Bisection.FOUND, "first fixed", shas[3])


def test_commits_that_do_not_import_are_skipped_and_listed(history):
    walked, shas = history
    broken = {4, 5}
    found = bisect.bisect(walked, shas[0], shas[9],
                          step_by_state(lambda i: EXIT_SKIP if i in broken else EXIT_BAD if i >= 7 else EXIT_GOOD))
    assert found.commit.sha == shas[7]
    assert {c.sha for c in found.skipped} <= {shas[4], shas[5]}
    assert all(c.subject in ("commit 4", "commit 5") for c in found.skipped)


def test_when_only_skipped_commits_are_left_it_says_so(history):
    walked, shas = history
    found = bisect.bisect(walked, shas[0], shas[9],
                          step_by_state(lambda i: EXIT_SKIP if i in (5, 6) else EXIT_BAD if i >= 5 else EXIT_GOOD))
    assert found.status == Bisection.NOT_FOUND and found.commit is None
    assert "was skipped" in found.reason and found.text.startswith("not bisected: ")


def test_the_budget_stops_it_between_steps_and_says_how_far_it_got(history):
    walked, shas = history
    calls = []

    def slow(trees):
        calls.append(1)
        return Step(sha="", status="fail", exit=EXIT_BAD, failing="", seconds=1000.0)  # "took" 1000 s

    found = bisect.bisect(walked, shas[0], shas[9], slow, deadline=time.monotonic() + 500)
    assert found.status == Bisection.BUDGET and len(calls) == 1  # a second step would end past the deadline
    assert found.steps == 1 and found.range[0] == shas[0] and found.range[1] != shas[9]
    assert found.reason.startswith("budget spent after 1 step(s); narrowed to ") and "commit(s) left" in found.reason
    assert bisect.bisect(walked, shas[0], shas[9], slow, deadline=time.monotonic() - 1).steps == 0


def test_an_infrastructure_error_aborts_rather_than_guess(history):
    walked, shas = history
    found = bisect.bisect(walked, shas[0], shas[9], step_by_state(lambda i: EXIT_ABORT))
    assert found.status == Bisection.ABORTED and found.steps == 1 and "infrastructure error" in found.reason


def test_a_ref_that_is_not_a_commit_is_one_line_of_input_error(history):
    from harness.errors import InputError

    walked, shas = history
    with pytest.raises(InputError, match="'nope' is not a commit of"):
        bisect.bisect(walked, "nope", shas[9], step_by_state(lambda i: EXIT_GOOD))


def test_the_walked_repository_is_the_megatron_lm_else_the_bridge_else_a_bridge_checkouts_bridge(tmp_path):
    mlm = source_trees.SourceTree("megatron-lm", "/m", "/m", "a" * 40, False)
    bridge = source_trees.SourceTree("megatron-bridge", "/b", "/b/src", "b" * 40, False)
    assert source_trees.history([mlm, bridge]).walked is mlm and source_trees.history([mlm, bridge]).fixed == (bridge,)
    assert source_trees.history([bridge]).walked is bridge
    pinned = source_trees.SourceTree("megatron-lm", "/b/3rdparty/Megatron-LM", "/b/3rdparty/Megatron-LM", "c" * 40,
                                     False, pinned_by_bridge="c" * 40)
    checkout = source_trees.history([pinned, bridge])
    assert checkout.walked is bridge and checkout.follows_submodule and checkout.fixed == ()
    assert source_trees.history([]) is None


def test_an_import_failure_is_a_skip_unless_it_is_the_failure_being_bisected():
    from harness.regression.root_causes import normalise
    from harness.results import IMPORT_ERROR

    api_break = "ImportError: cannot import name 'torch_chunk_gated_delta_rule' from 'megatron.core.ssm.x' (/tmp/a/x.py)"
    other = "ImportError: cannot import name 'something_else' from 'megatron.core.y' (/tmp/b/y.py)"
    moved = api_break.replace("/tmp/a/", "/tmp/harness-worktree-1/tree/")  # same break, another checkout
    assert bisect.step_exit_code("error", IMPORT_ERROR, api_break) == EXIT_SKIP
    assert bisect.step_exit_code("error", IMPORT_ERROR, moved, normalise(api_break)) == EXIT_BAD
    assert bisect.step_exit_code("error", IMPORT_ERROR, other, normalise(api_break)) == EXIT_SKIP
    assert bisect.step_exit_code("pass", "", "", normalise(api_break)) == EXIT_GOOD


def test_a_case_that_raised_an_import_error_is_recorded_as_one():
    """The rank records the kind of crash from the exception itself (its chain included)."""
    import time
    from types import SimpleNamespace

    from harness.conversion import case_executor
    from harness.results import IMPORT_ERROR

    def raised(exc):
        try:
            raise exc
        except BaseException as caught:  # noqa: BLE001
            return caught

    def chained():
        try:
            raise ModuleNotFoundError("No module named 'megatron.core.x'")
        except ImportError as err:
            raise RuntimeError("building the provider failed") from err

    case = SimpleNamespace(id="llama/tp1/memory/roundtrip")
    try:
        chained()
    except RuntimeError as err:
        wrapped = err
    for exc, cause in ((raised(ImportError("cannot import name 'x'")), IMPORT_ERROR),
                       (raised(SyntaxError("invalid syntax")), IMPORT_ERROR), (wrapped, IMPORT_ERROR),
                       (raised(RuntimeError("boom in the middle of a case")), "")):
        assert case_executor.error_result(case, exc, time.monotonic(), lane="cpu").cause == cause, exc


def test_the_baseline_is_resolved_once_a_finished_run_first(history, monkeypatch):
    from harness.errors import InputError
    from harness.regression import gate
    from harness.run_spec import RunSpec

    walked, shas = history
    spec = RunSpec(source_trees=[walked.walked])
    monkeypatch.setattr(gate.run_document, "load_run", mock_no_run)
    base = gate.resolve_baseline(shas[2][:10], spec)
    assert (base.commit, base.run, base.history.repo) == (shas[2], None, walked.repo)
    with pytest.raises(InputError, match="--baseline no-such-ref: neither a finished run nor a commit of"):
        gate.resolve_baseline("no-such-ref", spec)
    monkeypatch.setattr(gate.run_document, "load_run", lambda ref: ({}, {"a/tp1/m/r": "its result"}))
    found = gate.resolve_baseline(shas[2], spec)  # a finished run by that name wins, as before
    assert found.run == {"a/tp1/m/r": "its result"} and not found.commit and found.history is None


def mock_no_run(ref):
    raise FileNotFoundError(ref)
