"""Which registered architectures the harness covers, and how each fares on each lane.

One row per architecture the Bridge in use registers (``harness.matrix.bridge_registry``), so
none is silently absent: a text LM shows its status per lane, with its number of cases; an
architecture the zoo cannot build (vision-language, audio, model code that ships only with the
checkpoint) shows why. A lane's status for a family comes from case outcomes, each taken from a
run's results where given and otherwise from ``golden/<lane>/`` (the committed expectations):

- ``pass``: every case with an outcome passed;
- ``known upstream failure``: some fail exactly as golden pins them (golden/known_failures.yaml
  gives the upstream cause); the rest pass;
- ``FAIL``: some case fails in a way golden does not pin;
- ``cannot run``: no case of the family can run on the lane (``harness.matrix.lanes`` says why);
- ``not run``: runnable cases, but no outcome yet (e.g. the GPU lane before its first golden run).

A lane's status counts the cases that build a model; config-only export cases (which build none)
count in the case-class column, which lists the issue-21 classes the family's cases fill
(``harness.matrix.case_classes``).

Torch-free: ``harness coverage`` and every run's ``summary.md`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from harness.matrix import bridge_registry, case_classes, family_registry
from harness.matrix.cases import Case, CaseSet
from harness.regression import golden
from harness.results import FAILED, PASS, SKIP, CaseResult
from harness.matrix import lanes

COVERED_PASS, KNOWN, FAILING, CANNOT_RUN, NOT_RUN, NOT_COVERED = (
    "pass", "known upstream failure", "FAIL", "cannot run", "not run", "not covered")
RED = (FAILING,)


@dataclass(frozen=True)
class Outcome:
    """A case's outcome on a lane, and whether golden pins that failure as a known upstream one."""

    status: str
    known_upstream: str = ""  # the pinned failure's upstream (e.g. "megatron-bridge 0.6.2"), if pinned

    @property
    def failed(self) -> bool:
        return self.status in FAILED


@dataclass(frozen=True)
class LaneStatus:
    lane: str
    status: str
    cases: int  # the family's cases that can run on the lane
    passed: int = 0
    known: int = 0
    failing: int = 0
    detail: str = ""  # the reason (cannot run, not covered) or the upstream of a known failure

    @property
    def text(self) -> str:
        """The table cell: status, counts, and why."""
        if self.status in (CANNOT_RUN, NOT_COVERED):
            return f"{self.status}: {self.detail}"
        if self.status == NOT_RUN:
            return f"not run ({self.cases} cases)"
        counts = f"{self.passed}/{self.cases} pass" + (f", {self.known} known" if self.known else "") + (
            f", {self.failing} FAIL" if self.failing else "")
        return f"{self.status} ({counts})" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class ArchitectureRow:
    architecture: str
    family: str  # "" when not covered
    kind: str
    lanes: tuple[LaneStatus, ...]
    classes: tuple[str, ...] = ()  # keys of the case classes the family's cases fill

    @property
    def classes_text(self) -> str:
        return ", ".join(self.classes) or "—"


def golden_outcomes(lane: str) -> dict[str, Outcome]:
    """case_id -> outcome pinned in ``golden/<lane>/``."""
    out = {}
    for entry in golden.entries(lane):
        known = (entry.doc.get("known_failure") or {}).get("upstream", "")
        out[entry.doc["case_id"]] = Outcome(entry.doc["status"], known)
    return out


def run_outcomes(results: Iterable[CaseResult]) -> dict[str, Outcome]:
    """case_id -> outcome of a run; a failure counts as known when it is exactly what golden pins."""
    out = {}
    for r in results:
        entry = golden.load(r.lane, r.case_id)
        pinned = entry is not None and golden.fails_as_pinned(entry.doc, r)
        known = (entry.doc.get("known_failure") or {}).get("upstream", "") if pinned else ""
        out[r.case_id] = Outcome(r.status, known)
    return out


def _lane_status(lane: str, cases: list[Case], outcomes: Mapping[str, Outcome]) -> LaneStatus:
    runnable = [c for c in cases if lane in c.lanes and not c.invalid_reason and c.builds_model]
    if not runnable:
        blocked = next((c for c in cases if not c.invalid_reason and c.builds_model), None)
        return LaneStatus(lane, CANNOT_RUN, 0, detail=lanes.case_blocker(blocked, lane) if blocked else "no cases")
    seen = [outcomes[c.id] for c in runnable if c.id in outcomes and outcomes[c.id].status != SKIP]
    passed = sum(o.status == PASS for o in seen)
    known = [o for o in seen if o.failed and o.known_upstream]
    failing = sum(o.failed and not o.known_upstream for o in seen)
    if not seen:
        return LaneStatus(lane, NOT_RUN, len(runnable))
    status = FAILING if failing else KNOWN if known else COVERED_PASS
    upstream = ", ".join(sorted({o.known_upstream for o in known}))
    return LaneStatus(lane, status, len(runnable), passed, len(known), failing, upstream)


def coverage(case_set: CaseSet, outcomes: Mapping[str, Mapping[str, Outcome]]) -> list[ArchitectureRow]:
    """Every registered architecture; ``outcomes`` is lane -> case_id -> outcome."""
    by_family: dict[str, list[Case]] = {}
    for case in case_set.cases:
        by_family.setdefault(case.model.family, []).append(case)
    families = {f.hf_architecture: f for f in family_registry.families().values()}
    rows = []
    for arch in bridge_registry.registered_architectures():
        family = families.get(arch.architecture)
        if family is None:
            why = arch.why_not_covered or "no family (harness bug: a text LM the zoo did not build)"
            rows.append(ArchitectureRow(arch.architecture, "", arch.kind,
                                        tuple(LaneStatus(lane, NOT_COVERED, 0, detail=why) for lane in lanes.LANES)))
            continue
        cases = by_family.get(family.name, [])
        filled = {k.key for case in cases if case.lanes for k in case_classes.classes_of(case)}
        rows.append(ArchitectureRow(arch.architecture, family.name, arch.kind,
                                    tuple(_lane_status(lane, cases, outcomes.get(lane, {})) for lane in lanes.LANES),
                                    tuple(k.key for k in case_classes.CLASSES if k.key in filled)))
    return rows


def outcomes_for(results: Iterable[CaseResult] = ()) -> dict[str, dict[str, Outcome]]:
    """golden/ for every lane, with the given run's results over it."""
    results = list(results)
    merged = {lane: golden_outcomes(lane) for lane in lanes.LANES}
    for lane in {r.lane for r in results}:
        merged.setdefault(lane, {}).update(run_outcomes(r for r in results if r.lane == lane))
    return merged


def markdown(rows: list[ArchitectureRow]) -> str:
    """The coverage table (README, summary.md): a short cell per lane, each distinct reason once,
    numbered under the table, so the table reads at a glance."""
    reasons: dict[str, int] = {}

    def cell(s: LaneStatus) -> str:
        if s.status in (CANNOT_RUN, NOT_COVERED):
            return f"{s.status} [{reasons.setdefault(s.detail, len(reasons) + 1)}]"
        return s.text.replace("|", "¦")

    lines = ["| architecture | family | " + " | ".join(f"{lane} lane" for lane in lanes.LANES) + " | case classes |",
             "|---|---|" + "---|" * len(lanes.LANES) + "---|"]
    for row in rows:
        lines.append(f"| `{row.architecture}` | {f'`{row.family}`' if row.family else '—'} | "
                     + " | ".join(cell(s) for s in row.lanes) + f" | {row.classes_text} |")
    covered = sum(bool(r.family) for r in rows)
    lines += ["", f"{len(rows)} registered architectures: {covered} text LMs with a family, "
                  f"{len(rows) - covered} not covered.", ""]
    lines += [f"[{n}] {why.replace('|', '¦')}" + "  " for why, n in reasons.items()]
    lines += ["", "Case classes (issue 21): " + "; ".join(f"`{k.key}` {k.title}" for k in case_classes.CLASSES) + "."]
    return "\n".join(lines) + "\n"
