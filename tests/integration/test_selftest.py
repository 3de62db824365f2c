"""`harness selftest` is part of the test suite: every seeded regression must be caught, by the
check meant to catch it, and the clean stack must not be flagged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import workspace
from harness.regression import selftest

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def selftest_run(tmp_path_factory):
    reports = tmp_path_factory.mktemp("reports")
    r = subprocess.run([sys.executable, "-m", "harness", "selftest"], capture_output=True, text=True,
                       env=dict(os.environ, HARNESS_REPORTS=str(reports)), cwd=workspace.REPO_ROOT, timeout=1200)
    run = next(p for p in reports.iterdir() if p.name.endswith("selftest-cpu"))
    doc = json.loads((run / "selftest.json").read_text())
    return r, doc, {row["regression"]: row for row in doc["rows"]}


def test_every_regression_is_detected_and_the_clean_stack_passes(selftest_run):
    r, doc, rows = selftest_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert doc["detected"] == doc["total"] == len(selftest.REGRESSIONS) >= 12
    assert doc["false_positives"] == []


def test_each_is_caught_by_the_check_meant_for_it(selftest_run):
    _, _, rows = selftest_run
    for reg in selftest.REGRESSIONS:
        row = rows[reg.fault]
        assert row["expected_check"], f"{reg.fault} caught by {row['by']}, expected one of {reg.expect}"


def test_symmetric_swaps_pass_the_weight_round_trip_and_only_logits_catch_them(selftest_run):
    _, _, rows = selftest_run
    for fault in ("gate-up-swapped", "qkv-naive-concat", "rope-theta-dropped"):
        assert rows[fault]["by"] == ["logits-hf-vs-megatron"], rows[fault]


def test_the_naive_bridge_check_misses_what_the_harness_catches(selftest_run):
    _, _, rows = selftest_run
    for fault in ("gate-up-swapped", "qkv-naive-concat", "export-drops-lm-head", "fp32-param-via-bf16"):
        assert rows[fault]["naive_bridge_check"] == "missed", rows[fault]


def test_a_crash_is_headlined_by_the_exception_that_stopped_it(selftest_run):
    """Upstream's own validation stops the seeded shard faults (Megatron-FSDP's assert, DCP's
    CheckpointException, a BaseException): the headline is that exception, not the peer torchrun
    stopped afterwards (SIGTERM) nor 'exited with code N'."""
    _, _, rows = selftest_run
    for fault in ("fsdp-shard-misplaced", "fsdp-shard-dropped"):
        headline = rows[fault]["key_number"]
        assert "signal" not in headline and "exited with code" not in headline, headline
