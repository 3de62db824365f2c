"""The matrix in this repository's test suite: the test lives in the package (harness.pytest_matrix),
its parametrization and fixtures in the plugin (harness.pytest_plugin)."""

from harness.pytest_matrix import infra_checked, test_case  # noqa: F401 - collected here
