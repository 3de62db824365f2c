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
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer
    from transformer_engine.pytorch.optimizers.fused_adam import FusedAdam
    import sys

    import megatron.bridge.models.gemma.gemma2_provider as gemma2_provider
    import megatron.core.ssm.gated_delta_net.common as gdn_common
    import megatron.core.ssm.gated_delta_net.gdn as gdn
    import transformer_engine.pytorch as te
    from megatron.bridge.models.minimax_m2.minimax_m2_bridge import _FullDimQKNormMapping
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    owners = {owner for owner, _ in touched()}
    te_modules = {te.Linear, te.LayerNormLinear, te.GroupedLinear, te.DotProductAttention, te.LayerNorm, te.RMSNorm}
    assert owners == {torch.cuda, torch.Tensor, dist, DeviceMesh, FullyShardedDataParallel, FusedAdam,
                      MixedPrecisionOptimizer, sys.modules["transformer_engine_torch"], fused_softmax,
                      TransformerEngineBaseModule, *te_modules, gdn, gdn_common, _FullDimQKNormMapping,
                      gemma2_provider}
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


def test_the_device_ordinal_is_the_cpu_as_a_device_and_zero_in_a_device_string():
    from harness.runtimes.cpu import CpuDeviceOrdinal

    ordinal = CpuDeviceOrdinal("cpu")
    assert torch.zeros(1, device=ordinal).device.type == "cpu"
    assert torch.device(f"cuda:{ordinal}") == torch.device("cuda", 0)  # compared by megatron_fsdp.py, never used


@pytest.mark.parametrize("mode", [0, 1])
def test_the_cpu_adam_kernel_is_adam_as_torch_computes_it(mode):
    """The stand-in for TE's multi_tensor_adam against torch's own Adam (mode 0, L2) and AdamW
    (mode 1). The two order their fp32 operations differently (TE: m/bc1 / (sqrt(v/bc2) + eps);
    torch: m / (sqrt(v)/sqrt(bc2) + eps) * lr/bc1; exp_avg by lerp), so they agree to a few ulps,
    not bitwise: rtol 1e-6 (~8 fp32 ulps) plus atol 1e-7 for moments near a cancellation (values
    ~0.1: ~7 ulps). A dropped bias correction moves the update by 10x (fails)."""
    from harness.runtimes.cpu import cpu_multi_tensor_adam

    gen = torch.Generator().manual_seed(0)
    param = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen) for _ in range(3)]
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    ref = param.clone().requires_grad_(True)
    reference = (torch.optim.AdamW if mode == 1 else torch.optim.Adam)([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    mine, exp_avg, exp_avg_sq = param.clone(), torch.zeros(64), torch.zeros(64)
    for step, grad in enumerate(grads, start=1):
        ref.grad = grad.clone()
        reference.step()
        cpu_multi_tensor_adam(2048, torch.zeros(1, dtype=torch.int), [[grad], [mine], [exp_avg], [exp_avg_sq]],
                              lr, *betas, eps, step, mode, True, wd)
    state = reference.state[ref]
    torch.testing.assert_close(mine, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-6, atol=1e-7)
    no_correction = param.clone()
    cpu_multi_tensor_adam(2048, None, [[grads[0]], [no_correction], [torch.zeros(64)], [torch.zeros(64)]],
                          lr, *betas, eps, 1, mode, False, wd)
    assert not torch.allclose(no_correction, param - lr * (torch.sign(grads[0]) + (wd * param if mode else 0)), rtol=1e-3)


def test_released_groups_leave_no_dtensor_spec_naming_them(cpu_runtime):
    """DTensor's sharding-propagation cache keys on the mesh, which compares equal by its rank
    layout alone: without the cache cleared, an op on a mesh of new groups is handed the spec of
    the old, destroyed ones (Megatron-FSDP's strict reload crashed on it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed import distributed_c10d

    from harness.runtimes.base import clear_dtensor_caches, release_process_groups

    def op_on_a_fresh_mesh():
        mesh = DeviceMesh.from_group([dist.new_group([0]), dist.new_group([0])], "cpu", mesh=[[0]],
                                     mesh_dim_names=["dp_cp", "tp"])
        return (DTensor.from_local(torch.ones(4, 2), mesh, [Shard(0), Shard(1)]) * 2).device_mesh

    def alive(mesh):
        names = {pg.group_name for pg in distributed_c10d._world.pg_map}
        return all(name in names for name in mesh._get_root_mesh()._dim_group_names)

    op_on_a_fresh_mesh()
    release_process_groups()
    assert alive(op_on_a_fresh_mesh())
    # The seeded bug: destroy the groups but keep the caches.
    for pg in [pg for pg in distributed_c10d._world.pg_map if pg is not distributed_c10d.GroupMember.WORLD]:
        dist.destroy_process_group(pg)
    assert not alive(op_on_a_fresh_mesh()), "the check above could not see stale specs"
    clear_dtensor_caches()
