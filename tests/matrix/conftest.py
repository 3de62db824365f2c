"""The case matrix as tests: ``matrix_case`` is parametrized from cases/*.yaml (harness.pytest_plugin)."""

from __future__ import annotations

import pytest


def pytest_generate_tests(metafunc):
    from harness import pytest_plugin

    if pytest_plugin.PARAM in metafunc.fixturenames:
        from harness.matrix.cases import load_cases

        metafunc.parametrize(pytest_plugin.PARAM, pytest_plugin.params(load_cases()))


@pytest.fixture(scope="session")
def matrix_runner(request):
    from harness.pytest_plugin import MatrixRunner

    return MatrixRunner(session=request.session)
