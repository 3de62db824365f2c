"""golden/ comparison, gate verdicts, reports (results.json, junit.xml, summary.md, latest)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from harness import workspace
from harness.execution.run_dir import RunDir
from harness.regression import gate, golden
from harness.reporting import run_document, run_report
from harness.results import CaseResult, CheckResult

pytestmark = pytest.mark.cpu


def make_result(status="pass", sha="a" * 64, shape=(4, 2), max_abs=0.0, case_id="llama/tp1/memory/roundtrip"):
    checks = [
        CheckResult("tensors", status == "pass", "2/2 tensors bitwise equal" if status == "pass" else "1/2 differ"),
        CheckResult("logits-hf-vs-megatron", True, "ok", metrics={"max_abs_diff": max_abs}),
    ]
    fp = {
        "hf-export": {"w": [list(shape), "float32", sha], "b": [[4], "float32", "b" * 64]},
        "logits": {"max_abs_diff": max_abs, "kl": 0.0, "tolerance": {"max_abs": 1e-5, "kl": 1e-11}},
    }
    return CaseResult(case_id=case_id, status=status, checks=checks, fingerprint=fp)


@pytest.fixture
def golden_doc():
    return golden.document(make_result(), {"versions": {}})


def test_identical_result_matches(golden_doc):
    assert golden.compare(golden_doc, make_result()) == []


@pytest.mark.parametrize(
    "changed,words",
    [
        (make_result(status="fail"), "status fail"),
        (make_result(sha="c" * 64), "different bytes"),
        (make_result(shape=(2, 4)), "shape/dtype change"),
        (make_result(max_abs=1e-3), "over the golden tolerance"),
    ],
)
def test_each_kind_of_drift_is_reported(golden_doc, changed, words):
    assert any(words in d for d in golden.compare(golden_doc, changed))


def test_a_lost_key_is_reported(golden_doc):
    result = make_result()
    del result.fingerprint["hf-export"]["b"]
    assert any("gone" in d for d in golden.compare(golden_doc, result))


@pytest.mark.parametrize(
    "golden_status,baseline_status,now,verdict",
    [
        ("pass", None, "pass", gate.PASS),
        ("pass", None, "fail", gate.REGRESSED),
        ("fail", None, "pass", gate.FIXED),
        ("fail", None, "fail", gate.STILL_FAILING),
        (None, "pass", "fail", gate.REGRESSED),
        (None, "fail", "fail", gate.STILL_FAILING),
        ("fail", "pass", "fail", gate.REGRESSED),  # the baseline passed: that is a regression
        (None, None, "fail", gate.REGRESSED),  # no reference at all: a failure is not excused
    ],
)
def test_gate_verdicts(golden_status, baseline_status, now, verdict):
    g = golden.document(make_result(status=golden_status), {}) if golden_status else None
    b = make_result(status=baseline_status) if baseline_status else None
    assert gate.judge(make_result(status=now), g, b).verdict == verdict


def test_passing_case_whose_bytes_moved_is_regressed(golden_doc):
    v = gate.judge(make_result(sha="d" * 64), golden_doc, None)
    assert v.verdict == gate.REGRESSED and any("different bytes" in r for r in v.reasons)


def test_run_files_are_written_atomically_and_latest_points_at_the_run(tmp_path):
    run = RunDir.create("t", root=tmp_path)
    results = [make_result(), make_result(status="fail", case_id="qwen2/tp1/memory/roundtrip")]
    run_report.write_run(run, results, {"label": "t", "versions": {"torch": "2.14.1"}})
    doc = json.loads((run / "results.json").read_text())
    assert doc["schema_version"] == run_document.SCHEMA_VERSION and doc["counts"] == {"pass": 1, "fail": 1}
    suite = ET.parse(run / "junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    md = (run / "summary.md").read_text()
    assert "| FAIL | `qwen2/tp1/memory/roundtrip` |" in md
    assert (tmp_path / "latest").resolve() == run.path.resolve()
    assert not [p for p in run.path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    workspace.atomic_write_json(target, {"old": True})

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(workspace.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        workspace.atomic_write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_golden_cli_check_and_update(tmp_path):
    run = RunDir.create("g", root=tmp_path / "reports")
    run_report.write_run(run, [make_result()], {"label": "g", "versions": {}})
    gold = tmp_path / "golden"
    env = {"HARNESS_REPORTS": str(tmp_path / "reports"), "HARNESS_GOLDEN": str(gold)}

    def cli(*args):
        import os

        return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                              env=dict(os.environ, **env), cwd=workspace.REPO_ROOT)

    r = cli("golden", "check", "--run", "latest")
    assert r.returncode == 1 and "NO GOLDEN" in r.stdout
    r = cli("golden", "update", "--run", "latest", "--dry-run")
    assert r.returncode == 0 and "new" in r.stdout and not gold.exists()
    r = cli("golden", "update", "--run", "latest")
    assert r.returncode == 0 and (gold / "cpu" / "llama__tp1__memory__roundtrip.json").exists()
    assert cli("golden", "check", "--run", "latest").returncode == 0
    doc = json.loads((gold / "cpu" / "llama__tp1__memory__roundtrip.json").read_text())
    doc["fingerprint"]["hf-export"]["w"][2] = "e" * 64
    (gold / "cpu" / "llama__tp1__memory__roundtrip.json").write_text(json.dumps(doc))
    r = cli("golden", "check", "--run", "latest")
    assert r.returncode == 1 and "MISMATCH" in r.stdout and "different bytes" in r.stdout


def test_a_case_this_machine_did_not_run_is_neither_compared_nor_pinned(tmp_path, monkeypatch, capsys):
    """A one-GPU run skips the 2-rank cases; pinning that ``skip`` would fail every 8-GPU nightly."""
    from harness import cli

    skipped = CaseResult(case_id="llama/tp2/memory/roundtrip", status="skip", lane="gpu",
                         error="GPU lane: needs 2 GPUs, this machine has 1")
    infra = CaseResult(case_id="qwen2/tp2/memory/roundtrip", status="infra-error", lane="gpu", error="EADDRINUSE")
    ran = make_result()
    ran.lane = "gpu"
    monkeypatch.setenv("HARNESS_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("HARNESS_GOLDEN", str(tmp_path / "golden"))
    run = RunDir.create("g", root=tmp_path / "reports")
    run_report.write_run(run, [ran, skipped, infra], {"label": "g", "lane": "gpu", "versions": {}})
    assert [r.case_id for r in golden.review_run({r.case_id: r for r in (ran, skipped, infra)})] == [ran.case_id]
    assert cli.main(["golden", "update", "--run", "latest"]) == cli.EXIT_OK
    assert sorted(p.name for p in (tmp_path / "golden" / "gpu").iterdir()) == ["llama__tp1__memory__roundtrip.json"]
    assert "2 case(s) of run latest did not run on its machine" in capsys.readouterr().err
    assert cli.main(["golden", "check", "--run", "latest", "-k", "tp2"]) == cli.EXIT_USAGE
    assert "nothing to compare" in capsys.readouterr().err


def test_source_tree_that_is_not_megatron_is_refused(tmp_path):
    from harness.errors import InputError
    from harness.execution.source_trees import validate

    with pytest.raises(InputError, match="not a megatron-lm source tree"):
        validate("megatron-lm", tmp_path)
    with pytest.raises(InputError, match="no such directory"):
        validate("megatron-bridge", tmp_path / "nope")
    r = subprocess.run([sys.executable, "-m", "harness", "run", "llama/tp1/memory/roundtrip", "--megatron-lm", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a megatron-lm source tree" in r.stderr


def partial_pass():
    """A MoE case at TP2 on CPU: everything passed, but the logit check could not run."""
    result = make_result(case_id="qwen3-moe/tp2-ep2/memory/roundtrip")
    result.checks[1] = CheckResult.skip("logits-hf-vs-megatron", "no Megatron forward on the cpu lane: MoE with TP > 1")
    return result


def test_a_pass_with_a_check_that_could_not_run_is_not_a_plain_pass(tmp_path):
    result = partial_pass()
    assert result.status == "pass" and result.label == "PASS*"
    table = run_report.table([result])
    assert "PASS*" in table and "not checked: logits-hf-vs-megatron (no Megatron forward" in table
    md = run_report.summary_markdown([result], {}, "r")
    assert "| PASS* | `qwen3-moe/tp2-ep2/memory/roundtrip` | not checked: logits-hf-vs-megatron" in md
    junit = ET.fromstring(run_report.junit_xml([result], "r"))
    prop = junit.find(".//property[@name='not-checked.logits-hf-vs-megatron']")
    assert prop is not None and "MoE with TP > 1" in prop.get("value")
    verdict = gate.judge(result, golden.document(make_result(), {}), None)
    assert verdict.verdict == gate.PASS and verdict.label == "PASS*"
    assert any("not checked: logits-hf-vs-megatron" in r for r in verdict.reasons)


def test_a_full_pass_stays_a_plain_pass():
    result = make_result()
    assert result.label == "PASS" and "not checked" not in run_report.table([result])
    assert gate.judge(result, None, None).label == "PASS"


def test_a_logit_check_that_stopped_running_is_a_golden_difference(golden_doc):
    """A case whose forward pass became impossible (its logit check now skipped) must not match."""
    result = make_result()
    del result.fingerprint["logits"]
    assert "logits: not produced now" in golden.compare(golden_doc, result)


def test_the_run_verdict_is_golden_aware_as_pytest_is(tmp_path):
    """A failure pinned in golden/ is expected (XFAIL); one that passes now, fails differently, a
    new failure, or a pass whose bytes moved is unexpected (XPASS(strict), FAIL)."""
    pinned, passing = "qwen3-moe/tp1/memory/roundtrip", "llama/tp1/memory/roundtrip"
    golden.write(make_result(status="fail", case_id=pinned), {}, tmp_path)
    golden.write(make_result(case_id=passing), {}, tmp_path)

    def kinds(*results):
        verdict = golden.judge_run(list(results), tmp_path)
        return {c: j.kind for c, j in verdict.judgements.items()}, verdict

    clean, verdict = kinds(make_result(status="fail", case_id=pinned), make_result(case_id=passing),
                           make_result(status="skip", case_id="gemma/tp2/memory/roundtrip"))
    assert clean == {pinned: golden.KNOWN, passing: golden.EXPECTED}, "a skip is not judged"
    assert verdict.known_by_upstream == {"?": 1}  # make_result's pin names no known_failures.yaml entry
    assert verdict.line(3) == "1/3 passed, 1 failed exactly as pinned (known upstream failures: " \
                              "golden/known_failures.yaml), 0 unexpected"
    for now, why in [(make_result(case_id=pinned), "passes now"),
                     (make_result(status="fail", sha="c" * 64, case_id=pinned), "fails differently"),
                     (make_result(status="fail", case_id=passing), "1/2 differ"),
                     (make_result(sha="c" * 64, case_id=passing), "different bytes"),
                     (make_result(status="error", case_id="qwen2/tp1/memory/roundtrip"), "")]:
        judged, verdict = kinds(now)
        assert judged == {now.case_id: golden.UNEXPECTED} and why in verdict.unexpected[now.case_id].why


def test_the_main_job_exits_0_on_known_failures_and_1_on_anything_new(tmp_path, monkeypatch):
    """The CLI's exit code comes from the same judgement; --raw-exit keeps the status-only code."""
    from harness import cli
    from harness.execution import run_service

    pinned = "qwen3-moe/tp1/memory/roundtrip"
    golden.write(make_result(status="fail", case_id=pinned), {}, tmp_path)
    monkeypatch.setattr(workspace, "golden_root", lambda: tmp_path)
    results = [make_result(), make_result(status="fail", case_id=pinned)]

    from unittest import mock

    outcome = mock.Mock(results=results, meta=mock.Mock(wall_s=1.0), run=mock.Mock(results_file=tmp_path / "r.json"))
    monkeypatch.setattr(run_service, "run_selection", lambda request: outcome)
    monkeypatch.setattr(cli.run_report, "write_outcome", lambda outcome, **gate: None)  # the CLI writes the run folder
    assert cli._execute(None) == cli.EXIT_OK
    assert cli._execute(None, raw_exit=True) == cli.EXIT_FAIL
    results[1] = make_result(case_id=pinned)  # the pinned failure passes now: XPASS(strict)
    assert cli._execute(None) == cli.EXIT_FAIL
