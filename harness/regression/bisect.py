"""Find the commit that broke (or fixed) a case: ``harness bisect`` and the gate's bisections.

``git bisect`` is driven one step at a time inside a separate, throw-away worktree
(``source_trees.History``), so the user's checkout, its branch and its bisect state are never
touched, Ctrl-C included, and the driver can stop when its time budget is spent. Each step runs
the case (or the import probe, for a tree that does not import) against the commit and tells git

    good / bad   the case passes / a check fails or the case crashes
    skip         the tree cannot be imported or built (exit 125 of ``harness bisect-step``)
    (abort)      the machine kept the case from running (infrastructure error): neither good
                 nor bad would be true

and appends what it saw to a step log (one JSON line per step). A fix is found the same way with
git's own terms reversed: the first commit at which a known failure passes.

``harness bisect-step`` is the same step as a command for a hand-driven ``git bisect run``:
exit 0 good, 1 bad, 125 skip, 128 abort.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, TextIO

from harness.errors import InputError
from harness.execution import run_service
from harness.execution.source_trees import History, worktree
from harness.regression.root_causes import Bisection, Commit, normalise
from harness.reporting import run_report
from harness.results import CRASHED, IMPORT_ERROR, INFRA_ERROR, NO_CASE_STARTED, PASS, SKIP
from harness.run_spec import RunSpec, SourceTree

EXIT_GOOD, EXIT_BAD, EXIT_SKIP, EXIT_ABORT = 0, 1, 125, 128
# The causes of a crash (``CaseResult.cause``, recorded by the launcher and the rank) that mean the
# tree cannot be imported: that commit says nothing about the case.
IMPORT_FAILURE = (NO_CASE_STARTED, IMPORT_ERROR)

# What a bisection looks for: git's terms for the commits before and after the change.
REGRESSION = ("good", "bad")  # the first commit at which the case fails
FIX = ("broken", "fixed")  # the first commit at which a known failure passes
_FIRST = re.compile(r"^([0-9a-f]{40}) is the first (\w+) commit", re.M)
_LEFT = re.compile(r"Bisecting: (\d+) revisions? left to test")


@dataclass(frozen=True)
class Step:
    """One bisection step, as the step log records it (one JSON line per step)."""

    sha: str
    status: str
    exit: int
    failing: str  # the case's headline
    seconds: float = 0.0

    def append_to(self, log: Path) -> None:
        with open(log, "a") as fh:
            fh.write(json.dumps(asdict(self)) + "\n")

    @staticmethod
    def read_all(log: Path) -> list["Step"]:
        if not log.exists():
            return []
        return [Step(**json.loads(line)) for line in log.read_text().splitlines() if line.strip()]


def step_exit_code(status: str, cause: str = "", headline: str = "", tracked: str = "") -> int:
    """Good, bad, skip or abort for one step's case (``cause``: its ``CaseResult.cause``). An
    import failure is a skip (that commit cannot say anything about the case), unless it *is* the
    failure being tracked: ``tracked`` is that failure's headline, normalised
    (``root_causes.normalise``), e.g. an API break that only the case's own code path imports."""
    if status == PASS:
        return EXIT_GOOD
    if status == INFRA_ERROR:
        return EXIT_ABORT
    if tracked and normalise(headline) == tracked:
        return EXIT_BAD
    if status == SKIP or (status in CRASHED and cause in IMPORT_FAILURE):
        return EXIT_SKIP
    return EXIT_BAD


def case_step(spec: RunSpec, tracked: str = "") -> Callable[[list[SourceTree]], Step]:
    """A step that runs ``spec`` (its one case, on its lane and placement) against the trees (one
    run folder per step, quietly); ``tracked``: the headline of the failure being bisected
    (``step_exit_code``)."""
    def run(trees: list[SourceTree]) -> Step:
        started = time.monotonic()
        step = replace(spec, label=f"bisect-step-{_shas(trees)}", source_trees=list(trees))
        outcome = run_service.run_selection(step, stream=None)
        run_report.write_outcome(outcome)  # each step's run folder, as any run's
        result = outcome.results[0]
        code = step_exit_code(result.status, result.cause, result.headline, normalise(tracked) if tracked else "")
        return Step(sha="", status=result.status, exit=code, failing=result.headline,
                    seconds=round(time.monotonic() - started, 1))
    return run


def import_step(lane: str) -> Callable[[list[SourceTree]], Step]:
    """A step that only asks whether a rank can import the stack (``run_service.import_problem``):
    good if it can, bad if not. It finds the commit that made a tree incompatible."""
    def run(trees: list[SourceTree]) -> Step:
        started = time.monotonic()
        problem = run_service.import_problem(RunSpec(lane=lane, source_trees=trees))
        return Step(sha="", status="pass" if not problem else "error",
                    exit=EXIT_BAD if problem else EXIT_GOOD, failing=problem,
                    seconds=round(time.monotonic() - started, 1))
    return run


def _shas(trees: list[SourceTree]) -> str:
    return "-".join(t.sha[:10] for t in trees) or "installed"


def commit_info(repo: Path, sha: str, max_files: int = 8) -> Commit:
    """SHA, subject and the files a commit touched (the first ``max_files``, and how many more)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()

    subject = git("log", "-1", "--format=%s", sha)
    files = [f for f in git("show", "--name-only", "--format=", sha).splitlines() if f]
    return Commit(sha=sha, subject=subject, files=tuple(files[:max_files]), more_files=max(0, len(files) - max_files))


def bisect(history: History, old: str, new: str, step: Callable[[list[SourceTree]], Step], *,
           terms: tuple[str, str] = REGRESSION, deadline: float | None = None, log: Path | None = None,
           say: Callable[[str], None] = lambda text: None) -> Bisection:
    """The first commit between ``old`` (where the case behaves as ``terms[0]``) and ``new``
    (``terms[1]``) at which it behaves as ``terms[1]``, by ``git bisect`` driven step by step in a
    throw-away worktree of ``history``'s repository. Stops before a step that would start after
    ``deadline`` (``time.monotonic()``), saying how far it got; never raises on a step's outcome."""
    old_sha, new_sha = history.commit(old), history.commit(new)
    for ref, sha in ((old, old_sha), (new, new_sha)):
        if sha is None:
            raise InputError(f"{ref!r} is not a commit of {history.repo}")
    term_old, term_new = terms
    steps: list[Step] = []
    skipped: list[str] = []
    with worktree(history.repo, new_sha) as path:
        git = ["git", "-C", str(path)]

        def tell(*args: str) -> str:
            proc = subprocess.run([*git, "bisect", *args], capture_output=True, text=True)
            return proc.stdout + proc.stderr

        out = tell("start", f"--term-old={term_old}", f"--term-new={term_new}", new_sha, old_sha)
        low, high = old_sha, new_sha

        def ending(status: str, **found) -> Bisection:
            """How this bisection ends, with how far it got (steps, the last known range, skips)."""
            return Bisection(status=status, term=f"first {term_new}", steps=len(steps), range=(low, high),
                             skipped=tuple(commit_info(history.repo, s) for s in skipped), **found)

        try:
            while True:
                first = _FIRST.search(out)
                if first:
                    return ending(Bisection.FOUND, commit=commit_info(history.repo, first.group(1)))
                if "only 'skip'ped commits left" in out:
                    return ending(Bisection.NOT_FOUND, reason=f"every commit left between {low[:12]} and {high[:12]} "
                                                              "was skipped (it does not import): the change is one of them")
                sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
                if not _LEFT.search(out) and sha in (old_sha, new_sha):
                    return ending(Bisection.NOT_FOUND,
                                  reason=f"git bisect did not start: {out.strip().splitlines()[-1:] or ['?']}")
                last = steps[-1].seconds if steps else 0.0
                if deadline is not None and time.monotonic() + last > deadline:
                    left = _LEFT.search(out)
                    return ending(Bisection.BUDGET, reason=f"budget spent after {len(steps)} step(s); narrowed to "
                                                           f"{low[:12]}..{high[:12]}"
                                                           + (f" ({left.group(1)} commit(s) left)" if left else ""))
                try:
                    with history.trees_in(path) as trees:
                        result = step(trees)
                except InputError as err:  # this commit's tree has another layout: untestable
                    result = Step(sha=sha, status=SKIP, exit=EXIT_SKIP, failing=str(err))
                result = replace(result, sha=sha)
                steps.append(result)
                if log is not None:
                    result.append_to(log)
                if result.exit == EXIT_ABORT:
                    return ending(Bisection.ABORTED, reason=f"infrastructure error at {sha[:12]}: {result.failing}")
                if result.exit == EXIT_SKIP:
                    skipped.append(sha)
                    verdict = "skip"
                else:
                    passed = result.exit == EXIT_GOOD
                    behaves_as_before = passed if terms == REGRESSION else not passed  # a fix: failing is "before"
                    verdict = term_old if behaves_as_before else term_new
                    if verdict == term_old:
                        low = sha
                    else:
                        high = sha
                say(f"bisect step {len(steps)}: {sha[:12]} {commit_info(history.repo, sha).subject[:60]!r} -> "
                    f"{verdict} ({result.seconds:.0f}s){': ' + result.failing[:100] if result.failing else ''}")
                out = tell(verdict)
        finally:
            subprocess.run([*git, "bisect", "reset"], capture_output=True)


def run_bisect(history: History, good: str, bad: str, spec: RunSpec, log: Path,
               stream: TextIO | None = None) -> tuple[Bisection, str]:
    """``harness bisect``: the first bad commit for ``spec``'s one case, and the failing headline there."""
    say = (lambda text: print(text, file=stream, flush=True)) if stream else (lambda text: None)
    outcome = bisect(history, good, bad, case_step(spec), log=log, say=say)
    failing = ""
    if outcome.commit is not None:
        failing = next((s.failing for s in Step.read_all(log) if s.sha == outcome.commit.sha), "")
    return outcome, failing
