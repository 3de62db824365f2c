"""Gate a candidate Megatron-LM (or Megatron-Bridge) tree: verdict per case against golden/ and
a baseline run.

Verdicts (a case "passes" when its checks pass *and* its fingerprint matches golden):

    PASS           passes now, and passed in golden/baseline (or nothing says otherwise)
    REGRESSED      fails now, but passed in golden or in the baseline
    FIXED          passes now, but failed in every reference that has it
    STILL-FAILING  fails now, and failed in every reference that has it

Only REGRESSED makes the gate exit non-zero.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from harness import golden
from harness.results import CaseResult

PASS, REGRESSED, FIXED, STILL_FAILING = "PASS", "REGRESSED", "FIXED", "STILL-FAILING"


@dataclass(frozen=True)
class Verdict:
    case_id: str
    verdict: str
    reasons: tuple[str, ...]


def judge(result: CaseResult, golden_doc: dict | None, baseline: CaseResult | None) -> Verdict:
    reasons: list[str] = []
    now_ok = result.status == "pass"
    if not now_ok:
        first = next((c for c in result.checks if not c.passed), None)
        reasons.append(f"{first.name}: {first.summary}" if first else (result.error.strip().splitlines() or [result.status])[0])
    if golden_doc is not None and golden_doc["status"] == "pass" and now_ok:
        drift = golden.compare(golden_doc, result)
        if drift:
            now_ok = False
            reasons.extend(f"golden: {d}" for d in drift)
    refs = []
    if golden_doc is not None:
        refs.append(golden_doc["status"] == "pass")
    if baseline is not None:
        refs.append(baseline.status == "pass")
    if now_ok:
        verdict = FIXED if refs and not any(refs) else PASS
    else:
        verdict = REGRESSED if (not refs or any(refs)) else STILL_FAILING
    return Verdict(result.case_id, verdict, tuple(reasons))


def judge_all(results: list[CaseResult], baseline: dict[str, CaseResult] | None) -> list[Verdict]:
    out = []
    for r in results:
        entry = golden.load(r.lane, r.case_id)
        out.append(judge(r, entry.doc if entry else None, (baseline or {}).get(r.case_id)))
    return out


@contextlib.contextmanager
def worktree(repo: Path, ref: str) -> Iterator[Path]:
    """A detached, throw-away worktree of ``repo`` at ``ref``; the user's checkout is untouched
    and the worktree is removed on exit (including Ctrl-C)."""
    tmp = Path(tempfile.mkdtemp(prefix="harness-worktree-"))
    path = tmp / "tree"
    try:
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(path), ref],
                       check=True, capture_output=True, text=True)
        yield path
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], capture_output=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
