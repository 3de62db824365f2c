"""How an outcome shows on both pages: a case's status, a gate verdict, or a failure pinned in
golden/ as a known upstream one; red means it needs attention now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.regression import golden
from harness.results import (ERROR, FAIL, FIXED, INCOMPATIBLE, INFRA_ERROR, INVALID, NOT_RUN, PASS, REGRESSED, SKIP,
                             STILL_FAILING, TIMEOUT, V_PASS, CaseResult)


@dataclass(frozen=True)
class Look:
    """How a cell shows an outcome: CSS class (colour), label, and whether it is red (needs
    attention now)."""

    css: str
    label: str
    needs_attention: bool
    meaning: str


STATUS_LOOKS = {
    PASS: Look("pass", "PASS", False, "every check passed (PASS* = passed, but a check could not run here)"),
    FAIL: Look("fail", "FAIL", True, "a check failed"),
    ERROR: Look("error", "ERROR", True, "the case crashed"),
    TIMEOUT: Look("timeout", "TIMEOUT", True, "the launcher killed it at its time limit"),
    SKIP: Look("skip", "SKIP", False, "could not run on this machine (the case says why)"),
    INVALID: Look("invalid", "INVALID", False, "expected-invalid: the layout is declared impossible and was refused"),
    INFRA_ERROR: Look("infra", "INFRA", False, "the machine, not the code under test, kept it from running"),
}
KNOWN_LOOK = Look("known", "KNOWN", False,
                  "known upstream failure: fails exactly as golden/ pins it (see golden/known_failures.yaml)")
# Gate verdicts: the names are harness.results' (harness.regression.gate decides them).
VERDICT_LOOKS = {
    V_PASS: Look("pass", V_PASS, False, "passes now and in golden/ and the baseline"),
    REGRESSED: Look("fail", REGRESSED, True, "fails now, but passed in golden/ or in the baseline"),
    FIXED: Look("fixed", FIXED, False, "passes now, failed in every reference"),
    STILL_FAILING: Look("known", STILL_FAILING, False, "fails now, and failed in every reference"),
    NOT_RUN: Look("skip", NOT_RUN, False, "not run here: invalid layout, not runnable here, or infrastructure"),
    INCOMPATIBLE: Look("error", INCOMPATIBLE, True, "the candidate cannot start: a rank cannot import the stack"),
}


def status_look(status: str) -> Look:
    """A status this module does not know yet is shown red: better a false alarm than silence."""
    return STATUS_LOOKS.get(status) or Look("error", status.upper(), True, "unknown status")


@dataclass(frozen=True)
class GoldenView:
    """A case against its ``golden/<lane>/<case>.json``."""

    path: str  # "" when there is no golden file
    golden_status: str
    differences: tuple[str, ...]
    known_failure: dict[str, Any]  # the pinned {upstream, diagnosis, headline}, if any
    fails_as_pinned: bool = False  # golden.fails_as_pinned: a known failure, not red

    @property
    def exists(self) -> bool:
        return bool(self.path)


def golden_view(result: CaseResult) -> GoldenView:
    entry = golden.load(result.lane, result.case_id)
    if entry is None:
        return GoldenView("", "", (), {})
    differences = golden.compare(entry.doc, result)
    return GoldenView(str(entry.path), entry.doc.get("status", ""), tuple(differences),
                      entry.doc.get("known_failure") or {}, golden.fails_as_pinned(entry.doc, result, differences))


def result_look(result: CaseResult, view: GoldenView, verdict: str = "") -> Look:
    """A gate run's verdict, else a failure that fails as golden/ pins it (known), else its status;
    a pass with a check that could not run here is marked ``*``."""
    if verdict:
        look = VERDICT_LOOKS.get(verdict) or Look("error", verdict, True, "unknown verdict")
    elif view.fails_as_pinned:
        look = KNOWN_LOOK
    else:
        look = status_look(result.status)
    if look.css == "pass" and result.unchecked:
        look = Look(look.css, f"{look.label}*", look.needs_attention, look.meaning)
    return look
