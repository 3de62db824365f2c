"""``harness bisect``: find the first Megatron-LM commit that breaks one case.

Runs ``git bisect run`` inside a separate, throw-away worktree (``harness.execution.source_trees.worktree``), so the
user's checkout, its branch and its bisect state are never touched, Ctrl-C included. Each step
is ``harness bisect-step``, which runs the case against the worktree and exits

    0    the case passes                       (good)
    1    a check fails, or the case crashes    (bad)
    125  the tree cannot be imported or built  (skip)
    128  the machine kept the case from running (infrastructure error): git bisect run aborts,
         since neither good nor bad would be true

and appends what it saw to a log, so the failing check at the first bad commit can be printed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.execution import service
from harness.execution.source_trees import SourceTree, worktree
from harness.matrix.cases import Case
from harness.results import CRASHED, INFRA_ERROR, PASS, SKIP

EXIT_GOOD, EXIT_BAD, EXIT_SKIP, EXIT_ABORT = 0, 1, 125, 128
IMPORT_FAILURE = ("ImportError", "ModuleNotFoundError", "SyntaxError", "IndentationError",
                  "before running any case", "was imported from")


@dataclass(frozen=True)
class BisectOutcome:
    first_bad: str | None
    subject: str
    failing: str
    transcript: str


@dataclass(frozen=True)
class Step:
    """One ``git bisect run`` step, as the step log records it (one JSON line per step)."""

    sha: str
    status: str
    exit: int
    failing: str  # the case's headline

    def append_to(self, log: Path) -> None:
        with open(log, "a") as fh:
            fh.write(json.dumps(asdict(self)) + "\n")

    @staticmethod
    def read_all(log: Path) -> list["Step"]:
        if not log.exists():
            return []
        return [Step(**json.loads(line)) for line in log.read_text().splitlines() if line.strip()]


def step_exit_code(status: str, error: str) -> int:
    if status == PASS:
        return EXIT_GOOD
    if status == INFRA_ERROR:
        return EXIT_ABORT
    if status == SKIP or (status in CRASHED and any(marker in error for marker in IMPORT_FAILURE)):
        return EXIT_SKIP
    return EXIT_BAD


def run_step(case: Case, lane: str, tree: SourceTree, log: Path, cases_dir: Path) -> Step:
    """Run ``case`` against ``tree`` and append what it saw to the step log."""
    request = service.RunRequest(cases=[case], lane=lane, label=f"bisect-step-{tree.sha[:12]}",
                                 source_trees=[tree], cases_dir=cases_dir)
    result = service.run_selection(request).results[0]
    step = Step(sha=tree.sha, status=result.status, exit=step_exit_code(result.status, result.error),
                failing=result.headline)
    step.append_to(log)
    return step


def run_bisect(repo: Path, good: str, bad: str, case_id: str, lane: str, log: Path, extra: list[str]) -> BisectOutcome:
    with worktree(repo, bad) as tree:
        git = ["git", "-C", str(tree)]
        subprocess.run([*git, "bisect", "start", bad, good], check=True, capture_output=True, text=True)
        try:
            step = [sys.executable, "-m", "harness", *extra, "bisect-step", "--case", case_id, "--lane", lane,
                    "--megatron-lm", str(tree), "--log", str(log)]
            proc = subprocess.run([*git, "bisect", "run", *step], capture_output=True, text=True)
            transcript = proc.stdout + proc.stderr
            match = re.search(r"^([0-9a-f]{40}) is the first bad commit", transcript, re.M)
            first = match.group(1) if match else None
            subject = ""
            if first:
                subject = subprocess.run([*git, "log", "-1", "--format=%h %s", first], capture_output=True, text=True).stdout.strip()
        finally:
            subprocess.run([*git, "bisect", "reset"], capture_output=True)
    failing = next((step.failing for step in Step.read_all(log) if step.sha == first), "") if first else ""
    return BisectOutcome(first, subject, failing, transcript)
