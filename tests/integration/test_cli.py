"""The command line, end to end in subprocesses (as users and CI call it)."""

import json
import subprocess
import sys

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu
CASE = "llama/tp1/memory/roundtrip"


def harness(*args, tmp_path, check=False):
    env = {"HARNESS_REPORTS": str(tmp_path / "reports"), "PATH": "/usr/bin:/bin"}
    import os

    env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env,
                          cwd=workspace.REPO_ROOT, check=check)


def only_run_dir(tmp_path):
    runs = [p for p in (tmp_path / "reports").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(runs) == 1
    return runs[0]


def test_unknown_case_is_a_one_line_usage_error_naming_the_closest(tmp_path):
    r = harness("run", "llama/tp1/memory/roundtrp", tmp_path=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and CASE in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "reports").exists(), "a usage error must not create a run folder"


def test_bad_case_file_is_a_usage_error_naming_file_and_field(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "bad.yaml").write_text("matrix:\n  - families: [llama]\n    layouts: [tp1]\n    path: [memory/roundtrip]\n")
    r = harness("--cases-dir", str(cases), "list", tmp_path=tmp_path)
    assert r.returncode == 2 and "bad.yaml" in r.stderr and "matrix[0].path" in r.stderr


def test_list(tmp_path):
    r = harness("list", "--ids-only", "-k", "llama", tmp_path=tmp_path, check=True)
    assert CASE in r.stdout.split()


def test_run_passes_prints_a_table_and_writes_result_json(tmp_path):
    r = harness("run", CASE, tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and CASE in r.stdout and "tensors" in r.stdout
    doc = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    assert doc["schema_version"] == 1 and doc["counts"] == {"pass": 1}
    (case,) = doc["cases"]
    assert case["case_id"] == CASE and case["status"] == "pass"
    tensors = next(c for c in case["checks"] if c["name"] == "tensors")
    assert tensors["metrics"]["compared"] == 21 and all(row["max_abs_diff"] == 0.0 for row in tensors["details"])
    assert doc["meta"]["versions"]["megatron-core"] == "0.19.2"
    # Provenance is true: versions from package metadata, never megatron-core's package_info,
    # which asks git in the current directory and would record *this* repository's SHA.
    head = subprocess.run(["git", "-C", str(workspace.REPO_ROOT), "rev-parse", "--short=7", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    (provenance,) = (only_run_dir(tmp_path) / "provenance").glob("*.json")
    text = provenance.read_text()
    assert json.loads(text)["installed"]["megatron-core"] == "0.19.2"
    assert head and head not in text and head not in json.dumps(doc["meta"]), "the harness repo's SHA leaked in"


def test_run_with_a_seeded_fault_exits_1_and_names_the_check(tmp_path):
    r = harness("run", CASE, "--inject", "export-drops-final-norm", tmp_path=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout and "model.norm.weight" in r.stdout
    doc = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    assert doc["meta"]["injected_faults"] == ["export-drops-final-norm"]
    assert doc["cases"][0]["failed_checks"] == ["tensors", "generation"]  # the strict HF save refuses it too


def test_unknown_fault_is_a_usage_error(tmp_path):
    r = harness("run", CASE, "--inject", "nope", tmp_path=tmp_path)
    assert r.returncode == 2 and "unknown fault" in r.stderr


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "broken.yaml").write_text("matrix:\n  - families: [llama\n    layouts: [tp1]\n")
    r = harness("--cases-dir", str(cases), "list", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "broken.yaml:3:12: not valid YAML: expected ',' or ']'" in r.stderr and "<unicode string>" not in r.stderr
    debug = harness("--debug", "--cases-dir", str(cases), "list", tmp_path=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr, "--debug adds the traceback, the exit code stays"


def test_the_table_never_cuts_a_number():
    from harness.reporting.run_report import clip, table
    from harness.results import CaseResult, CheckResult

    summary = ("max|d|=6.11e-04 (tol 1e-05) mean|d|=1.20e-05 top1=0.958 KL=6.11e-04 (tol 1e-11) "
               "which is far beyond the floor of this lane")
    result = CaseResult("qwen3-moe@bf16/tp1/memory/roundtrip", "fail",
                        checks=[CheckResult("logits-hf-vs-megatron", False, summary)])
    numbers = [t for t in f"logits-hf-vs-megatron: {summary}".split() if any(c.isdigit() for c in t)]
    for width in (30, 60, 90):
        shown = clip(f"logits-hf-vs-megatron: {summary}", width).split()
        assert all(n in shown for n in numbers), (width, shown)
    assert "KL=6.11e-04" in table([result]) and "6.11e-0…" not in table([result])
