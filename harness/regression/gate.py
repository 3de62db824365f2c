"""Gate a candidate Megatron-LM (or Megatron-Bridge) tree: verdict per case against golden/ and
a baseline run.

Verdicts (a case "passes" when its checks pass *and* its fingerprint matches golden):

    PASS           passes now, and passed in golden/baseline (or nothing says otherwise)
    REGRESSED      fails now, but passed in golden or in the baseline
    FIXED          passes now, but failed in every reference that has it
    STILL-FAILING  fails now, and failed in every reference that has it
    NOT-RUN        not run here: a declared-invalid layout, a case this machine cannot run (e.g.
                   more GPUs than it has), or an infrastructure error, with the reason

Only REGRESSED (and INCOMPATIBLE, below) make the gate exit non-zero. REGRESSED cases are grouped
into root causes (``root_causes``): the reports lead with one row per cause, then the per-case
rows. FIXED cases are grouped the same way, by how they failed in the baseline.

The baseline is a finished run, or a git ref of the repository under test
(``source_trees.History``: the Megatron-LM tree, else the Bridge, or a Bridge checkout with its
submodule), run in a throw-away worktree. With a git ref the gate then bisects each cause between
the baseline and the candidate on the cause's representative case (``bisect``): the first bad
commit of a regression, the first good commit of a fix, within ``--bisect-budget`` seconds.

INCOMPATIBLE: before any case, a rank's imports are tried once (``run_service.import_problem``). A
candidate that cannot import the stack, or breaks an attribute the harness's runtime or the
Bridge uses at import, gets one verdict line naming it (and, with a git baseline, the commit that
broke it) instead of one ERROR per case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, TextIO

from harness.errors import InputError
from harness.execution import run_service, source_trees
from harness.execution.source_trees import History
from harness.regression import bisect, golden
from harness.regression.root_causes import Bisection, RootCause, exception_type, group, normalise
from harness.reporting import run_document, run_report
from harness.results import (FIXED, INCOMPATIBLE, INFRA_ERROR, INVALID, NOT_RUN, NOT_RUN_HERE, REGRESSED,
                             STILL_FAILING, V_PASS as PASS, VERDICT_ORDER as ORDER, PASS as PASSED, CaseResult)
from harness.run_spec import RunSpec, SourceTree
DEFAULT_BISECT_BUDGET_S = 3600.0


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
    return group(results, [v for v in verdicts if v.verdict == REGRESSED], _tree_args(trees))


def fixed_causes(verdicts: list[Verdict], baseline: dict[str, CaseResult] | None,
                 trees: Iterable[SourceTree] = ()) -> tuple[RootCause, ...]:
    """The FIXED cases grouped by how they failed in the baseline run (one fix, one row); none
    without a baseline run, whose failures are what tells fixes apart."""
    fixed = [v for v in verdicts if v.verdict == FIXED and baseline and v.case_id in baseline]
    return group([baseline[v.case_id] for v in fixed], fixed, _tree_args(trees)) if fixed else ()


def _tree_args(trees: Iterable[SourceTree]) -> list[str]:
    return [arg for t in trees for arg in (f"--{t.kind}", t.path)]


@dataclass
class GateOutcome:
    run: run_service.RunOutcome  # the candidate's run folder (summary.md, index.html); no case in it if INCOMPATIBLE
    verdicts: list[Verdict]
    root_causes: tuple[RootCause, ...] = ()  # REGRESSED causes, then FIXED ones (or the one INCOMPATIBLE)

    @property
    def incompatible(self) -> RootCause | None:
        return next((c for c in self.root_causes if c.verdict == INCOMPATIBLE), None)

    @property
    def regressed(self) -> bool:
        return self.incompatible is not None or any(v.verdict == REGRESSED for v in self.verdicts)

    @property
    def infra_errors(self) -> int:
        return sum(r.status == INFRA_ERROR for r in self.run.results)

    def counts(self) -> dict[str, int]:
        return {k: sum(v.verdict == k for v in self.verdicts) for k in ORDER if k != INCOMPATIBLE}


@dataclass(frozen=True)
class Baseline:
    """What ``--baseline`` names, resolved once: a finished run's results, or a commit of the
    repository under test (``History``), which is run, and which bisections start from."""

    ref: str
    run: dict[str, CaseResult] | None = None
    commit: str = ""
    history: History | None = None


def resolve_baseline(ref: str, request: RunSpec) -> Baseline:
    """A finished run (path, name or 'latest') if there is one by that name, else a commit of the
    repository under test; a one-line InputError if neither."""
    try:
        return Baseline(ref, run=run_document.load_run(ref)[1])
    except FileNotFoundError:
        pass
    walked = source_trees.history(request.source_trees)
    sha = walked.commit(ref) if walked is not None else None
    if sha is None:
        where = f"a commit of {walked.repo}" if walked else "a git ref (no --megatron-lm / --megatron-bridge repo given)"
        raise InputError(f"--baseline {ref}: neither a finished run nor {where}")
    return Baseline(ref, commit=sha, history=walked)


def baseline_results(baseline: Baseline, request: RunSpec, stream=None) -> dict[str, CaseResult]:
    """The baseline's results: the finished run's, or the commit's cases run in a throw-away worktree."""
    if baseline.run is not None:
        return baseline.run
    with baseline.history.trees_at(baseline.commit) as trees:
        base = replace(request, label=f"baseline-{baseline.ref}", source_trees=trees)
        outcome = run_service.run_selection(base, stream=stream)
        run_report.write_outcome(outcome)
        return {r.case_id: r for r in outcome.results}


def incompatible_cause(problem: str, request: RunSpec) -> RootCause:
    """The one root cause of a candidate that cannot start: every selected case, one line."""
    kind = exception_type(problem)
    return RootCause(verdict=INCOMPATIBLE, signature=normalise(problem), check=kind or "import", tensor="",
                     detail=problem, case_ids=tuple(c.id for c in request.cases), families=(), layouts=(), paths=(),
                     representative="(import probe)", rerun="python -m harness.execution.rank_worker --probe '[...]'")


def bisect_causes(causes: tuple[RootCause, ...], walked: History, baseline_ref: str, baseline: dict[str, CaseResult],
                  request: RunSpec, budget_s: float, say: Callable[[str], None],
                  failing: dict[str, str] | None = None) -> tuple[RootCause, ...]:
    """Each cause with its bisection: the first bad commit of a REGRESSED cause, the first good one
    of a FIXED cause, on a representative case that behaved the other way at the baseline; causes
    left when ``budget_s`` is spent say so."""
    deadline = time.monotonic() + budget_s
    candidate = walked.walked.sha
    failing = failing or {}  # case_id -> the candidate's headline
    by_id = {c.id: c for c in request.cases}
    out = []
    for i, cause in enumerate(causes, 1):
        regression = cause.verdict == REGRESSED
        terms = bisect.REGRESSION if regression else bisect.FIX
        term = f"first {terms[1]}"
        # The representative must have behaved the other way at the baseline, or there is nothing between them.
        flipped = [cid for cid in (cause.representative, *cause.case_ids)
                   if cid in baseline and (baseline[cid].status == PASSED) == regression]
        if not flipped:
            found = Bisection.not_tried(term, f"no case of it {'passed' if regression else 'failed'} at the baseline "
                                              f"{baseline_ref} (it regressed against golden/ only)")
        elif time.monotonic() >= deadline:
            found = Bisection.not_tried(term, f"the bisect budget ({budget_s:.0f} s) was spent on earlier causes")
        else:
            say(f"harness: bisecting cause {i} ({cause.verdict}, {cause.count} case(s)) on {flipped[0]} between "
                f"{baseline_ref} and {candidate[:12]}")
            # The failure being tracked: the candidate's (a regression) or the baseline's (a fix). An
            # import failure that is this one is "bad", not a commit to skip.
            tracked = (failing.get(flipped[0]) if regression else baseline[flipped[0]].headline) or ""
            step = bisect.case_step(request.with_cases([by_id[flipped[0]]]), tracked=tracked)
            found = bisect.bisect(walked, baseline_ref, candidate, step, terms=terms, deadline=deadline, say=say)
        out.append(replace(cause, bisection=found))
    return tuple(out)


def run_gate(request: RunSpec, baseline_ref: str | None = None, stream: TextIO | None = None,
             bisect_budget_s: float = DEFAULT_BISECT_BUDGET_S) -> GateOutcome:
    """Try the candidate's imports; run the baseline (if it is a git ref) and the candidate; judge
    every case; group the regressions and the fixes into root causes; bisect each cause when the
    baseline is a git ref; write it all into the candidate run's ``summary.md`` (the PR comment)
    and ``index.html``."""
    if not any(t.kind in ("megatron-lm", "megatron-bridge") for t in request.source_trees):
        raise InputError("gate needs a candidate: --megatron-lm PATH, --megatron-bridge PATH or --bridge-checkout PATH")
    say = (lambda text: print(text, file=stream, flush=True)) if stream else (lambda text: None)
    base = resolve_baseline(baseline_ref, request) if baseline_ref else None  # bad input fails before any work
    walked = base.history if base is not None and base.commit else None  # set: bisect from base.commit

    say("harness: checking that the candidate imports (the stack as a rank imports it)")
    problem = run_service.import_problem(request)
    if problem:
        cause = incompatible_cause(problem, request)
        if walked is not None:
            say(f"harness: the candidate does not import; bisecting the import between {baseline_ref} and {walked.walked.sha[:12]}")
            found = bisect.bisect(walked, base.commit, walked.walked.sha, bisect.import_step(request.lane),
                                  deadline=time.monotonic() + bisect_budget_s, say=say)
        else:
            found = Bisection.not_tried("first bad", "give --baseline GIT_REF to find the commit")
        cause = replace(cause, bisection=found)
        empty = run_service.run_selection(replace(request, cases=[]), stream=None)
        run_report.write_outcome(empty, verdicts={}, verdict_order=ORDER, root_causes=(cause,))
        return GateOutcome(run=empty, verdicts=[], root_causes=(cause,))

    baseline = baseline_results(base, request, stream) if base is not None else None
    candidate = run_service.run_selection(request, stream=stream)
    run_report.write_outcome(candidate)  # a plain run folder now; the verdicts are added once judged and bisected
    verdicts = judge_all(candidate.results, baseline)
    causes = regressed_causes(candidate.results, verdicts, request.source_trees) + fixed_causes(
        verdicts, baseline, request.source_trees)
    if walked is not None and causes:
        causes = bisect_causes(causes, walked, base.commit, baseline or {}, request, bisect_budget_s, say,
                               failing={r.case_id: r.headline for r in candidate.results})
    elif causes:
        why = "--baseline is a finished run, not a git ref" if baseline_ref else "no --baseline GIT_REF to bisect from"
        causes = tuple(replace(c, bisection=Bisection.not_tried(
            "first bad" if c.verdict == REGRESSED else "first fixed", why)) for c in causes)
    run_report.write_outcome(candidate, verdicts={v.case_id: v.verdict for v in verdicts}, verdict_order=ORDER,
                             root_causes=causes)
    return GateOutcome(run=candidate, verdicts=verdicts, root_causes=causes)
