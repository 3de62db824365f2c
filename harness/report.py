"""Run folders under ``reports/``: atomic JSON, a terminal table, per-case files.

Layout of one run (``reports/<UTC timestamp>-<label>/``)::

    results.json           run summary + every case result (``schema_version``; see run_document)
    result.json            -> results.json (the name the first version used)
    junit.xml              one <testcase> per case, for CI test reporting
    summary.md             a Markdown table fit for a PR comment
    cases/<slug>.json      one case result each, written by rank 0 as soon as the case ends
    logs/<group>/rank<R>.log
    progress/rank<R>.jsonl
    provenance/<group>.json  where each rank group imported Megatron from

``reports/latest`` points at the newest finished run (a symlink, replaced atomically).

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
RESULTS_NAME = "results.json"
LEGACY_NAME = "result.json"


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


STACK_PACKAGES = (
    "torch", "megatron-core", "megatron-bridge", "megatron-fsdp", "transformers",
    "transformer-engine", "transformer-engine-torch", "safetensors",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the stack under test (from metadata: no imports)."""
    from importlib import metadata

    out = {}
    for name in STACK_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_provenance(run_dir: Path, group: str, imported: dict[str, str]) -> None:
    """Where each rank group imported Megatron from (and the versions it saw)."""
    import megatron.core
    from megatron.core import package_info

    atomic_write_json(run_dir / "provenance" / f"{group}.json", {
        "megatron.core": str(Path(megatron.core.__file__).parent),
        "megatron.core.version": getattr(package_info, "__version__", "?"),
        "imported_from_trees": imported,
        "installed": package_versions(),
    })


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
    """All the run-level files, each written atomically, then the ``latest`` pointer."""
    results = list(results)
    target = run_dir / RESULTS_NAME
    atomic_write_json(target, run_document(run_dir, results, meta))
    legacy = run_dir / LEGACY_NAME
    if not legacy.exists():
        legacy.symlink_to(RESULTS_NAME)
    atomic_write_text(run_dir / "junit.xml", junit_xml(results, run_dir.name))
    atomic_write_text(run_dir / "summary.md", summary_markdown(results, meta, run_dir.name))
    point_latest(run_dir)
    return target


def point_latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def resolve_run(ref: str | Path, root: Path | None = None) -> Path:
    """A run folder from a path, a folder name under reports/, or ``latest``."""
    root = root or paths.reports_root()
    for candidate in (Path(ref), root / str(ref)):
        if (candidate / RESULTS_NAME).exists():
            return candidate.resolve()
    raise FileNotFoundError(f"{ref}: no run with a {RESULTS_NAME} (looked in . and {root})")


def load_run(ref: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(document, {case_id: CaseResult}) of a finished run."""
    from harness.results import CaseResult

    doc = json.loads((resolve_run(ref) / RESULTS_NAME).read_text())
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{ref}: results schema {doc.get('schema_version')} is not {SCHEMA_VERSION}")
    return doc, {c["case_id"]: CaseResult.from_dict(c) for c in doc["cases"]}


def junit_xml(results: list, suite: str) -> str:
    import xml.etree.ElementTree as ET

    failures = sum(r.status == "fail" for r in results)
    errors = sum(r.status in ("error", "timeout") for r in results)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=f"harness.{suite}", tests=str(len(results)),
                       failures=str(failures), errors=str(errors),
                       time=f"{sum(r.duration_s for r in results):.3f}")
    for r in results:
        tc = ET.SubElement(ts, "testcase", classname=f"harness.{r.lane}", name=r.case_id, time=f"{r.duration_s:.3f}")
        bad = next((c for c in r.checks if not c.passed), None)
        if r.status == "fail" and bad is not None:
            ET.SubElement(tc, "failure", message=f"{bad.name}: {bad.summary}"[:1000]).text = check_table(r)
        elif r.status in ("error", "timeout"):
            ET.SubElement(tc, "error", message=(r.error.strip().splitlines() or [r.status])[0][:1000]).text = r.error
        elif r.status == "skip":
            ET.SubElement(tc, "skipped", message=r.error[:1000])
        props = ET.SubElement(tc, "properties")
        for c in r.checks:
            if "max_abs_diff" in c.metrics:
                ET.SubElement(props, "property", name=f"{c.name}.max_abs_diff", value=repr(c.metrics["max_abs_diff"]))
        ET.SubElement(tc, "system-out").text = check_table(r) if r.checks else ""
    return ET.tostring(root, encoding="unicode") + "\n"


def summary_markdown(results: list, meta: dict[str, Any], run_name: str, verdicts: dict[str, str] | None = None) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"### Conversion harness: `{run_name}`", ""]
    lines.append(", ".join(f"**{n}** {s}" for s, n in sorted(counts.items())) + f" of {len(results)} cases")
    trees = meta.get("source_trees") or []
    for t in trees:
        lines.append(f"- `{t['kind']}`: `{t['path']}` @ `{t['sha'][:12]}`{' (dirty)' if t['dirty'] else ''}")
    versions = meta.get("versions") or {}
    if versions:
        lines.append("- stack: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v != "not installed"))
    lines += ["", "| verdict | case | failing check | key numbers |" if verdicts else "| status | case | failing check | key numbers |",
              "|---|---|---|---|"]
    order = {"REGRESSED": 0, "STILL-FAILING": 1, "FIXED": 2, "PASS": 3}
    rows = sorted(results, key=lambda r: (order.get((verdicts or {}).get(r.case_id, ""), 4), r.status == "pass", r.case_id))
    for r in rows:
        first = next((c for c in r.checks if not c.passed), None)
        failing = f"`{first.name}`: {_clip(first.summary, 120)}" if first else (
            _clip((r.error.strip().splitlines() or [""])[0], 120) if r.error else "")
        label = (verdicts or {}).get(r.case_id, r.status.upper())
        lines.append(f"| {label} | `{r.case_id}` | {failing.replace('|', '¦')} | {key_numbers(r).replace('|', '¦')} |")
    return "\n".join(lines) + "\n"


def key_numbers(result) -> str:
    """The one or two numbers that say how close a case was."""
    bits = []
    for check in result.checks:
        m = check.metrics
        if check.name == "tensors" and "compared" in m:
            bits.append(f"{m['compared'] - m['mismatched']}/{m['compared']} equal")
        elif check.name.endswith("key-contract") and "model_keys" in m:
            bits.append(f"{check.name.removesuffix('-key-contract')} {m['model_keys']}+{m['optimizer_keys']} keys")
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
        elif r.status in ("error", "timeout", "invalid"):
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
