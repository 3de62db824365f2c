"""`harness coverage`: one row per registered architecture, none silently absent, and each lane's
status says what the outcomes say (a failure golden does not pin is red, a pinned one is known)."""

from __future__ import annotations

import pytest

from harness.matrix import bridge_registry, cases, family_registry, model_spec
from harness.reporting import architecture_table
from harness.results import CaseResult
from harness.matrix import lanes

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def case_set():
    return cases.load_cases()


def row(rows, arch):
    return next(r for r in rows if r.architecture == arch)


def lane(r, name):
    return next(s for s in r.lanes if s.lane == name)


def test_every_registered_architecture_has_a_row(case_set):
    rows = architecture_table.coverage(case_set, {})
    assert [r.architecture for r in rows] == [a.architecture for a in bridge_registry.registered_architectures()]
    covered = {r.family for r in rows if r.family}
    assert covered == set(family_registry.families())
    for r in rows:
        if not r.family:
            assert all(s.status == architecture_table.NOT_COVERED and s.detail for s in r.lanes), r
    md = architecture_table.markdown(rows)
    assert all(f"`{a.architecture}`" in md for a in bridge_registry.registered_architectures())


def test_lane_status_follows_the_outcomes(case_set):
    llama = [c.id for c in case_set.cases
             if c.model.family == "llama" and "cpu" in c.lanes and not c.invalid_reason and c.builds_model]
    passing = {cid: architecture_table.Outcome("pass") for cid in llama}
    rows = architecture_table.coverage(case_set, {"cpu": passing})
    s = lane(row(rows, "LlamaForCausalLM"), "cpu")
    assert (s.status, s.passed, s.cases) == (architecture_table.COVERED_PASS, len(llama), len(llama))

    pinned = dict(passing, **{llama[0]: architecture_table.Outcome("fail", "megatron-bridge 0.6.2")})
    s = lane(row(architecture_table.coverage(case_set, {"cpu": pinned}), "LlamaForCausalLM"), "cpu")
    assert s.status == architecture_table.KNOWN and s.known == 1 and "megatron-bridge 0.6.2" in s.text

    broken = dict(pinned, **{llama[1]: architecture_table.Outcome("error")})
    s = lane(row(architecture_table.coverage(case_set, {"cpu": broken}), "LlamaForCausalLM"), "cpu")
    assert s.status == architecture_table.FAILING and s.failing == 1 and s.status in architecture_table.RED

    gpu = lane(row(rows, "LlamaForCausalLM"), "gpu")
    assert gpu.status == architecture_table.NOT_RUN and gpu.cases > 0  # no GPU golden yet: not a pass


def test_a_family_no_lane_can_build_says_why(case_set):
    rows = architecture_table.coverage(case_set, {})
    nemotron_h = row(rows, "NemotronHForCausalLM")
    assert all(s.status == architecture_table.CANNOT_RUN and "mamba-ssm" in s.detail for s in nemotron_h.lanes)
    dsv4 = row(rows, "DeepseekV4ForCausalLM")
    assert all(s.status == architecture_table.CANNOT_RUN and "dsv4_hybrid" in s.detail for s in dsv4.lanes)


def test_a_run_failure_counts_as_known_only_when_it_is_exactly_what_golden_pins(tmp_path, monkeypatch, case_set):
    from harness.regression import golden
    from harness.results import CheckResult

    monkeypatch.setenv("HARNESS_GOLDEN", str(tmp_path))
    failed = CaseResult("llama/tp1/memory/roundtrip", "fail", lane="cpu",
                        checks=[CheckResult("tensors", False, "1/21 differ")])
    golden.write(failed, {}, root=tmp_path)
    assert architecture_table.run_outcomes([failed])[failed.case_id].known_upstream == ""  # no known_failures.yaml here
    (tmp_path / golden.KNOWN_FAILURES).write_text(
        "failures:\n  - cases: ['llama/tp1/*']\n    lanes: [cpu]\n    checks: [tensors]\n    upstream: bridge 9\n"
        "    diagnosis: >-\n      seeded\n")
    golden.write(failed, {}, root=tmp_path)
    assert architecture_table.run_outcomes([failed])[failed.case_id].known_upstream == "bridge 9"
    crashed = CaseResult("llama/tp1/memory/roundtrip", "error", lane="cpu", error="RuntimeError: new")
    assert architecture_table.run_outcomes([crashed])[crashed.case_id].known_upstream == ""  # fails another way: red


def test_the_summary_of_every_run_has_the_coverage_section(tmp_path):
    from harness.execution.run_dir import RunDir
    from harness.reporting import run_report

    run = RunDir.create("cov", root=tmp_path)
    run_report.write_run(run, [CaseResult("llama/tp1/memory/roundtrip", "pass", lane="cpu")], {"label": "cov"})
    text = run.summary_file.read_text()
    assert "<summary>Coverage:" in text and "`NemotronHForCausalLM`" in text


def test_a_megatron_core_gap_blocks_until_the_feature_exists(tmp_path, monkeypatch):
    spec = model_spec.ModelSpec("deepseek-v4")
    assert "dsv4_hybrid" in lanes.model_blocker(spec, "gpu")
    tree = tmp_path / "Megatron-LM"
    file = tree / "megatron" / "core" / "models" / "gpt" / "experimental_attention_variant_module_specs.py"
    file.parent.mkdir(parents=True)
    file.write_text('VARIANTS = ("gated_delta_net", "dsa", "dsv4_hybrid")\n')
    monkeypatch.setenv("HARNESS_MEGATRON_LM", str(tree))
    assert lanes.model_blocker(spec, "gpu") == ""  # the bump brought the feature: the cases run again


def test_the_case_classes_a_family_fills_are_listed(case_set):
    rows = architecture_table.coverage(case_set, {})
    llama = row(rows, "LlamaForCausalLM")
    assert {"switches", "pipeline", "config-export", "repeated-export"} <= set(llama.classes)
    assert "switches" not in row(rows, "NemotronForCausalLM").classes
    assert "case classes" in architecture_table.markdown(rows)
