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
    assert project["project"]["scripts"]["harness"] == "harness.cli:entry_point"
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


def _fake_repo(tmp_path):
    """A copy of what bootstrap.sh reads, to run it without touching this checkout's .venv."""
    import shutil

    fake = tmp_path / "repo"
    (fake / "scripts").mkdir(parents=True)
    (fake / "requirements").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", fake / "scripts")
    for lock in ("lock.txt", "cuda-build.lock.txt"):
        shutil.copy(ROOT / "requirements" / lock, fake / "requirements")
    shutil.copy(ROOT / "pyproject.toml", fake)
    return fake


def _bootstrap(fake, tmp_path, *args, path="/usr/bin:/bin", **env):
    """Run the fake repo's bootstrap.sh with no CUDA toolkit in sight unless ``env``/``path`` bring one:
    PATH without /usr/local/bin (this machine's nvcc), CUDA_HOME pointing nowhere (so /usr/local/cuda
    is not the default either), an empty wheelhouse, this interpreter as Python 3.12, no free-space
    floor (the host's free disk is not under test here; test_bootstrap_refuses_a_full_disk is)."""
    import os
    import sys

    base = dict(os.environ, PATH=path, HARNESS_PYTHON=sys.executable, CUDA_HOME=str(tmp_path / "nocuda"),
                HARNESS_WHEELHOUSE=str(tmp_path / "wheels"), HARNESS_MIN_FREE_GIB="0")
    base.update(env)
    return subprocess.run(["bash", str(fake / "scripts" / "bootstrap.sh"), *args], capture_output=True, text=True,
                          env={k: v for k, v in base.items() if v is not None}, timeout=300)


def _pins(lock):
    return [line.strip() for line in (ROOT / "requirements" / lock).read_text().splitlines()
            if re.match(r"^[A-Za-z0-9_.-]+==", line)]


def test_bootstrap_preflight_messages(tmp_path):
    """Missing Python 3.12; no CUDA toolkit and the compiler packages cannot be fetched either (the
    one case where the TE build is impossible): one actionable error line, exit 1, nothing installed."""
    fake = _fake_repo(tmp_path)
    r = _bootstrap(fake, tmp_path, HARNESS_PYTHON="/nonexistent/python3.12", PYENV_ROOT=str(tmp_path / "nopyenv"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Python 3.12 not found" in r.stderr
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _bootstrap(fake, tmp_path, PIP_NO_INDEX="1", TMPDIR=str(tmp))  # no index, an empty wheelhouse
    errors = [line for line in r.stderr.splitlines() if line.startswith("bootstrap: error:")]
    assert r.returncode == 1 and len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
    assert "no CUDA toolkit" in errors[0] and "cuda-build.lock.txt" in errors[0] and "CUDA_HOME" in errors[0]
    assert "nvidia-cuda-nvcc==" in errors[0]  # pip's own reason
    assert not (fake / ".venv").exists()
    assert not list((tmp_path / "wheels").glob("*.whl"))
    assert "in a build-only venv" in r.stderr and list(tmp.iterdir()) == []  # the build-only venv was removed
    r = _bootstrap(fake, tmp_path, "--no-such-flag")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "usage: scripts/bootstrap.sh [--dry-run]" in r.stderr


def test_bootstrap_refuses_a_full_disk(tmp_path):
    """A disk with less free space than a new .venv needs: one line naming what is needed and what
    is free, before anything is fetched or created."""
    fake = _fake_repo(tmp_path)
    r = _bootstrap(fake, tmp_path, "--dry-run", HARNESS_MIN_FREE_GIB="1000000")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "need 1000000 GiB free on" in r.stderr and "free space and rerun" in r.stderr
    assert not (fake / ".venv").exists() and not (tmp_path / "wheels").exists()


def test_bootstrap_without_a_toolkit_builds_te_with_the_pinned_compiler_packages(tmp_path):
    """No nvcc under CUDA_HOME or on PATH: the TE build is planned with requirements/cuda-build.lock.txt
    in a build-only venv, fetching only what the wheelhouse lacks. --dry-run changes nothing."""
    fake = _fake_repo(tmp_path)
    pins = _pins("cuda-build.lock.txt")
    r = _bootstrap(fake, tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "with the pinned CUDA compiler packages in a build-only venv: no CUDA toolkit" in r.stderr
    assert " ".join(pins) in r.stderr and f"({len(pins)} to fetch into {tmp_path / 'wheels'})" in r.stderr
    assert not (fake / ".venv").exists() and not (tmp_path / "wheels").exists()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for pin in pins:  # names as pip writes them; the dry run only looks for them
        name, version = pin.split("==")
        (wheels / f"{name.replace('-', '_')}-{version}-py3-none-manylinux_2_17_x86_64.whl").touch()
    r = _bootstrap(fake, tmp_path, "--dry-run")
    assert r.returncode == 0 and "(0 to fetch into" in r.stderr, r.stderr


def test_bootstrap_keeps_using_an_existing_toolkit(tmp_path):
    """CUDA_HOME with bin/nvcc, or an nvcc on PATH (a wrapper script is asked where its toolkit is):
    that toolkit builds TE, not the compiler packages. A prebuilt TE wheel needs no compiler at all."""
    fake = _fake_repo(tmp_path)
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    r = _bootstrap(fake, tmp_path, "--dry-run", CUDA_HOME=str(toolkit))
    assert r.returncode == 0 and f"with the CUDA toolkit at {toolkit} (CUDA_HOME)" in r.stderr, r.stderr
    assert "compiler packages" not in r.stderr

    wrapper = tmp_path / "bin"  # like /usr/local/bin/nvcc: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    wrapper.mkdir()
    (wrapper / "nvcc").write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc-real \"$@\"\n")
    (wrapper / "nvcc").chmod(0o755)
    (toolkit / "bin" / "nvcc-real").write_text(
        f"#!/bin/sh\n[ \"$1\" = --dryrun ] && echo '#$ _HERE_={toolkit}/bin' >&2\nexit 0\n")
    (toolkit / "bin" / "nvcc-real").chmod(0o755)
    r = _bootstrap(fake, tmp_path, "--dry-run", path=f"{wrapper}:/usr/bin:/bin")
    assert r.returncode == 0, r.stderr
    assert f"with the CUDA toolkit at {toolkit} (nvcc on PATH: {wrapper / 'nvcc'}; CUDA_HOME={tmp_path / 'nocuda'} has no bin/nvcc)" in r.stderr
    r = _bootstrap(fake, tmp_path, "--dry-run", path=f"{wrapper}:/usr/bin:/bin", CUDA_HOME=None)
    assert r.returncode == 0 and f"with the CUDA toolkit at {toolkit} (nvcc on PATH: {wrapper / 'nvcc'})" in r.stderr

    lock = dict(p.split("==") for p in _pins("lock.txt"))
    te_house = tmp_path / "wheels" / f"te-{lock['transformer_engine']}-torch{lock['torch']}-cp312"
    te_house.mkdir(parents=True)
    (te_house / f"transformer_engine_torch-{lock['transformer_engine']}-cp312-cp312-linux_x86_64.whl").touch()
    r = _bootstrap(fake, tmp_path, "--dry-run")
    assert r.returncode == 0 and "would install the prebuilt transformer-engine-torch wheel" in r.stderr, r.stderr
    assert "CUDA toolkit" not in r.stderr and "compiler packages" not in r.stderr


def test_bootstrap_fingerprint_covers_the_cuda_build_lock(tmp_path):
    """A changed requirements/cuda-build.lock.txt re-bootstraps, as a changed lock.txt does."""
    import hashlib
    import sys

    fake = _fake_repo(tmp_path)
    (fake / ".venv" / "bin").mkdir(parents=True)
    (fake / ".venv" / "bin" / "python").symlink_to(sys.executable)
    parts = ["requirements/lock.txt", "requirements/cuda-build.lock.txt", "scripts/bootstrap.sh", "pyproject.toml"]
    stamp = hashlib.sha256(b"".join((fake / p).read_bytes() for p in parts)).hexdigest()
    (fake / ".venv" / ".bootstrap-stamp").write_text(stamp + "\n")
    r = _bootstrap(fake, tmp_path, "--dry-run")
    assert r.returncode == 0 and "is up to date: nothing to do" in r.stderr, r.stderr
    with open(fake / "requirements" / "cuda-build.lock.txt", "a") as f:
        f.write("nvidia-nvvm==13.0.88\n")
    r = _bootstrap(fake, tmp_path, "--dry-run")
    assert r.returncode == 0 and "would refresh" in r.stderr and "nvidia-nvvm==13.0.88" in r.stderr, r.stderr


def test_cuda_build_lock_is_the_compiler_of_torchs_cuda_release():
    """requirements/cuda-build.lock.txt is the nvcc + cccl part of the cuda-toolkit release torch
    depends on (torch's own CUDA version), without nvidia-nvvm (no device code is compiled), and its
    nvidia-cuda-runtime is the runtime lock.txt installs."""
    from importlib import metadata

    from packaging.requirements import Requirement

    lock = dict(p.split("==") for p in _pins("lock.txt"))
    build = dict(p.split("==") for p in _pins("cuda-build.lock.txt"))
    toolkit = [Requirement(r) for r in metadata.requires("torch") if Requirement(r).name == "cuda-toolkit"]
    assert len(toolkit) == 1 and toolkit[0].specifier.contains(lock["cuda-toolkit"]), toolkit
    assert metadata.version("cuda-toolkit") == lock["cuda-toolkit"]
    extras = {}
    for r in map(Requirement, metadata.requires("cuda-toolkit")):
        if r.marker and (r.marker.evaluate({"extra": "nvcc"}) or r.marker.evaluate({"extra": "cccl"})):
            extras[r.name] = str(r.specifier).removeprefix("==").removesuffix(".*")
    assert extras.pop("nvidia-nvvm")
    assert build == extras
    assert build["nvidia-cuda-runtime"] == lock["nvidia-cuda-runtime"]


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
