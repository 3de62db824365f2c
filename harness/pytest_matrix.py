"""Every case of cases/*.yaml, on every lane it supports (``-m cpu``, ``-m gpu``, ``-m slow``).

The matrix's one test, shipped in the package so another tree can run it
(``pytest --pyargs harness.pytest_matrix``); the repository's tests/matrix/test_matrix.py imports it.
"""

import pytest

from harness.pytest_plugin import explain
from harness.regression import golden
from harness.results import INFRA_ERROR


@pytest.fixture
def infra_checked(matrix_case, matrix_runner):
    """An infrastructure error is reported by pytest as an ERROR of the test's setup, never as a
    FAIL of the case: it says nothing about the code under test."""
    lane, case_id = matrix_case
    case = matrix_runner.case_set.get(case_id)
    if not case.invalid_reason and not matrix_runner.skip_reason(lane, case_id):
        result = matrix_runner.result(lane, case_id)
        if result.status == INFRA_ERROR:
            pytest.fail(f"infrastructure error (not a verdict on {case_id}): {result.headline}", pytrace=False)


def test_case(matrix_case, matrix_runner, record_property, infra_checked):
    lane, case_id = matrix_case
    case = matrix_runner.case_set.get(case_id)
    if case.invalid_reason:  # declared impossible: the up-front check must refuse it, naming the rule
        assert "cannot be split as" in case.invalid_reason
        assert any(rule in case.invalid_reason for rule in ("divisible", "refuses")), case.invalid_reason
        return
    reason = matrix_runner.skip_reason(lane, case_id)  # e.g. the GPU lane without (enough) GPUs
    if reason:
        pytest.skip(reason)
    result = matrix_runner.result(lane, case_id)
    record_property("status", result.status)
    for check in result.checks:
        if "max_abs_diff" in check.metrics:
            record_property(f"{check.name}.max_abs_diff", check.metrics["max_abs_diff"])
    judgement = golden.judge(result)  # the CLI's exit code is decided by the same judgement
    if judgement.kind == golden.KNOWN:
        pytest.xfail(judgement.why)
    assert judgement.kind == golden.EXPECTED, (
        judgement.why if result.status == "pass" else f"{judgement.why}\n{explain(result)}")
