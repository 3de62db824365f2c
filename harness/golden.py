"""Golden expectations (``golden/<lane>/<case>.json``): read, compare, update (explicitly).

A golden file pins a case's expected outcome and fingerprint (see golden/README.md). Comparing a
fresh result with it yields a list of human-readable differences; an empty list is a match.
Logit metrics are compared against the tolerance recorded with them, not bit for bit: a new
Megatron may legitimately reorder fp32 accumulation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import paths, report
from harness.results import CaseResult

GOLDEN_FORMAT = 1


@dataclass(frozen=True)
class GoldenEntry:
    path: Path
    doc: dict[str, Any]


def golden_path(lane: str, case_id: str, root: Path | None = None) -> Path:
    return (root or paths.golden_root()) / lane / f"{report.slug(case_id)}.json"


def load(lane: str, case_id: str, root: Path | None = None) -> GoldenEntry | None:
    path = golden_path(lane, case_id, root)
    if not path.exists():
        return None
    return GoldenEntry(path, json.loads(path.read_text()))


def document(result: CaseResult, provenance: dict[str, Any]) -> dict[str, Any]:
    return {
        "golden_format": GOLDEN_FORMAT,
        "case_id": result.case_id,
        "lane": result.lane,
        "status": result.status,
        "failed_checks": result.failed_checks,
        "fingerprint": result.fingerprint,
        "provenance": provenance,
    }


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
    if want_l and got_l:
        tol = want_l.get("tolerance", {})
        if got_l["max_abs_diff"] > tol.get("max_abs", float("inf")):
            diffs.append(f"logits: max|d| {got_l['max_abs_diff']:.2e} over the golden tolerance {tol.get('max_abs')}")
    return diffs


def write(result: CaseResult, provenance: dict[str, Any], root: Path | None = None) -> Path:
    path = golden_path(result.lane, result.case_id, root)
    report.atomic_write_json(path, document(result, provenance))
    return path


def changes(result: CaseResult, root: Path | None = None) -> tuple[str, list[str]]:
    """What ``update`` would do for one case: ("new" | "changed" | "same", differences)."""
    existing = load(result.lane, result.case_id, root)
    if existing is None:
        return "new", [f"new golden: status {result.status}, {sum(len(v) for k, v in result.fingerprint.items() if k != 'logits')} digests"]
    diffs = compare(existing.doc, result)
    return ("changed" if diffs else "same"), diffs
