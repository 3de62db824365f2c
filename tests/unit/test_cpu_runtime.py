"""The CPU runtime must leave torch exactly as it found it, exception or not."""

import subprocess
import sys

import pytest
import torch

from harness.runtimes.cpu import REDIRECTS, CpuRuntime, Redirect

pytestmark = pytest.mark.cpu
ABSENT = object()


def touched(redirects=REDIRECTS):
    return [(r.resolve(), r.attribute) for r in redirects]


def snapshot(keys):
    """Each touched attribute as its owner's own dict holds it, plus what lookup resolves to."""
    return {(owner, attr): (vars(owner).get(attr, ABSENT), getattr(owner, attr, ABSENT)) for owner, attr in keys}


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        assert before[key][0] is after[key][0], f"{key[1]}: own attribute not restored"
        assert before[key][1] == after[key][1], f"{key[1]}: resolved attribute not restored"


def test_touches_only_the_owners_of_the_redirect_table_each_with_its_reason():
    import megatron.core.fusions.fused_softmax as fused_softmax
    import torch.distributed as dist
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel
    from torch.distributed.device_mesh import DeviceMesh
    from transformer_engine.pytorch.optimizers.fused_adam import FusedAdam
    import sys

    owners = {owner for owner, _ in touched()}
    assert owners == {torch.cuda, torch.Tensor, dist, DeviceMesh, FullyShardedDataParallel, FusedAdam,
                      sys.modules["transformer_engine_torch"], fused_softmax}
    assert "torch.cuda.current_device" in CpuRuntime().touched_names
    assert all(r.needed_by and r.why for r in REDIRECTS), "every redirect names its upstream caller and why"


def test_a_cuda_placed_call_runs_unchanged_on_the_cpu():
    """The sliding-window mask: same values as its definition, on the CPU, only inside the run."""
    import megatron.core.fusions.fused_softmax as fused_softmax

    with pytest.raises((RuntimeError, AssertionError)):
        fused_softmax.get_sliding_window_causal_mask(6, 6, (2, 0))  # device="cuda" without CUDA
    with CpuRuntime():
        mask = fused_softmax.get_sliding_window_causal_mask(6, 6, (2, 0))
    i, j = torch.arange(6).unsqueeze(1), torch.arange(6).unsqueeze(0)
    visible = (j <= i) & (j >= i - 2)  # causal, at most 2 tokens back
    assert mask.device.type == "cpu" and torch.equal(mask, ~visible)


def test_redirects_are_active_inside_and_restored_after():
    runtime = CpuRuntime()
    before = snapshot(touched())
    with runtime:
        assert torch.cuda.current_device() == "cpu" and f"cuda:{torch.cuda.current_device()}" == "cuda:0"
        torch.cuda.synchronize()  # would raise without CUDA
        assert isinstance(torch.cuda.get_rng_state(), torch.Tensor)
        t = torch.ones(2)
        assert t.cuda() is t
        assert isinstance(torch.cuda.Stream(), torch.cpu.Stream)
        for key, (own, _) in before.items():
            assert vars(key[0]).get(key[1], ABSENT) is not own, f"{key[1]} is not redirected"
    assert_same(before, snapshot(touched()))
    assert "cuda" not in vars(torch.Tensor), "the Tensor.cuda override must be removed, not copied"


def test_restored_when_the_run_raises():
    runtime = CpuRuntime()
    before = snapshot(touched())
    with pytest.raises(ZeroDivisionError):
        with runtime:
            assert torch.cuda.current_device() == "cpu"
            1 / 0
    assert_same(before, snapshot(touched()))


def test_restored_when_entering_fails_halfway():
    """A failure while installing redirects must undo the ones already installed."""
    key = (torch.cuda, "current_device")

    def boom(_original):
        raise RuntimeError("boom while patching")

    runtime = CpuRuntime(redirects=(REDIRECTS[0], Redirect("torch.cuda", "synchronize", boom, "test", "test")))
    assert (REDIRECTS[0].resolve(), REDIRECTS[0].attribute) == key
    before = snapshot([key])
    with pytest.raises(RuntimeError, match="boom"):
        runtime.__enter__()
    assert_same(before, snapshot([key]))
    with CpuRuntime():  # usable again: its lock was released
        pass


def test_attribute_that_did_not_exist_is_removed_again():
    runtime = CpuRuntime(redirects=(Redirect("torch.cuda", "harness_test_only_attr", lambda _o: (lambda: None),
                                             "test", "test"),))
    assert not hasattr(torch.cuda, "harness_test_only_attr")
    with runtime:
        assert hasattr(torch.cuda, "harness_test_only_attr")
    assert not hasattr(torch.cuda, "harness_test_only_attr")


def test_not_reentrant():
    with CpuRuntime():
        with pytest.raises(RuntimeError, match="not re-entrant"):
            CpuRuntime().__enter__()


def test_importing_the_module_patches_nothing():
    code = (
        "import torch; before = {n: getattr(torch.cuda, n) for n in ('current_device','synchronize','get_rng_state')};"
        "import harness.runtimes.cpu;"
        "assert all(getattr(torch.cuda, n) is f for n, f in before.items());"
        "assert 'cuda' not in vars(torch.Tensor)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_re_initialising_parallel_state_does_not_leak_process_groups_or_their_threads(cpu_runtime):
    """megatron-core's destroy_model_parallel only forgets its groups; without the release every
    layout change left ~20 gloo groups and 60 threads behind in each rank."""
    import os

    from torch.distributed import distributed_c10d

    from harness.matrix.layouts import Layout

    def counts():
        return len(distributed_c10d._world.pg_map), len(os.listdir("/proc/self/task"))

    cpu_runtime.init_model_parallel(Layout())
    first = counts()
    for _ in range(3):
        cpu_runtime.init_model_parallel(Layout())
    groups, threads = counts()
    # Each leaked initialisation adds ~20 groups and ~60 threads; a few transient threads are not a leak.
    assert groups == first[0] and threads <= first[1] + 10, f"groups and threads grew from {first} to {counts()}"
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # without the release: the groups stay
    parallel_state.initialize_model_parallel()
    assert counts()[0] > first[0], "the check above could not see a leak"
