"""Gate a candidate Megatron-LM (or Megatron-Bridge) tree: verdict per case against golden/ and
a baseline run.

Verdicts (a case "passes" when its checks pass *and* its fingerprint matches golden):

    PASS           passes now, and passed in golden/baseline (or nothing says otherwise)
    REGRESSED      fails now, but passed in golden or in the baseline
    FIXED          passes now, but failed in every reference that has it
    STILL-FAILING  fails now, and failed in every reference that has it
    NOT-RUN        not run here: a declared-invalid layout, a case this machine cannot run (e.g.
                   more GPUs than it has), or an infrastructure error, with the reason

Only REGRESSED makes the gate exit non-zero. REGRESSED cases are grouped into root causes
(``root_causes``): the reports lead with one row per cause, then the per-case rows. The baseline
is a finished run, or a git ref of the candidate Megatron-LM repository, run in a throw-away
worktree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from harness.errors import InputError
from harness.execution import service
from harness.execution.source_trees import SourceTree, validate, worktree
from harness.regression import golden
from harness.regression.root_causes import RootCause, group
from harness.reporting import run_document, run_report
from harness.results import INFRA_ERROR, INVALID, NOT_RUN_HERE, PASS as PASSED, CaseResult

PASS, REGRESSED, FIXED, STILL_FAILING, NOT_RUN = "PASS", "REGRESSED", "FIXED", "STILL-FAILING", "NOT-RUN"
ORDER = {REGRESSED: 0, STILL_FAILING: 1, FIXED: 2, NOT_RUN: 3, PASS: 4}


@dataclass(frozen=True)
class Verdict:
    case_id: str
    verdict: str
    reasons: tuple[str, ...]
    partial: bool = False  # passed with checks that could not run (the reasons say which)

    @property
    def label(self) -> str:
        return f"{self.verdict}*" if self.partial else self.verdict


def judge(result: CaseResult, golden_doc: dict | None, baseline: CaseResult | None) -> Verdict:
    if result.status in (*NOT_RUN_HERE, INVALID):
        return Verdict(result.case_id, NOT_RUN, (result.headline,))
    reasons: list[str] = []
    now_ok = result.status == PASSED
    if not now_ok:
        reasons.append(result.headline or result.status)
    if golden_doc is not None and golden_doc["status"] == PASSED and now_ok:
        drift = golden.compare(golden_doc, result)
        if drift:
            now_ok = False
            reasons.extend(f"golden: {d}" for d in drift)
    refs = []
    if golden_doc is not None:
        refs.append(golden_doc["status"] == PASSED)
    if baseline is not None:
        refs.append(baseline.status == PASSED)
    if now_ok:
        verdict = FIXED if refs and not any(refs) else PASS
    else:
        verdict = REGRESSED if (not refs or any(refs)) else STILL_FAILING
    partial = now_ok and bool(result.unchecked)
    if partial:
        reasons.append(result.unchecked_line)
    return Verdict(result.case_id, verdict, tuple(reasons), partial)


def judge_all(results: list[CaseResult], baseline: dict[str, CaseResult] | None) -> list[Verdict]:
    out = []
    for r in results:
        entry = golden.load(r.lane, r.case_id)
        out.append(judge(r, entry.doc if entry else None, (baseline or {}).get(r.case_id)))
    return out


def regressed_causes(results: list[CaseResult], verdicts: list[Verdict],
                     trees: Iterable[SourceTree] = ()) -> tuple[RootCause, ...]:
    """The REGRESSED cases grouped by root cause; each cause's rerun command names ``trees``."""
    tree_args = [arg for t in trees for arg in (f"--{t.kind}", t.path)]
    return group(results, [v for v in verdicts if v.verdict == REGRESSED], tree_args)


@dataclass
class GateOutcome:
    candidate: service.RunOutcome
    verdicts: list[Verdict]
    root_causes: tuple[RootCause, ...] = ()

    @property
    def regressed(self) -> bool:
        return any(v.verdict == REGRESSED for v in self.verdicts)

    @property
    def infra_errors(self) -> int:
        return sum(r.status == INFRA_ERROR for r in self.candidate.results)

    def counts(self) -> dict[str, int]:
        return {k: sum(v.verdict == k for v in self.verdicts) for k in ORDER}


def baseline_results(ref: str, request: service.RunRequest, stream=None) -> dict[str, CaseResult]:
    """The baseline: a finished run (path, name or 'latest'), or a git ref of the candidate
    Megatron-LM repository, whose cases are then run in a throw-away worktree."""
    try:
        return run_document.load_run(ref)[1]
    except FileNotFoundError:
        pass
    repo = next((t for t in request.source_trees if t.kind == "megatron-lm"), None)
    if repo is None:
        raise InputError(f"--baseline {ref}: no such run, and no --megatron-lm repo to resolve it as a git ref")
    with worktree(Path(repo.path), ref) as tree:
        trees = [validate("megatron-lm", tree)] + [t for t in request.source_trees if t.kind != "megatron-lm"]
        base = replace(request, label=f"baseline-{ref}", source_trees=trees)
        return {r.case_id: r for r in service.run_selection(base, stream=stream).results}


def run_gate(request: service.RunRequest, baseline_ref: str | None = None, stream=None) -> GateOutcome:
    """Run the candidate (and the baseline, if it is a git ref), judge every case, group the
    regressions into root causes, write both into the candidate run's ``summary.md`` (the PR
    comment) and ``index.html``."""
    if not any(t.kind in ("megatron-lm", "megatron-bridge") for t in request.source_trees):
        raise InputError("gate needs a candidate: --megatron-lm PATH (or --megatron-bridge PATH)")
    baseline = baseline_results(baseline_ref, request, stream) if baseline_ref else None
    candidate = service.run_selection(request, stream=stream)
    verdicts = judge_all(candidate.results, baseline)
    causes = regressed_causes(candidate.results, verdicts, request.source_trees)
    run_report.write_run(candidate.run, candidate.results, candidate.meta.to_dict(),
                         verdicts={v.case_id: v.verdict for v in verdicts}, verdict_order=ORDER, root_causes=causes)
    return GateOutcome(candidate=candidate, verdicts=verdicts, root_causes=causes)
