"""Root causes: one bug is one row. 22 REGRESSED cases failing the same way (same check, same first
tensor modulo its layer index, different numbers) plus 2 crashing with one exception are 2 causes,
and the gate table, summary.md and index.html lead with them. summary.md is the PR comment: its
structure, whole numbers and GitHub's comment limit. Results are synthetic, built in-process."""

from __future__ import annotations

import dataclasses
import re
from unittest import mock

import pytest

from harness.execution.run_dir import RunDir
from harness.run_spec import SourceTree
from harness.regression import gate, root_causes
from harness.reporting import run_report
from harness.reporting.html import rendering, run_page
from harness.results import CaseResult, CheckResult, TensorSetComparison

pytestmark = pytest.mark.cpu

MAPPING_BUG = "decoder.layers.{}.mlp.linear_fc1.weight"
# 22 cases of one mapping bug: 5 families (one a variant) x layouts x paths.
MODELS = ("llama", "qwen2", "qwen3", "mistral", "llama@padded")
LAYOUTS = {"tp1": 1, "tp2": 2, "tp2-pp2": 4, "pp2": 2, "tp2-to-tp1": 2}
PATHS = ("memory/roundtrip", "torch_dist/roundtrip")
CRASH = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
         "ValueError: rank {rank}: expected shape (4, {n}), got ({n}, 4) at /tmp/run-{rank}/ckpt")
LONG_NUMBER = "0.00012345678912345678"
REPRESENTATIVE = "llama@padded/tp1/memory/roundtrip"


def tensor_failure(case_id: str, layer: int, differing: int, max_abs: float, world_size: int, duration_s: float,
                   check: str = "tensors", key: str = MAPPING_BUG) -> CaseResult:
    """A case failing the way a mapping bug fails: one exported tensor's values differ."""
    comparison = TensorSetComparison(compared=120, rows=[
        {"key": "embedding.word_embeddings.weight", "shape": [256, 64], "dtype": "float32", "max_abs_diff": 0.0,
         "status": "ok"},
        {"key": key.format(layer), "shape": [256, 64], "dtype": "float32", "max_abs_diff": max_abs,
         "status": f"values differ in {differing}/16384 elements"}])
    return CaseResult(case_id, "fail", checks=[comparison.check(check), CheckResult("logits-hf-vs-megatron", True, "ok")],
                      world_size=world_size, duration_s=duration_s)


def crash(case_id: str, rank: int, n: int, kind: str = "ValueError") -> CaseResult:
    return CaseResult(case_id, "error", error=CRASH.format(rank=rank, n=n).replace("ValueError", kind),
                      world_size=2, duration_s=3.0)


def passing(case_id: str) -> CaseResult:
    return CaseResult(case_id, "pass", checks=[CheckResult("tensors", True, "120/120 tensors bitwise equal")])


def mapping_bug_cases() -> list[CaseResult]:
    """Every model at every layout, until 22: the first five (one per model) at tp1, one rank."""
    layouts = list(LAYOUTS)
    ids = []
    for i in range(22):
        layout = layouts[i // 5]
        ids.append(f"{MODELS[i % 5]}/{layout}/{'torch_dist/reshard' if '-to-' in layout else PATHS[i % 2]}")
    return [tensor_failure(case_id, layer=i % 4, differing=100 + i, max_abs=0.1 + i / 100,
                           world_size=LAYOUTS[case_id.split("/")[1]], duration_s=10.0 - i / 10)
            for i, case_id in enumerate(ids)]


def seeded_gate() -> tuple[list[CaseResult], list[gate.Verdict]]:
    """What the gate sees on a tree with one bad mapping commit and one bad shape commit: 22 + 2
    REGRESSED, a FIXED, a STILL-FAILING and a PASS."""
    regressed = mapping_bug_cases() + [crash("gemma/tp2/memory/roundtrip", rank=1, n=2),
                                       crash("phi3/tp2/torch_dist/roundtrip", rank=0, n=8)]
    fixed, still = passing("qwen3-moe/tp1/memory/roundtrip"), crash("gpt-oss/tp1/memory/roundtrip", 0, 2)
    results = regressed + [fixed, still, passing("llama/tp1/fsdp_dtensor/roundtrip")]
    baseline_pass, baseline_fail = passing("x/tp1/memory/roundtrip"), CaseResult("x/tp1/memory/roundtrip", "fail")
    verdicts = [gate.judge(r, None, baseline_fail if r in (fixed, still) else baseline_pass) for r in results]
    return results, verdicts


COVERAGE = "<details><summary>Coverage</summary>(every registered architecture)</details>"


@pytest.fixture(autouse=True)
def quick_coverage(monkeypatch):
    """summary.md ends with the coverage table (2 s to build from the zoo); these tests only need
    it to come last."""
    monkeypatch.setattr(run_report, "coverage_section", lambda results, meta: COVERAGE)


@pytest.fixture(scope="module")
def seeded():
    results, verdicts = seeded_gate()
    return results, verdicts, gate.regressed_causes(results, verdicts)


# ------------------------------------------------------------------------------ grouping


def test_one_mapping_bug_is_one_root_cause_and_one_exception_another(seeded):
    results, verdicts, causes = seeded
    assert [v.verdict for v in verdicts].count(gate.REGRESSED) == 24
    assert [c.count for c in causes] == [22, 2]
    bug, shape = causes
    assert (bug.verdict, bug.check, bug.tensor) == (gate.REGRESSED, "tensors", MAPPING_BUG.format("#"))
    assert bug.case_ids == tuple(r.case_id for r in mapping_bug_cases())
    assert bug.families == MODELS and bug.layouts == tuple(LAYOUTS)
    assert bug.paths == (*PATHS, "torch_dist/reshard")
    # The cheapest to rerun: fewest ranks (tp1), then the quickest of those.
    assert bug.representative == REPRESENTATIVE
    assert bug.rerun == f"harness run {REPRESENTATIVE} --lane cpu"
    assert bug.detail.startswith("1/120 differ (first: decoder.layers.")  # its own numbers, as measured
    assert bug.bisection is None and bug.commit_text == "not bisected"  # the gate attaches a bisection
    assert (shape.check, shape.tensor, shape.families, shape.layouts) == ("ValueError", "", ("gemma", "phi3"), ("tp2",))
    assert shape.representative == "gemma/tp2/memory/roundtrip"
    assert shape.detail == "ValueError: rank 1: expected shape (4, 2), got (2, 4) at /tmp/run-1/ckpt"


def test_only_regressed_cases_are_grouped_and_reruns_name_the_candidate_trees(seeded):
    results, verdicts, _ = seeded
    tree = SourceTree("megatron-lm", "/src/Megatron LM", "/src/Megatron LM", "a" * 40, False)
    causes = gate.regressed_causes(results, verdicts, [tree])
    grouped = {case_id for c in causes for case_id in c.case_ids}
    assert "qwen3-moe/tp1/memory/roundtrip" not in grouped and "gpt-oss/tp1/memory/roundtrip" not in grouped
    assert causes[0].rerun.endswith("--lane cpu --megatron-lm '/src/Megatron LM'")  # shell-quoted


def sig(result: CaseResult, reasons=()) -> str:
    return root_causes.signature(result, reasons).text


@pytest.mark.parametrize("a,b", [
    # layer index, element counts, max|d|
    (tensor_failure("a/tp1/m/r", 0, 10, 0.37, 1, 1), tensor_failure("b/tp2/m/r", 11, 999, 0.21, 2, 1)),
    # rank, shapes, paths
    (crash("a/tp1/m/r", rank=1, n=2), crash("b/tp1/m/r", rank=0, n=16)),
    # a rank that died without raising, whichever rank and code
    (CaseResult("a/tp2/m/r", "error", error="rank 1 exited with code 3 during the case"),
     CaseResult("b/tp2/m/r", "error", error="rank 0 exited with code 1 during the case")),
])
def test_what_varies_between_cases_of_one_cause_is_normalised(a, b):
    assert sig(a) == sig(b)
    assert len(root_causes.group([a, b], [gate.judge(a, None, None), gate.judge(b, None, None)])) == 1


@pytest.mark.parametrize("a,b", [
    # same tensor and numbers, different failing checks
    (tensor_failure("a/tp1/m/r", 0, 10, 0.5, 1, 1), tensor_failure("b/tp1/m/r", 0, 10, 0.5, 1, 1, check="hf-export")),
    # same message, different exception types
    (crash("a/tp1/m/r", 1, 2), crash("b/tp1/m/r", 1, 2, kind="KeyError")),
    # different tensors (not only their layer index)
    (tensor_failure("a/tp1/m/r", 0, 10, 0.5, 1, 1),
     tensor_failure("b/tp1/m/r", 0, 10, 0.5, 1, 1, key="decoder.layers.{}.mlp.linear_fc2.weight")),
    # a crash and a timeout
    (CaseResult("a/tp1/m/r", "error", error="killed after 300 s"),
     CaseResult("b/tp1/m/r", "timeout", error="killed after 300 s")),
])
def test_different_causes_never_merge(a, b):
    assert sig(a) != sig(b)
    assert len(root_causes.group([a, b], [gate.judge(a, None, None), gate.judge(b, None, None)])) == 2


def test_bytes_that_moved_off_golden_group_by_the_difference():
    """A case that passes but whose bytes moved is REGRESSED with no failing check: its cause is
    the golden difference, numbers and layer index normalised."""
    a, b = passing("a/tp1/m/r"), passing("b/tp2/m/r")
    va = gate.Verdict(a.case_id, gate.REGRESSED, ("golden: hf-export: 3 tensor(s) with different bytes, e.g. "
                                                  "model.layers.2.mlp.up_proj.weight",))
    vb = gate.Verdict(b.case_id, gate.REGRESSED, ("golden: hf-export: 7 tensor(s) with different bytes, e.g. "
                                                  "model.layers.11.mlp.up_proj.weight",))
    (cause,) = root_causes.group([a, b], [va, vb])
    assert cause.check == "golden" and cause.count == 2 and "model.layers.#.mlp.up_proj.weight" in cause.signature
    assert cause.detail == va.reasons[0]


def test_normalise_keeps_names_and_takes_out_numbers():
    assert root_causes.normalise("max|d|=3.7e-01 at rank 1 of [252, 64] in qwen3 float32 linear_fc1 "
                                 "0x7f3a2b /tmp/x-1/y sha 0123456789ab nan") == \
        "max|d|=# at rank # of <shape> in qwen3 float32 linear_fc1 <hex> <path> sha <hex> #"


# ------------------------------------------------------------------------------- reports


@pytest.fixture
def gate_run(tmp_path, monkeypatch, seeded):
    monkeypatch.setenv("HARNESS_GOLDEN", str(tmp_path / "golden"))
    results, verdicts, causes = seeded
    run = RunDir.create("gate", root=tmp_path / "reports")
    run_report.write_run(run, results, {"label": "gate", "lane": "cpu"},
                         verdicts={v.case_id: v.verdict for v in verdicts}, verdict_order=gate.ORDER,
                         root_causes=causes)
    return run


def test_summary_is_verdict_first_then_root_causes_fixed_link_and_case_rows(gate_run, seeded):
    md = (gate_run / "summary.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "### Gate: **REGRESSED**: 24 of 27 cases regressed, from 2 root causes"
    sections = [md.index(s) for s in ("#### Root causes (2)", "#### FIXED (1)", "[index.html](index.html)",
                                      "#### Every case (27)")]
    assert sections == sorted(sections)
    cause_rows = [line for line in lines if re.match(r"\| \d+ \| \*\*", line)]
    assert len(cause_rows) == 2
    assert cause_rows[0].startswith(f"| 1 | **22** | `tensors` | `{MAPPING_BUG.format('#')}` | 1/120 differ")
    assert cause_rows[1].startswith("| 2 | **2** | `ValueError` | - | ValueError: rank 1:")
    for row in cause_rows:
        assert REPRESENTATIVE in row or "gemma/tp2/memory/roundtrip" in row
        assert row.endswith("| not bisected |")
    assert "- `qwen3-moe/tp1/memory/roundtrip`: passes now" in md[sections[1]:sections[2]]
    case_rows = [line.split(" | ")[:2] for line in lines[lines.index("#### Every case (27)"):lines.index(COVERAGE)]
                 if line.startswith("| ")]
    # Each regressed case names its cause; the 22 of cause 1 first.
    assert case_rows == [["| verdict", "cause"]] + [["| REGRESSED", "1"]] * 22 + [["| REGRESSED", "2"]] * 2 + [
        ["| STILL-FAILING", ""], ["| FIXED", ""], ["| PASS", ""]]
    assert "left out" not in md and lines[-1] == COVERAGE  # it fits: nothing dropped


def test_a_passing_gate_says_so_first(tmp_path):
    results = [passing("llama/tp1/memory/roundtrip")]
    md = run_report.summary_markdown(results, {}, "g", {results[0].case_id: gate.PASS}, gate.ORDER, ())
    assert md.startswith("### Gate: **PASS**: nothing regressed in 1 cases\n")
    assert "#### Root causes (0)\n\nNone: nothing regressed." in md and "#### FIXED (0)\n\nNone." in md
    ungrouped = run_report.summary_markdown(results, {}, "g", {results[0].case_id: gate.REGRESSED}, gate.ORDER, ())
    assert "nothing regressed" not in ungrouped and "Not grouped" in ungrouped


def test_index_html_leads_with_the_root_causes(gate_run):
    html = (gate_run / rendering.INDEX_NAME).read_text()
    assert html.index("Root causes (2)") < html.index("<h2>Grid</h2>") < html.index("<h2>Cases</h2>")
    rows = re.findall(r'<tr class="root-cause">(.*?)</tr>', html, re.S)
    assert len(rows) == 2
    anchor = rendering.case_anchor(REPRESENTATIVE)
    assert "<b>22</b>" in rows[0] and f'href="#{anchor}"' in rows[0] and "not bisected" in rows[0]
    assert rows[0].count('href="#case-') == 23  # the 22 cases, and the representative again
    assert f"harness run {REPRESENTATIVE} --lane cpu" in rows[0]
    assert "mistral, llama@padded" in rows[0] and "tp1, tp2, tp2-pp2, pp2, tp2-to-tp1" in rows[0]
    assert f'id="{anchor}"' in html  # the link lands on the drill-down


def test_the_gate_table_prints_root_causes_before_the_cases(monkeypatch, capsys, seeded, tmp_path):
    from harness import cli

    results, verdicts, causes = seeded
    outcome = gate.GateOutcome(run=mock.Mock(results=results, run=mock.Mock(summary_file=tmp_path / "s.md")),
                               verdicts=verdicts, root_causes=causes)
    monkeypatch.setattr(cli, "_source_trees", lambda args: [])
    monkeypatch.setattr(cli, "_select", lambda args: [])
    monkeypatch.setattr(cli, "_spec", lambda *a: None)
    monkeypatch.setattr(gate, "run_gate", lambda *a, **k: outcome)
    assert cli.main(["gate"]) == cli.EXIT_FAIL
    out = capsys.readouterr().out
    first_cause = next(line for line in out.splitlines() if line.split()[:3] == ["1", "REGRESSED", "22"])
    assert "tensors" in first_cause and "not bisected" in first_cause
    assert out.index(first_cause) < out.index("REGRESSED") and "(2 root cause(s))" in out


# ------------------------------------------------------------- bisections, fixes, incompatible trees

FIRST_BAD = root_causes.Commit("b" * 40, "refactor: tidy swiglu sharded factory",
                               ("megatron/core/transformer/mlp.py",), more_files=2)
SKIPPED = root_causes.Commit("c" * 40, "wip: does not import")


def test_a_bisected_cause_names_its_first_bad_commit_and_a_fix_its_first_good_one(seeded):
    results, verdicts, causes = seeded
    found = root_causes.Bisection(status=root_causes.Bisection.FOUND, term="first bad", commit=FIRST_BAD, steps=3,
                                  skipped=(SKIPPED,), range=("a" * 40, "b" * 40))
    budget = root_causes.Bisection(status=root_causes.Bisection.BUDGET, term="first bad", steps=1,
                                   reason="budget spent after 1 step(s); narrowed to aaaa..bbbb (2 commit(s) left)")
    fixed_case = next(r for r in results if r.case_id == "qwen3-moe/tp1/memory/roundtrip")
    was_failing = tensor_failure(fixed_case.case_id, 0, 10, 0.5, 1, 1)  # how it failed in the baseline
    (fix,) = gate.fixed_causes(verdicts, {fixed_case.case_id: was_failing})
    fix = dataclasses.replace(fix, bisection=dataclasses.replace(found, term="first fixed", skipped=()))
    causes = (dataclasses.replace(causes[0], bisection=found), dataclasses.replace(causes[1], bisection=budget), fix)
    md = run_report.summary_markdown(results, {}, "g", {v.case_id: v.verdict for v in verdicts}, gate.ORDER, causes)
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \| \*\*", line)]
    assert len(rows) == 2  # the fix is not a regression row
    assert rows[0].endswith("| bbbbbbbbbbbb refactor: tidy swiglu sharded factory (files: "
                            "megatron/core/transformer/mlp.py and 2 more) [3 step(s); 1 skipped (no import)] |")
    assert rows[1].endswith("| not bisected: budget spent after 1 step(s); narrowed to aaaa..bbbb (2 commit(s) left) |")
    assert "Cause 1: skipped 1 commit(s) that do not import: `cccccccccccc`" in md
    fixed = md[md.index("#### FIXED (1)"):md.index("[index.html]")]
    assert ("- cause 3: **1** case(s) that failed `tensors` on `decoder.layers.#.mlp.linear_fc1.weight` now pass "
            "(e.g. `qwen3-moe/tp1/memory/roundtrip`); first good commit: bbbbbbbbbbbb refactor") in fixed
    assert "passes now, failed in every reference" not in fixed  # grouped, not listed twice
    html = run_page.render_run_page(run_page.build_run_page(
        RunDir("/nonexistent-run"), results, {}, {v.case_id: v.verdict for v in verdicts}, causes))
    assert "bbbbbbbbbbbb refactor: tidy swiglu" in html and "skipped (does not import):" in html


def test_an_incompatible_candidate_is_one_line_not_one_error_per_case():
    cause = gate.incompatible_cause(
        "ImportError: cannot import name 'get_te_version' from 'megatron.core.utils' (/tmp/x/megatron/core/utils.py)",
        mock.Mock(cases=[mock.Mock(id=f"llama/tp{i}/memory/roundtrip") for i in (1, 2)]))
    cause = dataclasses.replace(cause, bisection=root_causes.Bisection(
        status=root_causes.Bisection.FOUND, term="first bad", commit=FIRST_BAD, steps=4, range=("a" * 40, "b" * 40)))
    md = run_report.summary_markdown([], {"source_trees": []}, "g", {}, gate.ORDER, (cause,))
    first = md.splitlines()[0]
    assert first.startswith("### Gate: **INCOMPATIBLE**: the candidate cannot start: `ImportError: cannot import name "
                            "'get_te_version' from 'megatron.core.utils'")
    assert first.endswith("first bad commit: bbbbbbbbbbbb refactor: tidy swiglu sharded factory (files: "
                          "megatron/core/transformer/mlp.py and 2 more) [4 step(s)]")
    assert "no case ran (2 selected)" in md and "Bisected in 4 step(s)" in md
    assert "| ERROR" not in md and "#### Every case" not in md and "| verdict |" not in md  # no wall, no empty table
    outcome = gate.GateOutcome(run=mock.Mock(results=[]), verdicts=[], root_causes=(cause,))
    assert outcome.regressed and outcome.incompatible is cause


# ------------------------------------------------------------------- the PR comment's limit


def numbers_in(text: str) -> list[str]:
    return [t.strip("(),:;") for t in text.split() if any(ch.isdigit() for ch in t)]


def test_no_number_is_cut_when_cells_are_clipped(seeded):
    long_tail = " ".join(["because the exported projection was not transposed"] * 4)
    case = tensor_failure("llama/tp1/memory/roundtrip", 0, 123456, float(LONG_NUMBER), 1, 1)
    case.checks[0].summary += f" max|d|={LONG_NUMBER} {long_tail} after 987654321 steps"
    verdict = gate.judge(case, None, None)
    causes = root_causes.group([case], [verdict])
    md = run_report.summary_markdown([case], {}, "g", {case.case_id: verdict.verdict}, gate.ORDER, causes)
    rows = [line for line in md.splitlines() if "llama/tp1/memory/roundtrip" in line and line.startswith("| ")]
    assert len(rows) == 2 and all("…" in row for row in rows)  # both clipped: the cause and the case
    for row in rows:
        for number in numbers_in(case.checks[0].summary):
            assert run_report.table_cell(number) in row, (number, row)


def many_regressions(n: int) -> tuple[list[CaseResult], list[gate.Verdict]]:
    results = [tensor_failure(f"fam{i % 7}/tp{1 + i % 3}/memory/roundtrip+x{i}", i % 30, 1000 + i, i / 7, 1, 1)
               for i in range(n)]
    results += [crash("gemma/tp2/memory/roundtrip", 1, 2), crash("phi3/tp2/memory/roundtrip", 0, 4)]
    return results, [gate.judge(r, None, None) for r in results]


def test_a_summary_over_githubs_limit_drops_case_rows_never_root_causes():
    results, verdicts = many_regressions(800)
    causes = root_causes.group(results, verdicts)
    md = run_report.summary_markdown(results, {}, "g", {v.case_id: v.verdict for v in verdicts}, gate.ORDER, causes)
    assert len(md) <= run_report.SUMMARY_LIMIT < run_report.COMMENT_LIMIT == 65536
    assert len([line for line in md.splitlines() if re.match(r"\| \d+ \| \*\*", line)]) == 2  # both causes
    case_rows = [line for line in md.splitlines() if line.startswith("| REGRESSED |")]
    left_out = re.search(r"\*(\d+) of (\d+) per-case rows left out to stay within GitHub's 65536-character "
                         r"comment limit: every case is in \[index.html\]\(index.html\)\.\*", md)
    assert left_out and int(left_out[2]) == 802 and int(left_out[1]) == 802 - len(case_rows) > 0
    assert all(row.endswith(" |") and row.count(" | ") == 4 for row in case_rows)  # whole rows only
    assert md.index("#### Root causes") < md.index("| REGRESSED |") < left_out.start() < md.index(COVERAGE)


def test_root_cause_rows_stay_when_not_even_one_case_row_fits():
    results, verdicts = many_regressions(3)
    causes = root_causes.group(results, verdicts)
    md = run_report.summary_markdown(results, {}, "g", {v.case_id: v.verdict for v in verdicts}, gate.ORDER, causes,
                                     limit=100)
    assert len([line for line in md.splitlines() if re.match(r"\| \d+ \| \*\*", line)]) == len(causes) == 2
    assert "*5 of 5 per-case rows left out" in md and "| REGRESSED |" not in md


def test_index_html_of_a_gate_without_regressions_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_GOLDEN", str(tmp_path / "golden"))
    results = [passing("llama/tp1/memory/roundtrip")]
    run = RunDir.create("gate", root=tmp_path / "reports")
    clean = run_page.write_run_page(run, results, {}, {results[0].case_id: gate.PASS}, ()).read_text()
    assert "Root causes (0)" in clean and "None: nothing regressed." in clean
    ungrouped = run_page.write_run_page(run, results, {}, {results[0].case_id: gate.REGRESSED}, ()).read_text()
    assert "nothing regressed" not in ungrouped and "Not grouped" in ungrouped
    plain = run_page.write_run_page(run, results, {}).read_text()
    assert "Root causes" not in plain  # not a gate run
