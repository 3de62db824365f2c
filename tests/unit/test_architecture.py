"""Architecture promises: the torch-free parts stay torch-free; data and code agree on the routes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from harness import workspace

pytestmark = pytest.mark.cpu

# Run in a fresh interpreter, then fail (exit 97) if a heavy package got imported on the way.
_HEAVY = ("torch", "megatron", "transformer_engine", "transformers")
_CHECK_AT_EXIT = textwrap.dedent(f"""
    import atexit, os, sys
    def _check():
        sys.stdout.flush()
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {_HEAVY!r})
        if heavy:
            print('must stay torch-free, but imported: ' + ', '.join(heavy[:5]), file=sys.stderr, flush=True)
            os._exit(97)
    atexit.register(_check)
""")


def run_torch_free(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHECK_AT_EXIT + textwrap.dedent(code), *args], capture_output=True,
                          text=True, cwd=workspace.REPO_ROOT)


@pytest.mark.parametrize("module", [
    "harness.cli", "harness.execution.run_service", "harness.execution.rank_launcher", "harness.regression.gate",
    "harness.regression.bisect", "harness.regression.golden", "harness.regression.selftest",
    "harness.reporting.run_report", "harness.checks.checkpoint_diff", "harness.formats.detect",
    "harness.matrix.cases", "harness.matrix.lanes",
])
def test_light_modules_import_without_torch(module):
    r = run_torch_free(f"import {module}")
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_start_up_list_and_hf_diff_run_without_torch(tmp_path):
    """`harness list` and `harness diff` of two HF checkpoints never import torch (which alone
    costs ~640 MB RSS with the CUDA build)."""
    from harness.matrix import checkpoint_builder, model_spec

    a = checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp_path / "a")
    b = checkpoint_builder.build(model_spec.ModelSpec("llama"), tmp_path / "b")
    for argv in (["list", "--ids-only"], ["diff", str(a), str(b)]):
        r = run_torch_free("import sys; from harness.cli import main; main(sys.argv[1:])", *argv)
        assert r.returncode == 0, (argv, r.stderr[-2000:])


def test_case_paths_and_route_registry_name_the_same_paths():
    from harness.conversion.routes import ROUTES
    from harness.matrix.cases import PATHS

    assert set(PATHS) == set(ROUTES)


def test_the_guard_itself_can_fail():
    r = run_torch_free("import torch")
    assert r.returncode == 97 and "must stay torch-free, but imported: torch" in r.stderr


def test_golden_check_of_a_run_runs_without_torch(tmp_path):
    from harness.execution.run_dir import RunDir
    from harness.reporting import run_report
    from harness.results import CaseResult

    run = RunDir.create("light", root=tmp_path)
    run_report.write_run(run, [CaseResult("llama/tp1/memory/roundtrip", "pass")], {"label": "light"})
    r = run_torch_free("import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))",
                       "golden", "check", "--run", str(run.path))
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 97 would mean torch was imported
