"""The case matrix as pytest tests: one test ID per (lane, case), run in amortised groups.

Loaded by the repository's top-level ``conftest.py``, and by the ``pytest11`` entry point of an
installed harness, so ``pytest -m gpu`` or ``pytest -m cpu -k llama/tp1/memory`` work from the
repository root, and ``pytest --pyargs harness.pytest_matrix`` runs the matrix from another tree
(a Megatron-Bridge checkout that installs this package).

Collection parametrizes ``matrix_case`` from ``cases/*.yaml`` with marks ``cpu``/``gpu`` (lane)
and ``slow`` (cases only in the full, nightly set). Running is lazy and grouped: the first test of
a (lane, world size) group runs *every selected test of that group* through the same service as
the CLI (``harness.execution.run_service``), so ``-k``/``-m`` selections still pay the import cost once
per group and every group leaves a complete run folder. Under pytest-xdist, ``xdist_group`` marks
keep a group on one worker (``--dist loadgroup``). ``--ranks-per-gpu N`` and ``--harness-jobs N``
(``add_options``) are the CLI's ``--ranks-per-gpu`` and ``--jobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from harness.errors import InputError
from harness.execution import run_service
from harness.matrix.cases import Case, CaseSet, load_cases_once
from harness.reporting import run_report
from harness.results import CaseResult
from harness.run_spec import RunSpec
from harness.matrix import lanes

PARAM = "matrix_case"


MARKERS = (
    "cpu: runs on the CPU lane (gloo; the TE spec with CPU forwards); part of CI",
    "gpu: needs CUDA GPUs (nccl, TE, Megatron-FSDP); skipped with a reason where there are none",
    "slow: long-running (the full, nightly set); excluded from the default CI selection with -m 'not slow'",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness")
    group.addoption("--ranks-per-gpu", type=int, default=1, metavar="N",
                    help="GPU lane: N ranks share each GPU (gloo with CUDA tensors when N > 1; lanes.Placement)")
    group.addoption("--harness-jobs", type=int, default=1, metavar="N",
                    help="run up to N launches of one world size at once")


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:  # registered here too, for a tree whose own pytest config lacks them
        config.addinivalue_line("markers", marker)
    placement(config)  # a wrong --ranks-per-gpu is a usage error before collection
    if config.getoption("--harness-jobs", 1) < 1:
        raise pytest.UsageError(f"--harness-jobs must be at least 1, not {config.getoption('--harness-jobs')}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if PARAM in metafunc.fixturenames:
        metafunc.parametrize(PARAM, params(load_cases_once()))


@pytest.fixture(scope="session")
def matrix_runner(request: pytest.FixtureRequest) -> "MatrixRunner":
    return MatrixRunner(session=request.session)


def placement(config: pytest.Config) -> lanes.Placement:
    try:
        return lanes.placement(config.getoption("--ranks-per-gpu", 1), lanes.GPU)
    except InputError as err:
        raise pytest.UsageError(str(err)) from None


def params(case_set: CaseSet) -> list:
    out = []
    for case in case_set.cases:
        for lane in case.lanes:
            marks = [getattr(pytest.mark, lane), pytest.mark.xdist_group(f"{lane}-ws{case.world_size}")]
            if "default" not in case.sets:
                marks.append(pytest.mark.slow)
            out.append(pytest.param((lane, case.id), id=f"{lane}-{case.id}", marks=marks))
    return out


@dataclass
class MatrixRunner:
    """Runs selected matrix cases group by group and remembers the results."""

    session: pytest.Session
    case_set: CaseSet = field(default_factory=load_cases_once)
    results: dict[tuple[str, str], CaseResult] = field(default_factory=dict)
    runs: dict[tuple[str, int], run_service.RunOutcome] = field(default_factory=dict)

    def selected(self) -> list[tuple[str, str]]:
        out = []
        for item in self.session.items:
            callspec = getattr(item, "callspec", None)
            if callspec is not None and PARAM in callspec.params:
                out.append(callspec.params[PARAM])
        return out

    def skip_reason(self, lane: str, case_id: str) -> str:
        """Why this machine cannot run the case (e.g. the GPU lane without enough GPUs)."""
        return run_service.not_runnable_here(self.case_set.get(case_id), lane, placement=placement(self.session.config))

    def result(self, lane: str, case_id: str) -> CaseResult:
        key = (lane, case_id)
        if key not in self.results:
            self._run_group(lane, self.case_set.get(case_id).world_size)
        return self.results[key]

    def _run_group(self, lane: str, world_size: int) -> None:
        group: list[Case] = []
        for sel_lane, case_id in self.selected():
            case = self.case_set.get(case_id)
            if (sel_lane == lane and case.world_size == world_size and not case.invalid_reason
                    and (lane, case_id) not in self.results):
                group.append(case)
        config = self.session.config
        spec = RunSpec(cases=group, lane=lane, label=f"pytest-{lane}-ws{world_size}",
                       placement=placement(config) if lane == lanes.GPU else lanes.Placement(),
                       jobs=config.getoption("--harness-jobs", 1))
        outcome = run_service.run_selection(spec, stream=None)
        run_report.write_outcome(outcome)
        self.runs[(lane, world_size)] = outcome
        for result in outcome.results:
            self.results[(lane, result.case_id)] = result


def explain(result: CaseResult) -> str:
    """The failure message pytest shows: the check table plus any error text."""
    lines = [f"{result.case_id}: {result.status.upper()}", run_report.check_table(result) if result.checks else ""]
    if result.error:
        lines.append(result.error.rstrip())
    return "\n".join(line for line in lines if line)
