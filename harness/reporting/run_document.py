"""``results.json``, the machine-readable record of a finished run: its one writer and reader.

``schema_version`` 1::

    {"schema_version": 1, "run": "<folder name>", "meta": {...RunMeta...},
     "counts": {"pass": N, ...}, "cases": [CaseResult.to_dict(), ...]}

Everything that reads a run (golden, gate, the HTML pages, the history) goes through ``load_run``,
so a schema change is made here once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from harness import workspace
from harness.execution.run_dir import RESULTS_NAME, RunDir
from harness.results import CaseResult, status_counts

SCHEMA_VERSION = 1


def run_document(run: RunDir, results: Iterable[CaseResult], meta: dict[str, Any]) -> dict[str, Any]:
    results = list(results)
    return {
        "schema_version": SCHEMA_VERSION,
        "run": run.name,
        "meta": meta,
        "counts": status_counts(results),
        "cases": [r.to_dict() for r in results],
    }


def write_results(run: RunDir, results: Iterable[CaseResult], meta: dict[str, Any]) -> Path:
    workspace.atomic_write_json(run.results_file, run_document(run, results, meta))
    return run.results_file


def resolve_run(ref: str | Path, root: Path | None = None) -> RunDir:
    """A run folder from a path, a folder name under reports/, or ``latest``."""
    root = root or workspace.reports_root()
    for candidate in (Path(ref), root / str(ref)):
        if (candidate / RESULTS_NAME).exists():
            return RunDir(candidate.resolve())
    raise FileNotFoundError(f"{ref}: no run with a {RESULTS_NAME} (looked in . and {root})")


def load_run(ref: str | Path) -> tuple[dict[str, Any], dict[str, CaseResult]]:
    """(document, {case_id: CaseResult}) of a finished run."""
    doc = json.loads(resolve_run(ref).results_file.read_text())
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{ref}: results schema {doc.get('schema_version')} is not {SCHEMA_VERSION}")
    return doc, {c["case_id"]: CaseResult.from_dict(c) for c in doc["cases"]}
