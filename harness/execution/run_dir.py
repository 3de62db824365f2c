"""One run folder under ``reports/``: its layout, and the typed records that cross the process
boundary through it. This module is the only code that knows where a file of a run lives.

Layout of one run (``reports/<UTC timestamp>-<label>/``)::

    results.json             run summary + every case result (see harness.reporting.run_report)
    junit.xml, summary.md    the same for CI test reporting and PR comments
    plans/<group>.json       what one launch of a rank group runs (``Plan``), read by every rank
    progress/<group>/rank<R>.jsonl
                             one ``ProgressEvent`` per line, so the launcher knows which case a
                             hung or dead rank of that launch was in, and since when
    cases/<slug>.json        one case result each, written atomically by rank 0 when the case ends
    cases/<slug>.rank<R>.err a non-zero rank's traceback when it failed alone
    logs/<group>/rank<R>.log this rank's stdout and stderr; launcher.log: torchrun's own output
    provenance/<group>.json  where each rank group imported Megatron from, and the versions
    coverage/<group>.rank<R>.json
                             with ``RunSpec.line_coverage`` only: what of the Bridge each case
                             ran (``CaseCoverage``), for ``harness mutants``
    scratch/<slug>/          the case's checkpoints (kept when it fails, for debugging)

``reports/latest`` points at the newest finished run (a symlink, replaced atomically).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from harness import workspace
from harness.matrix.cases import Case
from harness.results import CaseResult
from harness.run_spec import RunSpec

RESULTS_NAME = "results.json"
# A rank that recorded its case error exits with this code (it may leave peers blocked in a
# collective); any other non-zero exit is a rank that died on its own.
EXIT_CASE_ERROR = 3
LATEST = "latest"


@dataclass(frozen=True)
class CaseCoverage:
    """What of the traced source one case ran on one rank (``harness.execution.case_coverage``)."""

    case_id: str
    lines: dict[str, list[int]]  # file, relative to its traced root -> the lines executed
    resolved: list[str]  # Megatron names the Bridge's mapping registry resolved

    def merged(self, other: "CaseCoverage") -> "CaseCoverage":
        """The union over ranks (a pipeline stage runs only its own layers' code)."""
        lines = {f: sorted(set(self.lines.get(f, [])) | set(other.lines.get(f, []))) for f in {*self.lines, *other.lines}}
        return CaseCoverage(self.case_id, dict(sorted(lines.items())), sorted({*self.resolved, *other.resolved}))


@dataclass(frozen=True)
class Plan:
    """What one launch of a rank group runs: written by the launcher, read by every rank. The
    run's ``RunSpec`` with this launch's cases (whole ``Case`` objects: a rank never reads
    ``cases/``), and what only this launch has."""

    spec: RunSpec
    run_dir: str
    group: str  # "ws<world size>-<attempt>", or "ws<world size>j<job>-<attempt>" with concurrent launches
    collective_timeout_s: float = 360.0

    @property
    def case_ids(self) -> list[str]:
        return [c.id for c in self.spec.cases]

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "group": self.group, "collective_timeout_s": self.collective_timeout_s,
                "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls(spec=RunSpec.from_dict(data["spec"]), run_dir=data["run_dir"], group=data["group"],
                   collective_timeout_s=data.get("collective_timeout_s", 360.0))


@dataclass(frozen=True)
class ProgressEvent:
    """A rank started or ended a case (wall-clock ``t``)."""

    case: str
    event: str  # "start" | "end"
    t: float
    rank: int = 0

    START, END = "start", "end"


class RunDir:
    """A run folder; every path inside it comes from here."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(cls, label: str, root: Path | None = None) -> "RunDir":
        """A fresh, never-reused run folder; an existing folder is never written into (two runs
        on one machine get two folders, whatever their timing)."""
        root = root or workspace.reports_root()
        root.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        for n in range(1000):
            name = f"{stamp}-{safe}" + (f"-{n}" if n else "")
            try:
                (root / name).mkdir()
                return cls(root / name)
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a run folder under {root}")

    def point_latest(self) -> None:
        """``<root>/latest`` -> this run, replaced atomically (a reader sees the old or the new)."""
        link = self.path.parent / LATEST
        tmp = self.path.parent / f".{LATEST}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.path.name)
        os.replace(tmp, link)

    # -- run-level files --------------------------------------------------------------------

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_NAME

    @property
    def junit_file(self) -> Path:
        return self.path / "junit.xml"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.md"

    # -- plans ------------------------------------------------------------------------------

    def plan_file(self, group: str) -> Path:
        return self.path / "plans" / f"{group}.json"

    def write_plan(self, plan: Plan) -> Path:
        path = self.plan_file(plan.group)
        workspace.atomic_write_json(path, plan.to_dict())
        return path

    @staticmethod
    def read_plan(path: Path) -> Plan:
        return Plan.from_dict(json.loads(Path(path).read_text()))

    def launches(self) -> dict[str, list[str]]:
        """group -> the IDs of the cases its plan gave it, for every launch of this run (the plans
        of runs from before ``RunSpec`` listed the IDs themselves)."""
        out = {}
        for file in sorted(self.plan_file("*").parent.glob("*.json")):
            data = json.loads(file.read_text())
            cases = data["spec"]["cases"] if "spec" in data else data.get("cases", [])
            out[data["group"]] = [c if isinstance(c, str) else Case.from_dict(c).id for c in cases]
        return out

    # -- progress ---------------------------------------------------------------------------

    def progress_file(self, group: str, rank: int) -> Path:
        return self.path / "progress" / group / f"rank{rank}.jsonl"

    def append_progress(self, group: str, event: ProgressEvent) -> None:
        """One line, flushed and fsynced: the launcher reads it while the rank runs. One file per
        launch and rank, so concurrent launches never write into the same file."""
        file = self.progress_file(group, event.rank)
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "a") as fh:
            fh.write(json.dumps(asdict(event)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def progress(self, group: str, ranks: int) -> Iterator[ProgressEvent]:
        """Every complete progress line of ranks 0..ranks-1 of one launch (a line being written is skipped)."""
        for rank in range(ranks):
            file = self.progress_file(group, rank)
            if not file.exists():
                continue
            for line in file.read_text().splitlines():
                try:
                    yield ProgressEvent(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue

    # -- case results -----------------------------------------------------------------------

    def case_result_file(self, case_id: str) -> Path:
        return self.path / "cases" / f"{workspace.slug(case_id)}.json"

    def write_case_result(self, result: CaseResult) -> None:
        workspace.atomic_write_json(self.case_result_file(result.case_id), result.to_dict())

    def read_case_result(self, case_id: str) -> CaseResult | None:
        file = self.case_result_file(case_id)
        if not file.exists():
            return None
        return CaseResult.from_dict(json.loads(file.read_text()))

    def write_rank_error(self, case_id: str, rank: int, text: str, cause: str = "") -> None:
        """A non-zero rank's own error in a case, and its ``CaseResult.cause`` when it has one."""
        workspace.atomic_write_text(self.path / "cases" / f"{workspace.slug(case_id)}.rank{rank}.err", text)
        if cause:
            workspace.atomic_write_text(self._rank_cause_file(case_id, rank), cause)

    def rank_error_cause(self, case_id: str, rank: int) -> str:
        """The cause a non-zero rank recorded with its error in a case ('' if none)."""
        file = self._rank_cause_file(case_id, rank)
        return file.read_text() if file.exists() else ""

    def _rank_cause_file(self, case_id: str, rank: int) -> Path:
        return self.path / "cases" / f"{workspace.slug(case_id)}.rank{rank}.cause"

    def rank_errors(self, case_id: str) -> list[tuple[int, str]]:
        """``(rank, traceback)`` of every non-zero rank that recorded its own error in a case."""
        out = []
        for file in sorted((self.path / "cases").glob(f"{workspace.slug(case_id)}.rank*.err")):
            rank = int(file.name.rsplit(".rank", 1)[1].removesuffix(".err"))
            out.append((rank, file.read_text()))
        return out

    # -- logs -------------------------------------------------------------------------------

    def log_dir(self, group: str) -> Path:
        return self.path / "logs" / group

    def rank_log(self, group: str, rank: int) -> Path:
        return self.log_dir(group) / f"rank{rank}.log"

    def write_rank_process_group(self, group: str, rank: int, pgid: int) -> None:
        """torchrun starts each rank in a session of its own, so what a rank leaves behind is in
        the rank's process group, not the launch's: the launcher reads these to reap them."""
        workspace.atomic_write_text(self.log_dir(group) / f"rank{rank}.pgid", str(pgid))

    def rank_process_groups(self, group: str) -> list[int]:
        texts = (f.read_text().strip() for f in self.log_dir(group).glob("rank*.pgid"))
        return sorted(int(text) for text in texts if text)

    def launcher_log(self, group: str) -> Path:
        return self.log_dir(group) / "launcher.log"

    def log_tail(self, group: str, lines: int = 40) -> str:
        """The last ``lines`` of every log of a launch, each under its file name."""
        chunks = []
        for log in sorted(self.log_dir(group).glob("*.log")):
            text = log.read_text(errors="replace").splitlines()
            if text:
                chunks.append(f"==> {log.name} <==\n" + "\n".join(text[-lines:]))
        return "\n".join(chunks)

    # -- scratch and provenance -------------------------------------------------------------

    def scratch(self, case_id: str) -> Path:
        return self.path / "scratch" / workspace.slug(case_id)

    def provenance_file(self, group: str) -> Path:
        return self.path / "provenance" / f"{group}.json"

    def write_provenance(self, group: str, doc: dict[str, Any]) -> None:
        workspace.atomic_write_json(self.provenance_file(group), doc)

    def coverage_file(self, group: str, rank: int) -> Path:
        return self.path / "coverage" / f"{group}.rank{rank}.json"

    def write_coverage(self, group: str, rank: int, records: list[CaseCoverage]) -> None:
        workspace.atomic_write_json(self.coverage_file(group, rank), [asdict(r) for r in records])

    def coverage(self) -> dict[str, CaseCoverage]:
        """case ID -> what it ran, merged over the ranks and launches of this run."""
        out: dict[str, CaseCoverage] = {}
        for file in sorted((self.path / "coverage").glob("*.json")):
            for record in (CaseCoverage(**r) for r in json.loads(file.read_text())):
                out[record.case_id] = out[record.case_id].merged(record) if record.case_id in out else record
        return out

    def provenance(self) -> dict[str, dict[str, Any]]:
        """group -> provenance document, for every launch of this run."""
        folder = self.path / "provenance"
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
