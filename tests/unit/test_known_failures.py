"""Known upstream failures are pinned with a diagnosis, and the list has no stale entries."""

from __future__ import annotations

import json

import pytest

from harness import workspace
from harness.regression import golden
from harness.results import CaseResult, CheckResult

pytestmark = pytest.mark.cpu


def golden_docs():
    for path in sorted(workspace.golden_root().glob("*/*.json")):
        yield path, json.loads(path.read_text())


def test_every_failing_golden_file_says_why():
    for path, doc in golden_docs():
        if doc["status"] not in ("pass", "invalid"):
            known = doc.get("known_failure") or {}
            assert known.get("diagnosis") and known.get("upstream"), f"{path}: pinned as {doc['status']} without a diagnosis"
            entry = golden.known_failure(doc["case_id"], doc["lane"])
            assert entry is not None and entry.diagnosis == known["diagnosis"], f"{path}: stale diagnosis"
            assert set(entry.checks) == set(doc["failed_checks"]), f"{path}: fails {doc['failed_checks']}, entry says {entry.checks}"


def test_every_known_failure_names_existing_cases(case_set):
    for entry in golden.known_failures():
        for pattern in entry.cases:
            assert any(golden.KnownFailure((pattern,), entry.lanes, (), "", "").matches(c.id, lane)
                       for c in case_set.cases for lane in entry.lanes), f"{pattern}: matches no case"


def test_golden_document_of_a_known_failure_carries_the_diagnosis_and_the_numbers(tmp_path):
    (tmp_path / golden.KNOWN_FAILURES).write_text(
        "failures:\n  - cases: ['x@y/*']\n    lanes: [cpu]\n    checks: [tensors]\n    upstream: bridge 1.0\n"
        "    diagnosis: >-\n      export keeps the padding\n")
    failed = CaseResult("x@y/tp2/memory/roundtrip", "fail", checks=[CheckResult("tensors", False, "1/21 differ: [252, 64]")])
    doc = golden.document(failed, {}, root=tmp_path)
    assert doc["known_failure"] == {"upstream": "bridge 1.0", "diagnosis": "export keeps the padding",
                                    "headline": "tensors: 1/21 differ: [252, 64]"}
    assert "known_failure" not in golden.document(CaseResult("x@y/tp1/memory/roundtrip", "pass"), {}, root=tmp_path)


def test_the_most_specific_entry_says_why(tmp_path):
    from harness.regression import golden

    (tmp_path / golden.KNOWN_FAILURES).write_text(
        "failures:\n"
        "  - {cases: ['fam/*'], lanes: [cpu], checks: [], upstream: u, diagnosis: broad}\n"
        "  - {cases: ['fam/*/hf/config-export'], lanes: [cpu], checks: [config-export], upstream: u, diagnosis: narrow}\n")
    assert golden.known_failure("fam/tp1/hf/config-export", "cpu", tmp_path).diagnosis == "narrow"
    assert golden.known_failure("fam/tp1/memory/roundtrip", "cpu", tmp_path).diagnosis == "broad"
    assert golden.known_failure("other/tp1/memory/roundtrip", "cpu", tmp_path) is None
