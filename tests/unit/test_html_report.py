"""The HTML run report and history page: the model (grid, looks, known failures, verdicts,
history streaks, plot) and what the rendered pages contain. Run folders are real folders written
by ``run_report.write_run``; the results in them are synthetic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import workspace
from harness.execution.run_dir import Plan, RunDir
from harness.matrix.cases import Case, parse_case_id
from harness.matrix.layouts import Layout
from harness.matrix.model_spec import ModelSpec
from harness.regression import gate, golden
from harness.reporting import run_document, run_report
from harness.reporting.html import case_grid, history_page, rendering, run_page
from harness.reporting.html.looks import KNOWN_LOOK, STATUS_LOOKS, VERDICT_LOOKS, golden_view
from harness.results import CaseResult, CheckResult
from harness.run_spec import RunSpec

pytestmark = pytest.mark.cpu

SHA = "0123456789abcdef0123456789abcdef01234567"
LOG_LINE = "rank0 says: exporting lm_head.weight with padded vocab 252"
ODD_DIFF = 0.00012345678912345678  # must appear whole, never rounded
GROUP = "ws1-1"


def tensors_check(passed=True, bad_key=None, missing=()):
    rows = [{"key": "model.embed_tokens.weight", "shape": [250, 64], "dtype": "float32", "max_abs_diff": 0.0,
             "status": "ok"}]
    if bad_key:
        rows.append({"key": bad_key, "shape": [252, 64], "dtype": "float32", "max_abs_diff": ODD_DIFF,
                     "status": "shape [252, 64] != [250, 64]"})
    bad = int(bool(bad_key))
    return CheckResult("tensors", passed, "2/2 tensors bitwise equal" if passed else f"{bad}/2 differ",
                       metrics={"compared": 2, "mismatched": bad, "missing": list(missing), "extra": [],
                                "duplicates": [], "max_abs_diff": ODD_DIFF if bad else 0.0},
                       details=rows)


def logits_check(max_abs=0.0):
    return CheckResult("logits-hf-vs-megatron", max_abs <= 1e-5, f"max|d|={max_abs:.2e}",
                       metrics={"max_abs_diff": max_abs, "mean_abs_diff": max_abs / 2, "top1_agreement": 1.0,
                                "kl": 0.0, "tolerance": {"max_abs": 1e-5, "kl": 1e-11}})


def result(case_id, status="pass", checks=None, error="", fingerprint=None):
    if checks is None:
        checks = [tensors_check(status != "fail", bad_key="lm_head.weight" if status == "fail" else None),
                  logits_check()]
    return CaseResult(case_id, status, checks=checks, error=error, duration_s=1.5,
                      fingerprint=fingerprint or {"hf-export": {"w": [[2], "float32", "a" * 64]}})


def nightly_results():
    return [
        result("llama/tp1/memory/roundtrip"),
        result("llama@padded/tp2/memory/roundtrip", "fail"),
        result("qwen2/tp1/memory/roundtrip", "error", checks=[],
               error="Traceback (most recent call last):\nRuntimeError: bad <script>alert(1)</script>"),
        result("qwen2/tp2/torch_dist/roundtrip", "timeout", checks=[], error="killed after 300 s"),
        result("qwen3/tp1/memory/roundtrip", "skip", checks=[], error="needs 4 ranks"),
        result("qwen3/tp3/memory/roundtrip", "invalid", checks=[], error="tp3 does not divide 4 heads"),
        result("llama/tp2-to-tp1/torch_dist/reshard", "infra-error", checks=[], error="rendezvous failed"),
        result("llama/tp1/memory/roundtrip+gate-up-swapped", "fail"),
        result("llama/tp1/torch_dist/roundtrip", "pass",
               checks=[tensors_check(), CheckResult.skip("logits-hf-vs-megatron", "no forward here")]),
    ]


RED = {"llama@padded/tp2/memory/roundtrip", "qwen2/tp1/memory/roundtrip", "qwen2/tp2/torch_dist/roundtrip",
       "llama/tp1/memory/roundtrip+gate-up-swapped"}
META = {"label": "nightly", "lane": "cpu", "command": "harness matrix --set full",
        "started_utc": "2026-01-01T00:00:00Z",
        "source_trees": [{"kind": "megatron-lm", "path": "/src/Megatron-LM", "import_root": "/src/Megatron-LM",
                          "sha": SHA, "dirty": True}],
        "versions": {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2"}, "injected_faults": []}


@pytest.fixture(autouse=True)
def golden_root(tmp_path, monkeypatch):
    """An empty golden/ of the test's own (the repository's never decides a test's colours)."""
    root = tmp_path / "golden"
    root.mkdir()
    monkeypatch.setenv("HARNESS_GOLDEN", str(root))
    return root


def case_of(case_id: str) -> Case:
    """The case a synthetic result's ID names (built from the ID: no zoo family is loaded)."""
    key = parse_case_id(case_id)
    save, _, load = key.layout.partition("-to-")
    return Case(model=ModelSpec(key.family, key.variant), layout=Layout.parse(save), path=key.path, sets=frozenset(),
                load_layout=Layout.parse(load) if load else None, tag=key.fault)


def make_run(root: Path, results: list[CaseResult], label="nightly", meta=META) -> RunDir:
    """A run folder as the launcher leaves it: results, one launch plan, its log and provenance."""
    run = RunDir.create(label, root=root)
    run_report.write_run(run, results, meta)
    run.write_plan(Plan(spec=RunSpec(cases=[case_of(r.case_id) for r in results], cases_dir=Path("cases")),
                        run_dir=str(run.path), group=GROUP))
    run.rank_log(GROUP, 0).parent.mkdir(parents=True, exist_ok=True)
    run.rank_log(GROUP, 0).write_text(f"starting\n{LOG_LINE}\n")
    run.write_provenance(GROUP, {"megatron.core": "/src/Megatron-LM/megatron/core",
                                 "imported_from_trees": {"megatron-lm": "/src/Megatron-LM"},
                                 "runtime": {"lane": "cpu", "dtype": "float32"}})
    return run


def drill_down(html: str, case_id: str) -> str:
    """The HTML of one case's drill-down (up to the next case)."""
    start = html.index(f'id="{rendering.case_anchor(case_id)}"')
    end = html.find('<details class="case"', start)
    return html[start:end if end != -1 else len(html)]


# ---------------------------------------------------------------------------------- model


@pytest.mark.parametrize("case_id,parts", [
    ("qwen3-moe/tp2-ep2/torch_dist/roundtrip", ("qwen3-moe", "", "tp2-ep2", "torch_dist/roundtrip", "")),
    ("llama@bf16/tp1/fsdp_dtensor/roundtrip", ("llama", "bf16", "tp1", "fsdp_dtensor/roundtrip", "")),
    ("llama/tp2-to-tp1/torch_dist/reshard", ("llama", "", "tp2-to-tp1", "torch_dist/reshard", "")),
    ("llama/tp1/memory/roundtrip+gate-up-swapped", ("llama", "", "tp1", "memory/roundtrip", "gate-up-swapped")),
    ("gpt-oss@yarn2/tp1/memory/roundtrip+x", ("gpt-oss", "yarn2", "tp1", "memory/roundtrip", "x")),
])
def test_case_ids_split_into_family_variant_layout_path_and_fault(case_id, parts):
    key = parse_case_id(case_id)
    assert (key.family, key.variant, key.layout, key.path, key.fault) == parts
    assert key.model == case_id.split("/")[0]


def test_grid_has_a_panel_per_path_and_variants_under_their_family():
    grid = case_grid.build_grid(case_grid.build_cells(nightly_results()))
    assert [p.path for p in grid.panels] == ["memory/roundtrip", "torch_dist/roundtrip", "torch_dist/reshard"]
    memory = grid.panels[0]
    assert [(c.layout, c.fault) for c in memory.columns] == [("tp1", ""), ("tp2", ""), ("tp3", ""),
                                                             ("tp1", "gate-up-swapped")]
    assert [(r.model, r.first_of_family) for r in memory.rows] == [
        ("llama", True), ("llama@padded", False), ("qwen2", True), ("qwen3", True)]
    llama = memory.rows[0]
    assert [c.label if c else None for c in llama.cells] == ["PASS", None, None, "FAIL"]
    assert len(grid.cells) == len(nightly_results())


def test_each_status_has_its_own_look_and_only_failures_and_crashes_are_red():
    cells = {c.key.case_id: c for c in case_grid.build_cells(nightly_results())}
    looks = {case_id: (c.look.css, c.label) for case_id, c in cells.items()}
    assert looks == {
        "llama/tp1/memory/roundtrip": ("pass", "PASS"),
        "llama@padded/tp2/memory/roundtrip": ("fail", "FAIL"),
        "qwen2/tp1/memory/roundtrip": ("error", "ERROR"),
        "qwen2/tp2/torch_dist/roundtrip": ("timeout", "TIMEOUT"),
        "qwen3/tp1/memory/roundtrip": ("skip", "SKIP"),
        "qwen3/tp3/memory/roundtrip": ("invalid", "INVALID"),
        "llama/tp2-to-tp1/torch_dist/reshard": ("infra", "INFRA"),
        "llama/tp1/memory/roundtrip+gate-up-swapped": ("fail", "FAIL"),
        "llama/tp1/torch_dist/roundtrip": ("pass", "PASS*"),  # a check could not run
    }
    assert {case_id for case_id, c in cells.items() if c.needs_attention} == RED
    assert case_grid.build_grid(list(cells.values())).red_count == len(RED)
    assert len({look.css for look in STATUS_LOOKS.values()} | {KNOWN_LOOK.css}) == 8


def test_a_failure_pinned_in_golden_is_known_and_not_red_but_a_new_way_to_fail_is(golden_root):
    pinned = result("llama@padded/tp2/memory/roundtrip", "fail")
    golden.write(pinned, {}, root=golden_root)
    doc = json.loads(golden.golden_path("cpu", pinned.case_id, golden_root).read_text())
    doc["known_failure"] = {"upstream": "megatron-bridge 0.6.2", "diagnosis": "export keeps the vocab padding"}
    workspace.atomic_write_json(golden.golden_path("cpu", pinned.case_id, golden_root), doc)

    same = case_grid.build_cells([result(pinned.case_id, "fail")])[0]
    assert (same.look, same.needs_attention) == (KNOWN_LOOK, False)

    worse = result(pinned.case_id, "fail", checks=[tensors_check(False, bad_key="lm_head.weight"),
                                                   logits_check(max_abs=0.5)])
    view = golden_view(worse)
    assert view.differences and "failing checks" in view.differences[0]
    assert case_grid.build_cells([worse])[0].needs_attention

    now_passing = case_grid.build_cells([result(pinned.case_id, "pass")])[0]
    assert now_passing.look.css == "pass"  # a fixed case is green; golden says it changed


def test_known_failure_shows_its_diagnosis_on_the_page(tmp_path, golden_root):
    pinned = result("llama@padded/tp2/memory/roundtrip", "fail")
    golden.write(pinned, {}, root=golden_root)
    path = golden.golden_path("cpu", pinned.case_id, golden_root)
    doc = json.loads(path.read_text())
    doc["known_failure"] = {"upstream": "megatron-bridge 0.6.2", "diagnosis": "export keeps the vocab padding"}
    workspace.atomic_write_json(path, doc)
    run = make_run(tmp_path / "reports", [pinned])
    html = run_page.write_run_page(run, [pinned], META).read_text()
    case = drill_down(html, pinned.case_id)
    assert "KNOWN" in case and "megatron-bridge 0.6.2" in case and "export keeps the vocab padding" in case
    assert "this run matches it" in case
    assert "Nothing is red." in html


def test_gate_verdicts_replace_statuses_and_only_regressed_is_red(tmp_path):
    assert set(VERDICT_LOOKS) == set(gate.ORDER)  # every verdict the gate gives has a look
    results = nightly_results()[:3]
    verdicts = {results[0].case_id: gate.PASS, results[1].case_id: gate.STILL_FAILING,
                results[2].case_id: gate.REGRESSED}
    cells = case_grid.build_cells(results, verdicts)
    assert [(c.label, c.needs_attention) for c in cells] == [
        ("PASS", False), ("STILL-FAILING", False), ("REGRESSED", True)]

    run = make_run(tmp_path / "reports", results, label="gate")
    html = run_page.write_run_page(run, results, META, verdicts).read_text()
    assert html.count("attention\"><a href=") == 1
    assert ">REGRESSED</a>" in html and ">STILL-FAILING</a>" in html and "Gate run" in html


# ---------------------------------------------------------------------------- run page


@pytest.fixture
def nightly_page(tmp_path):
    results = nightly_results()
    run = make_run(tmp_path / "reports", results)
    path = run_page.write_run_page(run, results, META)
    assert path == run.path / "index.html"
    return path.read_text()


def test_grid_cells_link_to_their_drill_down(nightly_page):
    red_cells = re.findall(r'<td class="cell (\w+) attention"><a href="#([^"]+)"', nightly_page)
    assert sorted(anchor for _, anchor in red_cells) == sorted(rendering.case_anchor(c) for c in RED)
    for _, anchor in red_cells:
        assert f'<details class="case" id="{anchor}" open>' in nightly_page
    assert f'<details class="case" id="{rendering.case_anchor("llama/tp1/memory/roundtrip")}">' in nightly_page


def test_drill_down_shows_the_failing_check_its_numbers_tensors_logs_and_provenance(nightly_page):
    case = drill_down(nightly_page, "llama@padded/tp2/memory/roundtrip")
    assert re.search(r'<tr class="check-fail">.*?<td class="mono">tensors</td>', case, re.S)
    assert repr(ODD_DIFF) in case  # every digit
    assert "tensors equal</span> = <span class=\"mono wrap\">1</span>" in case
    assert "lm_head.weight" in case and "shape [252, 64] != [250, 64]" in case  # the failing tensor
    assert "top-1 agreement" in case and "KL" in case  # the logit numbers
    assert LOG_LINE in case  # the rank log tail
    assert SHA in case and "DIRTY" in case  # provenance
    assert "/src/Megatron-LM/megatron/core" in case
    assert "No golden file for this case." in case


def test_run_page_puts_red_cases_first_and_counts_them(nightly_page):
    assert "Needs attention (4)" in nightly_page
    anchors = re.findall(r'<details class="case" id="([^"]+)"', nightly_page)
    assert {a for a in anchors[:4]} == {rendering.case_anchor(c) for c in RED}


def test_page_is_self_contained_without_script(nightly_page):
    lowered = nightly_page.lower()
    for needle in ("http://", "https://", "//cdn", "<script", "<link", "@import", "url("):
        assert needle not in lowered, needle
    assert "content-security-policy" in lowered and "default-src 'none'" in lowered


def test_error_text_is_escaped(nightly_page):
    case = drill_down(nightly_page, "qwen2/tp1/memory/roundtrip")
    assert "RuntimeError: bad &lt;script&gt;alert(1)&lt;/script&gt;" in case
    assert "<script>" not in nightly_page


def test_numbers_are_shown_whole():
    assert rendering.format_value(ODD_DIFF) == repr(ODD_DIFF)
    assert rendering.format_value(float("nan")) == "nan"
    assert rendering.format_value({"max_abs": 1e-05, "kl": 1e-11}) == "max_abs=1e-05, kl=1e-11"
    assert rendering.format_value([[1, 2], [3]]) == "[1, 2], [3]"
    assert rendering.format_value([]) == "none"


def test_html_report_imports_without_torch():
    code = ("import sys, harness.reporting.html.run_page, harness.reporting.html.history_page; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers')]; "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workspace.REPO_ROOT)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------ history


def history_run(root: Path, stamp: str, results: list[CaseResult]) -> RunDir:
    """A nightly's folder with results.json only (as runs of a harness older than the page leave)."""
    run = RunDir(root / f"{stamp}-nightly")
    run.path.mkdir(parents=True)
    run_document.write_results(run, results, dict(META, started_utc=stamp))
    return run


@pytest.fixture
def three_nightlies(tmp_path):
    root = tmp_path / "reports"
    no_logits = [tensors_check()]
    for stamp, llama, max_abs in (("20260101T020000Z", "pass", 1e-7), ("20260102T020000Z", "fail", 2e-7),
                                  ("20260103T020000Z", "fail", 4e-6)):
        checks = [tensors_check(llama == "pass", bad_key=None if llama == "pass" else "lm_head.weight"),
                  logits_check(max_abs)]
        history_run(root, stamp, [result("llama/tp1/memory/roundtrip", llama, checks=checks),
                                  result("qwen2/tp1/memory/roundtrip"),
                                  result("qwen3/tp1/torch_dist/roundtrip", checks=no_logits)])
    (root / "test-artifacts").mkdir()  # a folder without results.json is not a run
    return root


def test_history_marks_the_run_where_a_case_went_red(three_nightlies):
    history = history_page.build_history(three_nightlies)
    assert [r.name for r in history.runs] == ["20260101T020000Z-nightly", "20260102T020000Z-nightly",
                                             "20260103T020000Z-nightly"]  # `latest` is not a run
    rows = {r.case_id: r for r in history.rows}
    llama = rows["llama/tp1/memory/roundtrip"]
    assert [c.went_red for c in llama.cells] == [False, True, False]
    assert llama.red_since.name == "20260102T020000Z-nightly" and not llama.red_before_window
    assert rows["qwen2/tp1/memory/roundtrip"].red_since is None
    assert history.rows[0] is llama  # red now: first

    last_two = history_page.build_history(three_nightlies, last=2)
    assert len(last_two.runs) == 2 and last_two.rows[0].red_before_window  # red in every run shown


def test_history_plots_one_logit_series_per_case_with_logit_numbers(three_nightlies):
    plot = history_page.build_history(three_nightlies).plot
    assert [s.case_id for s in plot.series] == ["llama/tp1/memory/roundtrip", "qwen2/tp1/memory/roundtrip"]
    llama = plot.series[0]
    assert [p.value for p in llama.points] == ["1e-07", "2e-07", "4e-06"]
    assert llama.points[0].y > llama.points[1].y > llama.points[2].y  # larger max|d| is higher up
    qwen2 = plot.series[1]
    assert all(p.y == qwen2.points[0].y for p in qwen2.points)  # exact zeros on the "0" line
    assert [t.label for t in plot.tolerances] == ["tol 1e-05"]
    assert plot.tolerances[0].at < llama.points[2].y  # the tolerance is above the worst point


def test_history_page_is_written_self_contained_with_an_inline_svg(three_nightlies):
    path = history_page.write_history_page(three_nightlies)
    assert path == three_nightlies / "history.html"
    html = path.read_text()
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert svg.count("<polyline") == 2 and svg.count('class="series"') == 2
    assert "▲ FAIL" in html and html.count("went-red") == 1
    assert "20260101T020000Z-nightly/index.html#case-llama__tp1__memory__roundtrip" not in html  # no page yet
    for needle in ("http://", "https://", "//cdn", "<script"):
        assert needle not in html.lower()


def test_history_links_into_run_pages_and_lists_unreadable_runs(three_nightlies):
    first = RunDir(three_nightlies / "20260101T020000Z-nightly")
    doc, results = run_document.load_run(first.path)
    run_page.write_run_page(first, list(results.values()), doc["meta"])
    broken = three_nightlies / "20260104T020000Z-nightly"
    broken.mkdir()
    (broken / "results.json").write_text(json.dumps({"schema_version": 99}))

    html = history_page.write_history_page(three_nightlies).read_text()
    assert 'href="20260101T020000Z-nightly/index.html#case-llama__tp1__memory__roundtrip"' in html
    assert "20260104T020000Z-nightly" in html and "schema 99" in html
    rerendered = run_page.write_run_page(first, list(results.values()), doc["meta"]).read_text()
    assert 'href="../history.html"' in rerendered


def test_every_run_folder_gets_its_page_and_a_gate_run_shows_verdicts(tmp_path):
    run = make_run(tmp_path, nightly_results())
    page = (run / rendering.INDEX_NAME).read_text()
    assert page.count('class="cell') >= len(nightly_results()) and "REGRESSED" not in page
    verdicts = {r.case_id: "REGRESSED" if r.case_id in RED else "PASS" for r in nightly_results()}
    run_report.write_run(run, nightly_results(), META, verdicts=verdicts, verdict_order=gate.ORDER)
    assert "REGRESSED" in (run / rendering.INDEX_NAME).read_text()


def test_report_cli_writes_history_and_refuses_a_folder_without_runs(three_nightlies, tmp_path, capsys):
    from harness.cli import main

    assert main(["report", "--history", str(three_nightlies), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert (three_nightlies / "history.html").is_file() and "over 2 run(s), 1 red now" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--history", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run folder with a results.json" in err
    assert not (empty / "history.html").exists()
    first = three_nightlies / "20260101T020000Z-nightly"
    assert main(["report", str(first)]) == 0 and (first / rendering.INDEX_NAME).is_file()


def test_run_page_shows_the_case_classes_per_family_apart_from_the_grid(nightly_page):
    assert '<h2 id="case-classes">Case classes</h2>' in nightly_page
    table = nightly_page.split('<table class="grid case-classes">', 1)[1].split("</table>", 1)[0]
    assert "repeated-export" in table and "config-export" in table
    assert 'class="cell' not in table  # its counts are not grid cells (no drill-down link)
