"""One run, one shape (issue 22): ``RunSpec`` carries whole cases from the entry point to the ranks,
as JSON data, so a rank never expands ``cases/``; the matrix is expanded once per process; the run
document's ``meta`` keeps its keys."""

from __future__ import annotations

import contextlib
import json
import textwrap
from pathlib import Path

import pytest

from harness.execution import rank_worker, run_service
from harness.execution.run_dir import Plan, RunDir
from harness.matrix import cases
from harness.matrix.cases import Case, load_cases, load_cases_once
from harness.matrix.lanes import Placement
from harness.reporting import run_report
from harness.results import PASS, CaseResult
from harness.run_spec import RunSpec, SourceTree

pytestmark = pytest.mark.cpu

# Case-file variants (a nested mapping among the overrides), a zoo variant, a reshard (load_layout)
# with its own timeout and set, a declared-invalid layout.
CASES = """
    matrix:
      - families: [llama]
        variants:
          mqa: {num_key_value_heads: 1}
        layouts: [tp1]
        paths: [memory/roundtrip]
      - families: [gpt-oss]
        variants:
          yarn2:
            rope_parameters: {rope_type: yarn, rope_theta: 150000.0, factor: 2.0, beta_fast: 32.0, beta_slow: 1.0,
                              original_max_position_embeddings: 64, truncate: false}
        layouts: [tp1]
        paths: [memory/roundtrip]
        sets: [full]
      - families: [llama@bf16]
        layouts: [tp2]
        paths: [torch_dist/roundtrip]
      - families: [llama]
        layouts: [tp2-to-tp1]
        paths: [torch_dist/reshard]
        timeout_s: 120
      - families: [llama]
        layouts: [tp1-pp4]
        paths: [memory/roundtrip]
        expect: invalid
"""


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "cases"
    d.mkdir()
    (d / "c.yaml").write_text(textwrap.dedent(CASES))
    return d


def through_json(data):
    return json.loads(json.dumps(data))


def test_a_case_round_trips_through_json_whole(folder):
    expanded = load_cases(folder).cases
    selection = expanded + [expanded[0].tagged("gate-up-swapped")]
    assert {c.model.id for c in selection} >= {"llama@mqa", "gpt-oss@yarn2", "llama@bf16"}
    assert any(c.load_layout is not None for c in selection) and any(c.invalid_reason for c in selection)
    for case in selection:
        back = Case.from_dict(through_json(case.to_dict()))
        assert back == case, case.id
        assert (back.id, back.model.hf_config, back.world_size, back.lanes) == (
            case.id, case.model.hf_config, case.world_size, case.lanes)
    yarn = next(c for c in selection if c.model.id == "gpt-oss@yarn2")
    assert dict(Case.from_dict(through_json(yarn.to_dict())).model.overrides)["rope_parameters"]["factor"] == 2.0


def test_every_case_of_the_repository_round_trips(case_set):
    assert [Case.from_dict(through_json(c.to_dict())) for c in case_set.cases] == case_set.cases


def test_a_run_spec_round_trips_with_its_trees_faults_and_placement(folder):
    tree = SourceTree(kind="megatron-lm", path="/src/lm", import_root="/src/lm", sha="a" * 40, dirty=True)
    spec = RunSpec(cases=load_cases(folder).cases, lane="gpu", label="x", faults=["gate-up-swapped@*"],
                   fault_provider="harness.regression.faults", source_trees=[tree], cases_dir=folder,
                   placement=Placement(2), jobs=3)
    assert RunSpec.from_dict(through_json(spec.to_dict())) == spec
    with pytest.raises(ValueError, match="fault_provider"):
        RunSpec(faults=["gate-up-swapped"])


class FakeRunner:
    """Stands in for ``harness.conversion.case_executor``: records the cases it is given."""

    def __init__(self):
        self.seen: list[Case] = []

    def run_case(self, case, runtime, workdir):
        self.seen.append(case)
        return CaseResult(case_id=case.id, status=PASS)

    def error_result(self, case, exc, started, lane):  # pragma: no cover - no case fails here
        raise AssertionError(f"{case.id} failed: {exc!r}")


def test_the_worker_runs_the_plans_cases_without_parsing_cases(folder, tmp_path, monkeypatch):
    selected = [c for c in load_cases(folder).cases if not c.invalid_reason]
    selected.append(selected[0].tagged("tagged"))
    run = RunDir(tmp_path / "run")
    path = run.write_plan(Plan(spec=RunSpec(cases=selected, cases_dir=folder), run_dir=str(run.path), group="ws1-1"))

    def parsed(*_args, **_kwargs):
        raise AssertionError("the worker expanded cases/")

    for name in ("load_cases", "load_cases_once", "load_file", "expand_entry"):
        monkeypatch.setattr(cases, name, parsed)
    (folder / "c.yaml").unlink()  # nothing left to parse either
    plan = RunDir.read_plan(path)
    assert plan.case_ids == [c.id for c in selected]
    runner = FakeRunner()
    assert rank_worker.run_plan(plan, RunDir(plan.run_dir), runner, contextlib.nullcontext()) == 0
    assert runner.seen == selected, "the worker ran the cases the launcher planned, whole"
    assert [run.read_case_result(c.id).status for c in selected] == [PASS] * len(selected)
    assert run.launches() == {"ws1-1": [c.id for c in selected]}


def test_an_old_plan_still_names_its_launchs_cases(tmp_path):
    run = RunDir(tmp_path)
    run.plan_file("ws1-1").parent.mkdir(parents=True)
    run.plan_file("ws1-1").write_text(json.dumps({"run_dir": str(tmp_path), "group": "ws1-1", "lane": "cpu",
                                                  "cases": ["llama/tp1/memory/roundtrip"], "cases_dir": "cases"}))
    assert run.launches() == {"ws1-1": ["llama/tp1/memory/roundtrip"]}


def test_the_matrix_is_expanded_once_per_process(folder, monkeypatch):
    calls = []
    expand = cases.load_cases

    def counted(directory=None):
        calls.append(directory)
        return expand(directory)

    monkeypatch.setattr(cases, "load_cases", counted)
    first = load_cases_once(folder)
    assert load_cases_once(folder).ids() == first.ids() and len(calls) == 1
    meta = {"cases_dir": str(folder)}
    run_report.coverage_section([], meta)
    run_report.coverage_section([], meta)
    assert len(calls) == 1, "the run's summary reuses the selection's expansion"
    (folder / "c.yaml").write_text(textwrap.dedent(CASES))  # written again, the same text
    load_cases_once(folder)
    assert len(calls) == 1, "same text, same expansion"
    (folder / "d.yaml").write_text("matrix:\n  - families: [qwen2]\n    layouts: [tp1]\n    paths: [memory/roundtrip]\n")
    assert "qwen2/tp1/memory/roundtrip" in load_cases_once(folder).ids() and len(calls) == 2, "an edit expands again"


def test_the_run_documents_meta_keeps_its_keys(folder):
    spec = RunSpec(cases=load_cases(folder).cases, label="m", placement=Placement(2), jobs=2, cases_dir=folder)
    meta = run_service.RunMeta.of(spec).to_dict()
    assert list(meta) == ["label", "lane", "command", "started_utc", "host", "python", "injected_faults",
                          "source_trees", "ranks_per_gpu", "jobs", "versions", "cases_dir", "wall_s", "not_tested"]
    assert (meta["label"], meta["lane"], meta["ranks_per_gpu"], meta["jobs"], meta["cases_dir"]) == (
        "m", "cpu", 2, 2, str(folder))
