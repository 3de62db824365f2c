"""The repository promises made in the README hold: two commands, CI runs the test one verbatim."""

import re
import subprocess
import tomllib

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu
ROOT = workspace.REPO_ROOT


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_commands_both_bootstrapping():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert all(c.startswith("scripts/bootstrap.sh && ") for c in commands)
    assert "harness matrix" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_pyproject_declares_package_script_and_strict_markers():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["harness"] == "harness.cli:main"
    ini = project["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in ini["addopts"]
    assert {m.split(":")[0] for m in ini["markers"]} == {"cpu", "gpu", "slow"}


def test_bootstrap_is_a_noop_when_up_to_date():
    """Reruns must not reinstall (let alone rebuild TE): the stamp short-circuits before pip is
    ever called, so bootstrap's log is not touched and nothing is printed."""
    log = ROOT / ".venv" / "bootstrap.log"
    if not (ROOT / ".venv" / ".bootstrap-stamp").exists():
        pytest.skip("this checkout was not bootstrapped (no .venv/.bootstrap-stamp): nothing to rerun")
    before = log.stat() if log.exists() else None
    out = subprocess.run([str(ROOT / "scripts" / "bootstrap.sh")], capture_output=True, text=True, check=True)
    assert out.stdout == "" and out.stderr == ""
    after = log.stat() if log.exists() else None
    assert (before and (before.st_size, before.st_mtime_ns)) == (after and (after.st_size, after.st_mtime_ns))


def test_bootstrap_preflight_messages(tmp_path):
    """Missing Python 3.12 / CUDA toolkit: one actionable line, non-zero exit, nothing installed."""
    import os
    import shutil

    fake = tmp_path / "repo"
    (fake / "scripts").mkdir(parents=True)
    (fake / "requirements").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", fake / "scripts")
    shutil.copy(ROOT / "requirements" / "lock.txt", fake / "requirements")
    shutil.copy(ROOT / "pyproject.toml", fake)
    env = dict(os.environ, HARNESS_PYTHON="/nonexistent/python3.12", PATH="/usr/bin:/bin", PYENV_ROOT=str(tmp_path / "nopyenv"))
    r = subprocess.run(["bash", str(fake / "scripts" / "bootstrap.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Python 3.12 not found" in r.stderr
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "nocuda"), HARNESS_WHEELHOUSE=str(tmp_path / "wheels"))
    r = subprocess.run(["bash", str(fake / "scripts" / "bootstrap.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "CUDA toolkit" in r.stderr and "CUDA_HOME" in r.stderr
    assert not (fake / ".venv").exists()


def _collect(args, cwd):
    import sys

    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args],
                       capture_output=True, text=True, cwd=cwd, timeout=300)
    return r, [line for line in r.stdout.splitlines() if "::" in line]


def test_one_case_is_selected_from_the_repository_root_by_its_id():
    """The top-level conftest.py loads the plugin: a bisect run's `pytest -m cpu -k CASE`."""
    r, items = _collect(["-m", "cpu", "-k", "llama/tp1/memory and test_matrix"], ROOT)
    assert items == ["tests/matrix/test_matrix.py::test_case[cpu-llama/tp1/memory/roundtrip]"], r.stdout + r.stderr


def test_another_tree_runs_the_matrix_through_the_installed_plugin(tmp_path):
    """A Megatron-Bridge checkout that installs this package: no conftest of ours, the pytest11
    entry point loads the plugin, ``--pyargs harness.pytest_matrix`` collects the matrix."""
    from importlib import metadata

    assert any(ep.value == "harness.pytest_plugin" for ep in metadata.entry_points(group="pytest11")), \
        "the pytest11 entry point is not installed: rerun scripts/bootstrap.sh"
    r, items = _collect(["--pyargs", "harness.pytest_matrix", "-m", "gpu", "-k", "llama/tp1/memory"], tmp_path)
    assert len(items) == 1 and items[0].endswith("test_case[gpu-llama/tp1/memory/roundtrip]"), r.stdout + r.stderr
