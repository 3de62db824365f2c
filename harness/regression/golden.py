"""Golden expectations (``golden/<lane>/<case>.json``): read, compare, update (explicitly).

A golden file pins a case's expected outcome and fingerprint (see golden/README.md). Comparing a
fresh result with it yields a list of human-readable differences; an empty list is a match.
Logit metrics are compared against the tolerance recorded with them, not bit for bit: a new
Megatron may legitimately reorder fp32 accumulation.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
from harness import workspace
from harness.errors import load_yaml
from harness.matrix.cases import matches
from harness.results import FAILED, NOT_RUN_HERE, PASS, CaseResult

GOLDEN_FORMAT = 1
SAME, NEW, CHANGED = "same", "new", "changed"  # a run's case against its golden file
KNOWN_FAILURES = "known_failures.yaml"


@dataclass(frozen=True)
class KnownFailure:
    """Why a case fails on the pinned stack (``golden/known_failures.yaml``)."""

    cases: tuple[str, ...]  # case-ID globs
    lanes: tuple[str, ...]
    checks: tuple[str, ...]  # the checks it fails ([] for a crash)
    upstream: str
    diagnosis: str
    evidence: str = ""  # where the failure was seen (a lane's runs, or only read from the code)

    def matches(self, case_id: str, lane: str) -> bool:
        return lane in self.lanes and any(fnmatch.fnmatchcase(case_id, pattern) for pattern in self.cases)

    def specificity(self, case_id: str) -> int:
        """How narrowly this entry names ``case_id``: the literal characters of its longest
        matching glob (``deepseek-v2/*/hf/config-export`` beats ``deepseek-v2/*``)."""
        return max((len(p) - sum(p.count(c) for c in "*?[]") for p in self.cases if fnmatch.fnmatchcase(case_id, p)),
                   default=-1)


def known_failures(root: Path | None = None) -> list[KnownFailure]:
    path = (root or workspace.golden_root()) / KNOWN_FAILURES
    if not path.exists():
        return []
    doc = load_yaml(path) or {}
    return [KnownFailure(cases=tuple(e["cases"]), lanes=tuple(e["lanes"]), checks=tuple(e.get("checks", [])),
                         upstream=e["upstream"], diagnosis=" ".join(e["diagnosis"].split()),
                         evidence=e.get("evidence", ""))
            for e in doc.get("failures", [])]


def known_failure(case_id: str, lane: str, root: Path | None = None) -> KnownFailure | None:
    """The entry that says why ``case_id`` fails on ``lane``: the most specific one that matches,
    so a narrow entry (one path of a family) may sit beside a broad one (the whole family)."""
    matching = [k for k in known_failures(root) if k.matches(case_id, lane)]
    return max(matching, key=lambda k: k.specificity(case_id), default=None)


@dataclass(frozen=True)
class GoldenEntry:
    path: Path
    doc: dict[str, Any]


def golden_path(lane: str, case_id: str, root: Path | None = None) -> Path:
    return (root or workspace.golden_root()) / lane / f"{workspace.slug(case_id)}.json"


def load(lane: str, case_id: str, root: Path | None = None) -> GoldenEntry | None:
    path = golden_path(lane, case_id, root)
    if not path.exists():
        return None
    return GoldenEntry(path, json.loads(path.read_text()))


def entries(lane: str, root: Path | None = None) -> list[GoldenEntry]:
    """Every golden file of ``lane``."""
    folder = (root or workspace.golden_root()) / lane
    return [GoldenEntry(p, json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def document(result: CaseResult, provenance: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    doc = {
        "golden_format": GOLDEN_FORMAT,
        "case_id": result.case_id,
        "lane": result.lane,
        "status": result.status,
        "failed_checks": result.failed_checks,
        "fingerprint": result.fingerprint,
        "provenance": provenance,
    }
    known = known_failure(result.case_id, result.lane, root) if result.status != PASS else None
    if known is not None:
        doc["known_failure"] = {"upstream": known.upstream, "diagnosis": known.diagnosis,
                                "headline": result.headline}
    return doc


def compare(golden: dict[str, Any], result: CaseResult) -> list[str]:
    """Differences between a golden document and a fresh result (empty: they agree)."""
    diffs: list[str] = []
    if golden["status"] != result.status:
        diffs.append(f"status {result.status}, golden {golden['status']}")
    if sorted(golden.get("failed_checks", [])) != sorted(result.failed_checks):
        diffs.append(f"failing checks {result.failed_checks}, golden {golden.get('failed_checks', [])}")
    want_fp, got_fp = golden.get("fingerprint", {}), result.fingerprint
    for fmt in sorted(set(want_fp) | set(got_fp)):
        if fmt == "logits":
            continue
        want, got = want_fp.get(fmt), got_fp.get(fmt)
        if want is None or got is None:
            diffs.append(f"{fmt}: {'not produced now' if got is None else 'not in golden'}")
            continue
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing:
            diffs.append(f"{fmt}: {len(missing)} key(s) gone, e.g. {missing[0]}")
        if extra:
            diffs.append(f"{fmt}: {len(extra)} new key(s), e.g. {extra[0]}")
        layout = [k for k in set(want) & set(got) if want[k][:2] != got[k][:2]]
        values = [k for k in set(want) & set(got) if want[k][:2] == got[k][:2] and want[k][2] != got[k][2]]
        if layout:
            k = sorted(layout)[0]
            diffs.append(f"{fmt}: {len(layout)} shape/dtype change(s), e.g. {k}: {got[k][:2]} (golden {want[k][:2]})")
        if values:
            diffs.append(f"{fmt}: {len(values)} tensor(s) with different bytes, e.g. {sorted(values)[0]}")
    want_l, got_l = want_fp.get("logits"), got_fp.get("logits")
    if bool(want_l) != bool(got_l):  # a logit check that stopped (or started) running is news
        diffs.append(f"logits: {'not produced now' if want_l else 'not in golden'}")
    if want_l and got_l and golden["status"] == PASS:  # a pinned failure is over tolerance by definition
        tol = want_l.get("tolerance", {})
        if got_l["max_abs_diff"] > tol.get("max_abs", float("inf")):
            diffs.append(f"logits: max|d| {got_l['max_abs_diff']:.2e} over the golden tolerance {tol.get('max_abs')}")
    return diffs


def fails_as_pinned(golden_doc: dict[str, Any], result: CaseResult, differences: list[str] | None = None) -> bool:
    """``result`` failed, exactly as ``golden_doc`` pins it (same status, failing checks and
    digests): a known failure, nothing new. A pinned case that fails *differently* is news.
    ``differences``: ``compare(golden_doc, result)`` where the caller has it already."""
    if differences is None:
        differences = compare(golden_doc, result)
    return result.status in FAILED and golden_doc.get("status") in FAILED and not differences


def write(result: CaseResult, provenance: dict[str, Any], root: Path | None = None) -> Path:
    path = golden_path(result.lane, result.case_id, root)
    workspace.atomic_write_json(path, document(result, provenance, root))
    return path


def changes(result: CaseResult, root: Path | None = None) -> tuple[str, list[str]]:
    """What ``update`` would do for one case: (NEW | CHANGED | SAME, differences)."""
    existing = load(result.lane, result.case_id, root)
    if existing is None:
        digests = sum(len(v) for k, v in result.fingerprint.items() if k != "logits")
        return NEW, [f"new golden: status {result.status}, {digests} digests"]
    diffs = compare(existing.doc, result)
    why = ("upstream", "diagnosis")  # the headline's numbers may move within tolerance; the reason may not
    pinned, current = existing.doc.get("known_failure") or {}, document(result, {}, root).get("known_failure") or {}
    if not diffs and [pinned.get(k) for k in why] != [current.get(k) for k in why]:
        diffs = ["known-failure diagnosis differs from golden/known_failures.yaml"]
    return (CHANGED if diffs else SAME), diffs


# ------------------------------------------------------------------- a run against golden/


@dataclass(frozen=True)
class Review:
    """One case of a run against its golden file."""

    case_id: str
    kind: str  # SAME | NEW (no golden file) | CHANGED
    differences: tuple[str, ...]

    @property
    def label(self) -> str:
        """How ``harness golden check`` shows it."""
        return {SAME: "match", NEW: "NO GOLDEN", CHANGED: "MISMATCH"}[self.kind]


def _matching(results: dict[str, CaseResult], k: str | None) -> dict[str, CaseResult]:
    return {case_id: r for case_id, r in results.items() if not k or matches(case_id, k)}


def not_run_here(results: dict[str, CaseResult], k: str | None = None) -> list[str]:
    """The cases (matching ``-k``) that ``review_run`` leaves out: this machine did not run them."""
    return [case_id for case_id, r in _matching(results, k).items() if r.status in NOT_RUN_HERE]


def review_run(results: dict[str, CaseResult], k: str | None = None, root: Path | None = None) -> list[Review]:
    """Every case of a run (matching ``-k``) that ran, against golden/. A case this machine did
    not run (``NOT_RUN_HERE``: a GPU case on too few GPUs) is neither compared nor pinned: a
    one-GPU run must not write ``skip`` where an eight-GPU nightly expects ``pass``."""
    out = []
    for case_id, result in _matching(results, k).items():
        if result.status in NOT_RUN_HERE:
            continue
        kind, diffs = changes(result, root)
        out.append(Review(case_id, kind, tuple(diffs)))
    return out


def run_provenance(doc: dict[str, Any]) -> dict[str, Any]:
    """What a golden file records about the run it came from."""
    return {"run": doc["run"], "versions": doc["meta"].get("versions"),
            "source_trees": doc["meta"].get("source_trees", []), "harness": harness.__version__}


def update_from_run(doc: dict[str, Any], results: dict[str, CaseResult], reviews: list[Review],
                    root: Path | None = None) -> list[Path]:
    """Write the golden file of every new or changed case (never implicitly: ``golden update``)."""
    provenance = run_provenance(doc)
    return [write(results[r.case_id], provenance, root) for r in reviews if r.kind != SAME]


# ------------------------------------------------- a run's verdict, as pytest judges the matrix

EXPECTED, KNOWN, UNEXPECTED = "expected", "known", "unexpected"


@dataclass(frozen=True)
class Judgement:
    """One result against golden/: what the matrix test (harness/pytest_matrix.py) and the
    CLI's exit code both decide from. EXPECTED: passed (and matches its golden file, if any);
    KNOWN: failed exactly as pinned (pytest's XFAIL); UNEXPECTED: anything new, including a
    pinned failure that now passes (XPASS(strict))."""

    kind: str
    why: str = ""
    upstream: str = ""  # KNOWN: the package golden/known_failures.yaml blames


def judge(result: CaseResult, root: Path | None = None) -> Judgement:
    entry = load(result.lane, result.case_id, root)
    if entry is not None and entry.doc["status"] != PASS:  # a known upstream failure, pinned
        upstream = (entry.doc.get("known_failure") or {}).get("upstream")
        if result.status == PASS:
            return Judgement(UNEXPECTED, f"passes now, but {entry.path} pins it as a known failure ({upstream}): "
                                         "fixed upstream? Check, then `harness golden update -k` it")
        differences = compare(entry.doc, result)
        if fails_as_pinned(entry.doc, result, differences):
            return Judgement(KNOWN, f"known upstream failure ({upstream}): {result.headline}", upstream or "?")
        return Judgement(UNEXPECTED, f"fails differently from {entry.path}: " + "; ".join(differences))
    if result.status != PASS:
        return Judgement(UNEXPECTED, result.headline)
    differences = compare(entry.doc, result) if entry is not None else []
    if differences:  # the outcome is right; it must also be the same bytes as golden/ pins
        return Judgement(UNEXPECTED, f"differs from {entry.path}: " + "; ".join(differences))
    return Judgement(EXPECTED)


@dataclass(frozen=True)
class RunVerdict:
    """A run's cases that ran, judged against golden/ (skips, invalid layouts and infrastructure
    errors are not judged: they say nothing about the code under test)."""

    judgements: dict[str, Judgement]

    def count(self, kind: str) -> int:
        return sum(j.kind == kind for j in self.judgements.values())

    @property
    def unexpected(self) -> dict[str, Judgement]:
        return {case_id: j for case_id, j in self.judgements.items() if j.kind == UNEXPECTED}

    def line(self, total: int) -> str:
        """``98/136 passed, 35 failed exactly as pinned (...), 0 unexpected``: ``total`` counts the
        cases not judged too (skips, invalid layouts, infrastructure errors)."""
        known = self.count(KNOWN)
        return (f"{self.count(EXPECTED)}/{total} passed, {known} failed exactly as pinned"
                f"{f' (known upstream failures: golden/{KNOWN_FAILURES})' if known else ''}, "
                f"{len(self.unexpected)} unexpected")

    @property
    def known_by_upstream(self) -> dict[str, int]:
        """How many pinned failures each upstream package is blamed for, most first."""
        counts: dict[str, int] = {}
        for j in self.judgements.values():
            if j.kind == KNOWN:
                blamed = " + ".join(sorted(j.upstream.split(" + ")))  # "a + b" and "b + a" are one cause
                counts[blamed] = counts.get(blamed, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def judge_run(results: list[CaseResult], root: Path | None = None) -> RunVerdict:
    judged = [r for r in results if r.status in (PASS, *FAILED)]
    return RunVerdict({r.case_id: judge(r, root) for r in judged})
