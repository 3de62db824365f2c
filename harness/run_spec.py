"""What one run is: the cases, the lane, the trees under test, the seeded faults, where ranks go.

Every entry point (``harness run`` / ``matrix`` / ``gate`` / ``bisect-step`` / ``selftest`` /
``mutants``, the pytest plugin) builds one ``RunSpec``; the run service, the launcher and the
ranks read that same object. The ranks get it through the run plan (``run_dir.Plan``: the spec
with the launch's own cases, plus the launch's group, folder and collective timeout), as JSON
data, whole ``Case`` objects included, so a rank never expands ``cases/`` itself. What
``results.json`` records as ``meta`` is built from it in one place (``run_service.RunMeta.of``).

Bottom floor: shared vocabulary, importing only ``harness.matrix`` and ``harness.workspace``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from harness import workspace
from harness.matrix import lanes
from harness.matrix.cases import Case


@dataclass(frozen=True)
class SourceTree:
    """A Megatron-LM or Megatron-Bridge source checkout a run tests instead of the installed
    package (``harness.execution.source_trees`` finds and checks them)."""

    kind: str  # "megatron-lm" | "megatron-bridge"
    path: str
    import_root: str  # the entry to put on PYTHONPATH
    sha: str
    dirty: bool
    # For the 3rdparty/Megatron-LM of a Bridge checkout: the commit the Bridge's HEAD pins there
    # (its gitlink), which a user may have moved the submodule away from. "" otherwise.
    pinned_by_bridge: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def description(self) -> str:
        """One line for logs and reports: kind, SHA, dirty, and a submodule moved off its pin."""
        moved = (f", Bridge pins {self.pinned_by_bridge[:12]}"
                 if self.pinned_by_bridge and self.pinned_by_bridge != self.sha else "")
        return f"{self.kind} {self.sha[:12]}{' (dirty)' if self.dirty else ''}{moved}"


@dataclass(frozen=True)
class RunSpec:
    """One run: what to run and how. A launch runs the same spec with its share of the cases
    (``with_cases``)."""

    cases: list[Case] = field(default_factory=list)
    lane: str = lanes.CPU
    label: str = "run"  # the run folder's name ends with it
    faults: list[str] = field(default_factory=list)  # seeded regressions, applied by fault_provider
    # The module that applies ``faults`` in the ranks, by name (e.g. "harness.regression.faults"):
    # its ``active(specs, case_id)`` is a context manager around each case. The worker imports it
    # only when there are faults, so execution never imports the floor that owns them.
    fault_provider: str = ""
    source_trees: list[SourceTree] = field(default_factory=list)  # ahead of the installed wheels
    cases_dir: Path = workspace.CASES_DIR  # the case files the cases were selected from (coverage)
    placement: lanes.Placement = field(default_factory=lanes.Placement)  # GPU lane: ranks per GPU
    jobs: int = 1  # concurrent launches per world size (harness.execution.rank_launcher)
    # Folders whose executed lines each case records (harness.execution.case_coverage): the
    # mutants' baseline traces its Bridge copy. Empty: nothing is traced.
    line_coverage: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.faults and not self.fault_provider:
            raise ValueError(f"faults {self.faults} without a fault_provider module to apply them")

    def with_cases(self, cases: Iterable[Case]) -> "RunSpec":
        return replace(self, cases=list(cases))

    def to_dict(self) -> dict[str, Any]:
        return {"cases": [c.to_dict() for c in self.cases], "lane": self.lane, "label": self.label,
                "faults": list(self.faults), "fault_provider": self.fault_provider,
                "source_trees": [t.to_dict() for t in self.source_trees], "cases_dir": str(self.cases_dir),
                "placement": asdict(self.placement), "jobs": self.jobs, "line_coverage": list(self.line_coverage)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        return cls(cases=[Case.from_dict(c) for c in data.get("cases", [])], lane=data["lane"],
                   label=data.get("label", "run"), faults=list(data.get("faults", [])),
                   fault_provider=data.get("fault_provider", ""),
                   source_trees=[SourceTree(**t) for t in data.get("source_trees", [])],
                   cases_dir=Path(data.get("cases_dir", workspace.CASES_DIR)),
                   placement=lanes.Placement(**data.get("placement", {})), jobs=data.get("jobs", 1),
                   line_coverage=tuple(data.get("line_coverage", ())))
