"""Run folders under ``reports/``: atomic JSON, a terminal table, per-case files.

Layout of one run (``reports/<UTC timestamp>-<label>/``)::

    result.json            run summary + every case result (schema below, versioned)
    cases/<slug>.json      one case result each, written by rank 0 as soon as the case ends
    logs/<group>/rank<R>.log
    progress/rank<R>.jsonl

Writes go to a temp file in the same folder followed by ``os.replace``, so a run interrupted at
any point leaves either the old file or the new one, never half a JSON document.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from harness import paths

SCHEMA_VERSION = 1
RESULT_NAME = "result.json"


def slug(case_id: str) -> str:
    return case_id.replace("/", "__")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def new_run_dir(label: str, root: Path | None = None) -> Path:
    """A fresh, never-reused run folder; an existing folder is never written into."""
    root = root or paths.reports_root()
    root.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1000):
        name = f"{stamp}-{safe}" + (f"-{n}" if n else "")
        try:
            (root / name).mkdir()
            return root / name
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {root}")


def write_case_result(run_dir: Path, result) -> None:
    atomic_write_json(run_dir / "cases" / f"{slug(result.case_id)}.json", result.to_dict())


def write_rank_error(run_dir: Path, case_id: str, rank: int, text: str) -> None:
    atomic_write_text(run_dir / "cases" / f"{slug(case_id)}.rank{rank}.err", text)


def read_case_result(run_dir: Path, case_id: str):
    from harness.results import CaseResult

    file = run_dir / "cases" / f"{slug(case_id)}.json"
    if not file.exists():
        return None
    return CaseResult.from_dict(json.loads(file.read_text()))


def run_document(run_dir: Path, results: Iterable, meta: dict[str, Any]) -> dict[str, Any]:
    results = list(results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "schema_version": SCHEMA_VERSION,
        "run": run_dir.name,
        "meta": meta,
        "counts": counts,
        "cases": [r.to_dict() for r in results],
    }


def write_run(run_dir: Path, results: Iterable, meta: dict[str, Any]) -> Path:
    target = run_dir / RESULT_NAME
    atomic_write_json(target, run_document(run_dir, results, meta))
    return target


def key_numbers(result) -> str:
    """The one or two numbers that say how close a case was."""
    bits = []
    for check in result.checks:
        m = check.metrics
        if check.name == "tensors" and "compared" in m:
            bits.append(f"{m['compared'] - m['mismatched']}/{m['compared']} equal")
        elif check.name.startswith("logits") and "max_abs_diff" in m:
            bits.append(f"{check.name.removeprefix('logits-')} max|d|={m['max_abs_diff']:.1e}")
    return ", ".join(bits)


def table(results: Iterable) -> str:
    from tabulate import tabulate

    rows = []
    for r in results:
        first_bad = next((c for c in r.checks if not c.passed), None)
        failing = ""
        if first_bad is not None:
            failing = f"{first_bad.name}: {first_bad.summary}"
        elif r.status in ("error", "timeout"):
            failing = (r.error.strip().splitlines() or [""])[-1]
        rows.append([r.status.upper(), r.case_id, _clip(failing, 90), key_numbers(r), f"{r.duration_s:.1f}s"])
    return tabulate(rows, headers=["status", "case", "failing check", "key numbers", "time"], tablefmt="simple")


def check_table(result) -> str:
    from tabulate import tabulate

    rows = [["SKIP" if c.skipped else ("PASS" if c.passed else "FAIL"), c.name, _clip(c.summary, 110)] for c in result.checks]
    return tabulate(rows, headers=["", "check", "summary"], tablefmt="simple")


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
