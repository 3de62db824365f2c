"""The launcher never hangs: a hung or crashed rank fails only its case, with the log tail."""

import json
import subprocess
import sys
import time

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu

CASES = """
matrix:
  - families: [llama]
    layouts: [tp2]
    paths: [memory/roundtrip]
  - families: [llama]
    layouts: [tp1-pp2]
    paths: [memory/roundtrip]
    timeout_s: 25
  - families: [qwen2]
    layouts: [tp2]
    paths: [memory/roundtrip]
"""
VICTIM = "llama/tp1-pp2/memory/roundtrip"


def run_matrix(tmp_path, fault):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "c.yaml").write_text(CASES)
    import os

    env = dict(os.environ, HARNESS_REPORTS=str(tmp_path / "reports"))
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "harness", "--cases-dir", str(cases), "matrix", "--inject", f"{fault}@{VICTIM}"],
        capture_output=True, text=True, env=env, cwd=workspace.REPO_ROOT, timeout=600,
    )
    elapsed = time.monotonic() - start
    run_dir = next(p for p in (tmp_path / "reports").iterdir() if not p.is_symlink())
    doc = json.loads((run_dir / "results.json").read_text())
    return r, {c["case_id"]: c for c in doc["cases"]}, elapsed, run_dir


def test_hung_case_times_out_and_the_run_goes_on(tmp_path):
    r, cases, elapsed, run_dir = run_matrix(tmp_path, "launcher-hang")
    assert r.returncode == 1
    assert cases[VICTIM]["status"] == "timeout"
    assert "25s timeout" in cases[VICTIM]["error"] and "rank0.log" in cases[VICTIM]["error"]
    others = [c for c in cases if c != VICTIM]
    assert len(others) == 2 and all(cases[c]["status"] == "pass" for c in others), r.stdout
    assert elapsed < 200, f"run took {elapsed:.0f}s"
    assert (run_dir / "logs").is_dir() and list((run_dir / "logs").glob("*/rank1.log"))
    assert "ETA" in r.stderr  # progress lines


def test_rank_killed_by_a_signal_is_named_with_the_signal_and_the_case_keeps_its_duration(tmp_path):
    r, cases, _, _ = run_matrix(tmp_path, "launcher-kill")
    assert r.returncode == 1
    victim = cases[VICTIM]
    assert victim["status"] == "error"
    assert victim["error"].startswith("rank 1 was killed by signal 9 (SIGKILL) during the case"), victim["error"][:300]
    assert victim["duration_s"] > 0, "the killed case ran for a while; 0.0 s would hide that"
    assert all(cases[c]["status"] == "pass" for c in cases if c != VICTIM), r.stdout


def test_crashed_rank_fails_its_case_with_log_tail(tmp_path):
    r, cases, _, _ = run_matrix(tmp_path, "launcher-crash")
    assert r.returncode == 1
    victim = cases[VICTIM]
    assert victim["status"] == "error"
    assert "log tail ---" in victim["error"]
    assert "exitcode" in victim["error"] or "exited with code" in victim["error"]  # torchrun's summary or ours
    assert all(cases[c]["status"] == "pass" for c in cases if c != VICTIM), r.stdout


def test_a_save_that_fails_on_one_rank_errors_its_case_and_the_next_case_does_not_hang(tmp_path):
    """save_hf_pretrained raising on rank 0 only left the ranks one collective apart; the next
    case then hung in a barrier until its timeout. Now the case errors and the group restarts."""
    r, cases, elapsed, _ = run_matrix(tmp_path, "save-refused-on-rank-0")
    victim = cases[VICTIM]
    assert victim["status"] == "error" and "were not written (seeded)" in victim["error"], victim["error"][:500]
    assert all(cases[c]["status"] == "pass" for c in cases if c != VICTIM), r.stdout
    assert elapsed < 200, f"run took {elapsed:.0f}s: a case hung"
