"""The CPU runtime must leave torch.cuda exactly as it found it, exception or not."""

import pytest
import torch

from harness.cpu_runtime import CUDA_REDIRECTS, CpuRuntime

pytestmark = pytest.mark.cpu


def snapshot(names):
    return {name: getattr(torch.cuda, name, "<absent>") for name in names}


def test_redirects_are_active_inside_and_restored_after():
    runtime = CpuRuntime()
    before = snapshot(runtime.touched)
    with runtime:
        assert torch.cuda.current_device() == "cpu"
        torch.cuda.synchronize()  # would raise without CUDA
        assert isinstance(torch.cuda.get_rng_state(), torch.Tensor)
        for name in runtime.touched:
            assert getattr(torch.cuda, name) is CUDA_REDIRECTS[name]
    assert snapshot(runtime.touched) == before
    for name, original in before.items():
        assert getattr(torch.cuda, name, "<absent>") is original


def test_restored_when_the_run_raises():
    runtime = CpuRuntime()
    before = snapshot(runtime.touched)
    with pytest.raises(ZeroDivisionError):
        with runtime:
            assert torch.cuda.current_device() == "cpu"
            1 / 0
    after = snapshot(runtime.touched)
    assert after == before
    assert all(after[n] is before[n] for n in before)


def test_restored_when_entering_fails_halfway(monkeypatch):
    """A failure while installing redirects must undo the ones already installed."""

    class Boom(dict):
        def items(self):
            yield "current_device", CUDA_REDIRECTS["current_device"]
            raise RuntimeError("boom while patching")

    runtime = CpuRuntime(redirects=Boom())
    before = snapshot(["current_device"])
    with pytest.raises(RuntimeError, match="boom"):
        runtime.__enter__()
    assert snapshot(["current_device"])["current_device"] is before["current_device"]
    # The runtime is usable again afterwards (its lock was released).
    with CpuRuntime():
        pass


def test_attribute_that_did_not_exist_is_removed_again():
    runtime = CpuRuntime(redirects={"harness_test_only_attr": lambda: None})
    assert not hasattr(torch.cuda, "harness_test_only_attr")
    with runtime:
        assert hasattr(torch.cuda, "harness_test_only_attr")
    assert not hasattr(torch.cuda, "harness_test_only_attr")


def test_not_reentrant():
    with CpuRuntime():
        with pytest.raises(RuntimeError, match="not re-entrant"):
            CpuRuntime().__enter__()


def test_importing_the_module_patches_nothing():
    import importlib
    import subprocess
    import sys

    code = (
        "import torch; before = {n: getattr(torch.cuda, n) for n in ('current_device','synchronize','get_rng_state')};"
        "import harness.cpu_runtime;"
        "assert all(getattr(torch.cuda, n) is f for n, f in before.items())"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    importlib.import_module("harness.cpu_runtime")
