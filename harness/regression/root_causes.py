"""Root causes: the gate's judged cases grouped by why they fail, so one bug is one row.

A single mapping bug fails every case that converts the tensor it maps: 22 REGRESSED rows with the
same check and numbers that differ only in their digits. Grouping them by a *signature* makes the
gate's table, ``summary.md`` and ``index.html`` lead with that one cause, how many cases and which
families and layouts it hits, and the one case to rerun.

A signature is what the failure is, with what varies from case to case taken out:

* a failing check: its name, plus its first failing tensor (the canonical key, layer and expert
  indices as ``#``) and that tensor's problem, numbers and shapes as placeholders; a check with no
  tensor to name keeps its summary, normalised the same way;
* a crash: the exception type (else the status: ``error``, ``timeout``) and the headline's
  message, normalised (``rank 1`` and ``rank 0`` are one cause; ``ValueError`` and ``KeyError``
  are two);
* a pass whose bytes moved off golden/: ``golden`` and the first difference, normalised.

Different checks, tensors or exception types never merge. Reports render ``RootCause``; none of
them recomputes a signature. No torch import.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from harness.matrix.cases import parse_case_id
from harness.results import PASS, CaseResult

if TYPE_CHECKING:  # gate imports this module; its Verdict is only a type here
    from harness.regression.gate import Verdict

NOT_BISECTED = "not bisected"  # a cause the gate did not bisect (no git baseline, or no budget left)

# Order matters: paths and hex before numbers (a path or a SHA holds digits), shapes after them.
_PATH = re.compile(r"(?<![\w.])/[\w.+@-]+(?:/[\w.+@-]+)*")
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,}\b")
# A number stands alone or after punctuation (`rank 1`, `=3.7e-01`, `layers.3.`, `1/2`), never
# inside a name (`qwen3`, `float32`, `linear_fc1`, `tp2` keep their digits: they say what it is).
_NUMBER = re.compile(r"(?<![A-Za-z_\d])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\b(?:nan|inf)\b")
_SHAPE = re.compile(r"[\[(]\s*#(?:\s*,\s*#)*\s*,?\s*[\])]")
_EXCEPTION = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Z]\w*)(?::|$)")  # `ValueError: ...`, `torch.x.DistError`
_KEY_LISTS = (("missing", "missing"), ("extra", "extra"), ("duplicates", "produced twice"))


def normalise(text: str) -> str:
    """``text`` with what differs between cases of one cause replaced by placeholders: paths
    (``<path>``), hex and SHAs (``<hex>``), numbers (``#``, layer indices included), shapes
    (``<shape>``); whitespace collapsed."""
    text = _PATH.sub("<path>", text)
    text = _HEX.sub("<hex>", text)
    text = _NUMBER.sub("#", text)
    text = _SHAPE.sub("<shape>", text)
    return " ".join(text.split())


def exception_type(headline: str) -> str:
    """The exception class a crash headline starts with (``ValueError: ...``), or ""."""
    match = _EXCEPTION.match(headline.strip())
    return match.group(1) if match else ""


@dataclass(frozen=True)
class Signature:
    """Why one case fails, with the case-specific numbers taken out: equal signatures, one cause."""

    check: str  # the failing check, the exception type (or crash status), or "golden"
    tensor: str  # the first failing tensor, canonical key with indices as `#`; "" if none
    detail: str  # the tensor's problem, else the summary or message, normalised

    @property
    def text(self) -> str:
        return " :: ".join(p for p in (self.check, self.tensor, self.detail) if p)


def first_failing_tensor(result: CaseResult) -> tuple[str, str] | None:
    """(key, problem) of the first tensor the first failing check names: its first problem row
    (``details``, e.g. the ``tensors`` check's per-tensor rows), else its first missing / extra /
    twice-produced key."""
    check = result.first_failing_check
    if check is None:
        return None
    for row in check.details:
        if "key" in row and row.get("status", "ok") != "ok":
            return str(row["key"]), str(row["status"])
    for metric, problem in _KEY_LISTS:
        keys = check.metrics.get(metric)
        if isinstance(keys, list) and keys:
            return str(keys[0]), problem
    return None


def signature(result: CaseResult, reasons: Sequence[str] = ()) -> Signature:
    """The signature of a case that did not pass (``reasons``: the gate's, for golden drift)."""
    check = result.first_failing_check
    if check is not None:
        tensor = first_failing_tensor(result)
        if tensor is not None:
            return Signature(check.name, normalise(tensor[0]), normalise(tensor[1]))
        return Signature(check.name, "", normalise(check.summary))
    headline = result.headline
    if result.error or result.status != PASS:
        kind = exception_type(headline)
        message = headline.split(":", 1)[1] if kind and ":" in headline else headline
        return Signature(kind or result.status, "", normalise(message))
    drift = next((r.removeprefix("golden: ") for r in reasons if r.startswith("golden: ")), "")
    return Signature("golden", "", normalise(drift or "; ".join(reasons)))


@dataclass(frozen=True)
class Commit:
    """A commit as a report names it: SHA, subject, the files it touched."""

    sha: str
    subject: str
    files: tuple[str, ...] = ()
    more_files: int = 0  # touched but not listed

    @property
    def text(self) -> str:
        files = ", ".join(self.files) + (f" and {self.more_files} more" if self.more_files else "")
        return f"{self.sha[:12]} {self.subject}" + (f" (files: {files})" if files else "")


@dataclass(frozen=True)
class Bisection:
    """What bisecting one cause found (``harness.regression.bisect``): the first bad commit of a
    regression, the first good commit of a fix, or why there is none."""

    FOUND, NOT_FOUND, BUDGET, ABORTED, NOT_TRIED = "found", "not-found", "budget", "aborted", "not-tried"

    status: str
    term: str  # "first bad" | "first fixed"
    commit: Commit | None = None
    steps: int = 0
    skipped: tuple[Commit, ...] = ()  # commits that did not import (git bisect skip)
    range: tuple[str, str] = ("", "")  # the last known (before, after) commits
    reason: str = ""  # why no commit was named

    @property
    def text(self) -> str:
        """One line for a report cell: the commit, else ``not bisected: why``."""
        if self.commit is not None:
            skipped = f"; {len(self.skipped)} skipped (no import)" if self.skipped else ""
            return f"{self.commit.text} [{self.steps} step(s){skipped}]"
        return f"{NOT_BISECTED}: {self.reason}"

    @classmethod
    def not_tried(cls, term: str, reason: str) -> "Bisection":
        return cls(status=cls.NOT_TRIED, term=term, reason=reason)


@dataclass(frozen=True)
class RootCause:
    """One cause and every case it explains, as reports show it (one row each)."""

    verdict: str  # the gate verdict of its cases (REGRESSED)
    signature: str  # Signature.text: the grouping key
    check: str  # the failing check, exception type, crash status, or "golden"
    tensor: str  # first failing tensor, indices as `#`; "" if none
    detail: str  # what the representative measured: failing check's summary, exception line, or drift
    case_ids: tuple[str, ...]  # in result order
    families: tuple[str, ...]  # family[@variant], first seen first
    layouts: tuple[str, ...]
    paths: tuple[str, ...]  # format/kind
    representative: str  # the cheapest case to rerun (fewest ranks, then quickest)
    rerun: str  # the `harness run` command line that reruns the representative
    bisection: Bisection | None = None  # the first bad (a FIXED cause: first good) commit, if bisected

    @property
    def commit_text(self) -> str:
        """The report cell for the commit that caused it (or fixed it), or why none is named."""
        return self.bisection.text if self.bisection is not None else NOT_BISECTED

    @property
    def count(self) -> int:
        return len(self.case_ids)


def rerun_command(result: CaseResult, tree_args: Sequence[str] = ()) -> str:
    return shlex.join(["harness", "run", result.case_id, "--lane", result.lane, *tree_args])


def group(results: Iterable[CaseResult], verdicts: Iterable[Verdict],
          tree_args: Sequence[str] = ()) -> tuple[RootCause, ...]:
    """Root causes of the judged cases in ``verdicts`` (the caller picks which, e.g. the
    REGRESSED ones): one per (verdict, signature), the most cases first. ``tree_args`` (e.g.
    ``--megatron-lm PATH``) make each rerun command test the same trees."""
    by_id = {r.case_id: r for r in results}
    groups: dict[tuple[str, str], list[tuple[CaseResult, Verdict, Signature]]] = {}
    for v in verdicts:
        result = by_id[v.case_id]
        sig = signature(result, v.reasons)
        groups.setdefault((v.verdict, sig.text), []).append((result, v, sig))
    causes = []
    for (verdict, text), members in groups.items():
        cases = [r for r, _, _ in members]
        keys = [parse_case_id(r.case_id) for r in cases]
        rep, rep_verdict, sig = min(members, key=lambda m: (m[0].world_size, m[0].duration_s, m[0].case_id))
        causes.append(RootCause(
            verdict=verdict, signature=text, check=sig.check, tensor=sig.tensor,
            detail=_failure(rep, rep_verdict),
            case_ids=tuple(r.case_id for r in cases), families=_distinct(k.model for k in keys),
            layouts=_distinct(k.layout for k in keys), paths=_distinct(k.path for k in keys),
            representative=rep.case_id, rerun=rerun_command(rep, tree_args)))
    causes.sort(key=lambda c: -c.count)  # stable: equal counts keep the order cases came in
    return tuple(causes)


def _failure(result: CaseResult, verdict: Verdict) -> str:
    """What went wrong in one case, as measured: its failing check's summary, else its headline
    (a crash's exception line), else the gate's reasons (golden drift)."""
    bad = result.first_failing_check
    return bad.summary if bad is not None else result.headline or "; ".join(verdict.reasons)


def _distinct(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))
